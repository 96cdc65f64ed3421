package outbox_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/twmb/franz-go/pkg/kfake"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/kafka"
	"github.com/gorm-outbox/outbox/outboxtest"
)

func keysOf(msgs []*outbox.OutboxMessage) string {
	var out []string
	for _, m := range msgs {
		out = append(out, m.Key+":"+string(m.Payload))
	}
	return strings.Join(out, " ")
}

func TestClaimHoldsAKeyWhileItsOlderMessageIsInFlightOrWaiting(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		store, _ := outbox.StoreOf(db)
		ctx := t.Context()
		err := db.Transaction(func(tx *gorm.DB) error {
			return outbox.Enqueue(tx,
				outbox.Message{Topic: "t", Key: "a", Payload: "1"},
				outbox.Message{Topic: "t", Key: "a", Payload: "2"},
				outbox.Message{Topic: "t", Key: "", Payload: "x1"},
				outbox.Message{Topic: "t", Key: "a", Payload: "3"},
				outbox.Message{Topic: "t", Key: "b", Payload: "1"},
				outbox.Message{Topic: "t", Key: "", Payload: "x2"})
		})
		if err != nil {
			t.Fatal(err)
		}
		lease := time.Minute
		tok1, first, err := store.Claim(ctx, outbox.ClaimOptions{Limit: 2, Lease: lease})
		if err != nil || keysOf(first) != "a:1 a:2" {
			t.Fatalf("first claim: %q, %v", keysOf(first), err)
		}
		// a:3 waits for a:1 and a:2, which are in flight; the others flow.
		_, second, err := store.Claim(ctx, outbox.ClaimOptions{Limit: 10, Lease: lease})
		if err != nil || keysOf(second) != ":x1 b:1 :x2" {
			t.Fatalf("second claim: %q, %v", keysOf(second), err)
		}
		// a:1 fails and waits for a retry; a:2 is published. a:3 still waits.
		if err := store.MarkFailed(ctx, tok1, []outbox.Failure{{ID: first[0].ID, Err: "refused", NextAttemptAt: time.Now().Add(time.Hour)}}); err != nil {
			t.Fatal(err)
		}
		if err := store.MarkPublished(ctx, tok1, []uuid.UUID{first[1].ID}); err != nil {
			t.Fatal(err)
		}
		if _, got, _ := store.Claim(ctx, outbox.ClaimOptions{Limit: 10, Lease: lease}); len(got) != 0 {
			t.Fatalf("claimed %q behind a message waiting for a retry", keysOf(got))
		}
		// KeySkip lets it go ahead.
		tok3, got, err := store.Claim(ctx, outbox.ClaimOptions{Limit: 10, Lease: lease, SkipFailedKeys: true})
		if err != nil || keysOf(got) != "a:3" {
			t.Fatalf("claim skipping failed keys: %q, %v", keysOf(got), err)
		}
		if err := store.Release(ctx, tok3, []uuid.UUID{got[0].ID}); err != nil {
			t.Fatal(err)
		}
		// A dead message no longer holds its key.
		if err := db.Table(outbox.DefaultTableName).Where("id = ?", first[0].ID).Update("state", outbox.StateDead).Error; err != nil {
			t.Fatal(err)
		}
		if _, got, _ := store.Claim(ctx, outbox.ClaimOptions{Limit: 10, Lease: lease}); keysOf(got) != "a:3" {
			t.Fatalf("after the head died: %q", keysOf(got))
		}
	})
}

// A message over the broker's maximum size makes Kafka refuse its
// partition's whole record batch. Only the poison message may pay for it:
// its neighbours are sent again alone, and its key's later messages wait.
func TestPoisonMessageCostsOnlyItselfAndHoldsItsKey(t *testing.T) {
	for _, policy := range []outbox.KeyPolicy{outbox.KeyWait, outbox.KeySkip} {
		t.Run(fmt.Sprint("policy=", policy), func(t *testing.T) { poisonCase(t, policy) })
	}
}

