package outbox_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/kafka"
	"github.com/gorm-outbox/outbox/outboxtest"
)

func TestPublisherDeliversCommittedOnlyToKafka(t *testing.T) {
	for _, d := range databases {
		t.Run(d.name, func(t *testing.T) {
			db := setup(t, d.open(t, nil))
			_, addrs := outboxtest.Kafka(t, 3, "orders")
			const committed = 250
			for i := range committed {
				err := db.Transaction(func(tx *gorm.DB) error {
					if err := tx.Create(&Account{Name: fmt.Sprint("a", i)}).Error; err != nil {
						return err
					}
					return outbox.Enqueue(tx, outbox.Message{
						Topic: "orders", Key: fmt.Sprint("order-", i%7), Payload: map[string]int{"n": i},
						Headers: map[string]string{"type": "order.created", "seq": fmt.Sprint(i)},
					})
				})
				if err != nil {
					t.Fatal(err)
				}
			}
			for i := range 20 { // rolled back: must never reach Kafka
				_ = db.Transaction(func(tx *gorm.DB) error {
					if err := outbox.Enqueue(tx, outbox.Message{Topic: "orders", Key: "rolled-back", Payload: fmt.Sprint("rb", i)}); err != nil {
						return err
					}
					return fmt.Errorf("roll back")
				})
			}
			pub, err := outbox.NewPublisher(db, kafkaSender(t, addrs), outbox.WithBatchSize(64), outbox.WithPollInterval(10*time.Millisecond))
			if err != nil {
				t.Fatal(err)
			}
			if err := pub.Start(t.Context()); err != nil {
				t.Fatal(err)
			}
			recs := outboxtest.Consume(t, addrs, "orders", committed, 30*time.Second)
			if err := pub.Stop(t.Context()); err != nil {
				t.Fatal(err)
			}
			if len(recs) != committed {
				t.Fatalf("consumed %d records, want %d", len(recs), committed)
			}
			if n := len(outboxtest.ReadAll(t, addrs, "orders", committed, 300*time.Millisecond)); n != committed {
				t.Fatalf("topic holds %d records, want %d", n, committed)
			}
			byID := map[string]outbox.OutboxMessage{}
			for _, m := range messages(t, db) {
				byID[m.ID.String()] = m
			}
			partitionOfKey := map[string]int32{}
			for _, r := range recs {
				id, ok := outboxtest.Header(r, kafka.MessageIDHeader)
				if !ok {
					t.Fatalf("record without %s header", kafka.MessageIDHeader)
				}
				m, ok := byID[id]
				if !ok {
					t.Fatalf("record %s is not a committed message", id)
				}
				if m.State != outbox.StatePublished || m.PublishedAt == nil {
					t.Errorf("message %s is %s, want published with a time", id, m.State)
				}
				if string(r.Key) != m.Key || string(r.Value) != string(m.Payload) {
					t.Errorf("record %s: key %q value %q, want %q %q", id, r.Key, r.Value, m.Key, m.Payload)
				}
				if v, _ := outboxtest.Header(r, "type"); v != "order.created" {
					t.Errorf("record %s: type header %q", id, v)
				}
				if v, _ := outboxtest.Header(r, "seq"); v != m.Headers["seq"] {
					t.Errorf("record %s: seq header %q, want %q", id, v, m.Headers["seq"])
				}
				if p, seen := partitionOfKey[m.Key]; seen && p != r.Partition {
					t.Errorf("key %s on partitions %d and %d", m.Key, p, r.Partition)
				}
				partitionOfKey[m.Key] = r.Partition
				delete(byID, id)
			}
			if len(byID) != 0 {
				t.Fatalf("%d committed messages never arrived", len(byID))
			}
		})
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

var _ = context.Background

func TestDeleteOnPublishKeepsOnlyWhatWasNotDelivered(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		// The broker refuses one message, too large, so that it fails and must stay.
		cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, "orders"),
			kfake.BrokerConfigs(map[string]string{"message.max.bytes": "4096"}))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(cluster.Close)
		addrs := cluster.ListenAddrs()
		poison := strings.Repeat("p", 8000)
		err = db.Transaction(func(tx *gorm.DB) error {
			msgs := []outbox.Message{{Topic: "orders", Key: "p", Payload: poison}}
			for i := range 40 {
				msgs = append(msgs, outbox.Message{Topic: "orders", Key: fmt.Sprint("k", i%5), Payload: fmt.Sprint("m", i)})
			}
			return outbox.Enqueue(tx, msgs...)
		})
		if err != nil {
			t.Fatal(err)
		}
		// The backoff outlasts the test: on a loaded machine the loop below
		// could otherwise reach the refused message's second attempt.
		pub, err := outbox.NewPublisher(db, kafkaSender(t, addrs), outbox.WithBatchSize(16),
			outbox.WithRetryPolicy(outbox.RetryPolicy{MaxAttempts: 10, MinBackoff: time.Hour, MaxBackoff: time.Hour}))
		if err != nil {
			t.Fatal(err)
		}
		for {
			res, err := pub.PublishOnce(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			if res.Claimed == 0 {
				break
			}
		}
		if n := len(outboxtest.ReadAll(t, addrs, "orders", 40, 300*time.Millisecond)); n != 40 {
			t.Fatalf("topic holds %d records, want 40", n)
		}
		left := messages(t, db)
		if len(left) != 1 || string(left[0].Payload) != poison || left[0].State != outbox.StatePending ||
			left[0].Attempts != 1 || left[0].LastError == "" {
			t.Fatalf("table holds %+v, want only the refused message, pending with its error", left)
		}
	}, outbox.WithDeleteOnPublish())
}