func poisonCase(t *testing.T, policy outbox.KeyPolicy) {
	{
		eachDB(t, func(t *testing.T, db *gorm.DB) {
			cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, "events"),
				kfake.BrokerConfigs(map[string]string{"message.max.bytes": "4096"}))
			if err != nil {
				t.Fatal(err)
			}
			defer cluster.Close()
			addrs := cluster.ListenAddrs()
			var poisonID string
			for i := range 30 {
				key := []string{"a", "b", "c"}[i%3]
				payload := fmt.Sprint(i)
				if i == 9 {
					payload = strings.Repeat("p", 8000)
				}
				err := db.Transaction(func(tx *gorm.DB) error {
					return outbox.Enqueue(tx, outbox.Message{Topic: "events", Key: key, Payload: payload})
				})
				if err != nil {
					t.Fatal(err)
				}
			}
			for _, m := range messages(t, db) {
				if len(m.Payload) > 100 {
					poisonID = m.ID.String()
				}
			}
			pub, err := outbox.NewPublisher(db, kafkaSender(t, addrs), outbox.WithKeyPolicy(policy), outbox.WithBatchSize(8),
				outbox.WithLogger(discardLogger()),
				outbox.WithRetryPolicy(outbox.RetryPolicy{MaxAttempts: 1000, MinBackoff: time.Hour}))
			if err != nil {
				t.Fatal(err)
			}
			for range 20 {
				if _, err := pub.PublishOnce(t.Context()); err != nil {
					t.Fatal(err)
				}
			}
			wantDelivered := 29 // all but the poison
			if policy == outbox.KeyWait {
				wantDelivered = 29 - 6 // a's messages after the poison (i = 12, 15, ..., 27) wait
			}
			recs := outboxtest.ReadAll(t, addrs, "events", wantDelivered, 300*time.Millisecond)
			if len(recs) != wantDelivered {
				t.Fatalf("delivered %d, want %d", len(recs), wantDelivered)
			}
			last := map[string]int{}
			for _, r := range recs {
				var n int
				if _, err := fmt.Sscan(string(r.Value), &n); err != nil {
					t.Fatalf("value %q is not a number: %v", r.Value, err)
				}
				if prev, ok := last[string(r.Key)]; ok && n < prev {
					t.Errorf("key %s: %d after %d", r.Key, n, prev)
				}
				last[string(r.Key)] = n
			}
			for _, m := range messages(t, db) {
				if m.ID.String() == poisonID {
					if m.State != outbox.StatePending || m.Attempts != 1 || !strings.Contains(m.LastError, "too large") {
						t.Errorf("poison: %s attempts %d error %q", m.State, m.Attempts, m.LastError)
					}
				} else if m.Attempts != 0 {
					t.Errorf("innocent message %s (key %s) was charged %d attempts", m.Payload, m.Key, m.Attempts)
				}
			}
		})
	}
}

// Several workers in one process keep each key's order.
func TestWorkersKeepPerKeyOrder(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 4, "seq")
		const keys, perKey = 20, 30
		for i := range perKey {
			err := db.Transaction(func(tx *gorm.DB) error {
				msgs := make([]outbox.Message, keys)
				for k := range msgs {
					msgs[k] = outbox.Message{Topic: "seq", Key: fmt.Sprint("k", k), Payload: fmt.Sprint(i)}
				}
				return outbox.Enqueue(tx, msgs...)
			})
			if err != nil {
				t.Fatal(err)
			}
		}
		pub, err := outbox.NewPublisher(db, kafkaSender(t, addrs), outbox.WithWorkers(4), outbox.WithBatchSize(7),
			outbox.WithPollInterval(5*time.Millisecond), outbox.WithLogger(discardLogger()))
		if err != nil {
			t.Fatal(err)
		}
		if err := pub.Start(t.Context()); err != nil {
			t.Fatal(err)
		}
		recs := outboxtest.Consume(t, addrs, "seq", keys*perKey, 30*time.Second)
		if err := pub.Stop(t.Context()); err != nil {
			t.Fatal(err)
		}
		if len(recs) != keys*perKey {
			t.Fatalf("consumed %d, want %d", len(recs), keys*perKey)
		}
		next := map[string]int{}
		for _, r := range recs {
			var n int
			if _, err := fmt.Sscan(string(r.Value), &n); err != nil {
				t.Fatalf("value %q is not a number: %v", r.Value, err)
			}
			if n != next[string(r.Key)] {
				t.Fatalf("key %s: got %d, want %d", r.Key, n, next[string(r.Key)])
			}
			next[string(r.Key)]++
		}
		_ = kafka.MessageIDHeader
	})
}
