package outbox_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/outboxtest"
)

func enqueueN(t *testing.T, db *gorm.DB, topic string, n int) {
	t.Helper()
	enqueueKeyed(t, db, topic, n, func(i int) string { return fmt.Sprint("k", i%3) })
}

// enqueueKeyed enqueues n messages in one transaction, the i-th with key(i)
// and payload m<i>.
func enqueueKeyed(t *testing.T, db *gorm.DB, topic string, n int, key func(i int) string) {
	t.Helper()
	err := db.Transaction(func(tx *gorm.DB) error {
		msgs := make([]outbox.Message, n)
		for i := range msgs {
			msgs[i] = outbox.Message{Topic: topic, Key: key(i), Payload: fmt.Sprint("m", i)}
		}
		return outbox.Enqueue(tx, msgs...)
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestPublisherRetriesARefusedBatchWithBackoff(t *testing.T) {
	for _, d := range databases {
		t.Run(d.name, func(t *testing.T) {
			db := setup(t, d.open(t, nil))
			cluster, addrs := outboxtest.Kafka(t, 1, "payments")
			var refusing atomic.Bool
			refusing.Store(true)
			outboxtest.RejectProduce(cluster, kerr.InvalidRecord.Code, refusing.Load)
			enqueueN(t, db, "payments", 3)

			pub, err := outbox.NewPublisher(db, kafkaSender(t, addrs),
				outbox.WithRetryPolicy(outbox.RetryPolicy{MaxAttempts: 5, MinBackoff: 400 * time.Millisecond, MaxBackoff: time.Second}))
			if err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			res, err := pub.PublishOnce(t.Context())
			if err != nil || res.Claimed != 3 || res.Failed != 3 || res.Published != 0 {
				t.Fatalf("first pass: %+v, %v", res, err)
			}
			for _, m := range messages(t, db) {
				if m.State != outbox.StatePending || m.Attempts != 1 || m.ClaimToken != nil {
					t.Errorf("after a refusal: state %s attempts %d claim %v", m.State, m.Attempts, m.ClaimToken)
				}
				if !strings.Contains(m.LastError, "failed the validation") {
					t.Errorf("last error %q does not carry the broker's error", m.LastError)
				}
				// Backoff of the first retry: between half and all of MinBackoff.
				if wait := m.NextAttemptAt.Sub(start); wait < 150*time.Millisecond || wait > 2*time.Second {
					t.Errorf("next attempt in %v, want about 200-400ms", wait)
				}
			}
			if res, err := pub.PublishOnce(t.Context()); err != nil || res.Claimed != 0 {
				t.Fatalf("a message in backoff was claimed: %+v %v", res, err)
			}
			refusing.Store(false)
			published := 0
			waitFor(t, "the retries to publish", func() bool {
				res, err := pub.PublishOnce(t.Context())
				if err != nil || res.Failed != 0 {
					t.Fatalf("retry: %+v, %v", res, err)
				}
				published += res.Published
				return published == 3
			})
			for _, m := range messages(t, db) {
				if m.State != outbox.StatePublished || m.Attempts != 1 || m.LastError == "" {
					t.Errorf("after the retry: state %s attempts %d last error %q", m.State, m.Attempts, m.LastError)
				}
			}
			if got := len(outboxtest.Consume(t, addrs, "payments", 3, 10*time.Second)); got != 3 {
				t.Fatalf("consumed %d, want 3", got)
			}
		})
	}
}

func TestPublisherDeadAfterMaxAttemptsThenRequeued(t *testing.T) {
	for _, d := range databases {
		t.Run(d.name, func(t *testing.T) {
			db := setup(t, d.open(t, nil))
			cluster, addrs := outboxtest.Kafka(t, 1, "refunds")
			var refusing atomic.Bool
			refusing.Store(true)
			outboxtest.RejectProduce(cluster, kerr.PolicyViolation.Code, refusing.Load)
			enqueueN(t, db, "refunds", 4)
			pub, err := outbox.NewPublisher(db, kafkaSender(t, addrs),
				outbox.WithRetryPolicy(outbox.RetryPolicy{MaxAttempts: 3, MinBackoff: time.Millisecond, MaxBackoff: time.Millisecond}))
			if err != nil {
				t.Fatal(err)
			}
			dead := 0
			waitFor(t, "messages to die", func() bool {
				res, err := pub.PublishOnce(t.Context())
				if err != nil {
					t.Fatal(err)
				}
				dead += res.Dead
				time.Sleep(5 * time.Millisecond)
				return dead == 4
			})
			store, _ := outbox.StoreOf(db)
			deadMsgs, err := store.List(t.Context(), outbox.ListOptions{State: outbox.StateDead})
			if err != nil || len(deadMsgs) != 4 {
				t.Fatalf("dead list: %d, %v", len(deadMsgs), err)
			}
			for _, m := range deadMsgs {
				if m.Attempts != 3 || m.LastError == "" {
					t.Errorf("dead message: attempts %d, last error %q", m.Attempts, m.LastError)
				}
			}
			if res, _ := pub.PublishOnce(t.Context()); res.Claimed != 0 {
				t.Fatal("a dead message was claimed")
			}
			refusing.Store(false)
			n, err := store.Requeue(t.Context(), deadMsgs[0].ID, deadMsgs[1].ID)
			if err != nil || n != 2 {
				t.Fatalf("requeue: %d, %v", n, err)
			}
			if n, err := store.RequeueDead(t.Context(), "other-topic"); err != nil || n != 0 {
				t.Fatalf("requeue of another topic: %d, %v", n, err)
			}
			if n, err := store.RequeueDead(t.Context(), "refunds"); err != nil || n != 2 {
				t.Fatalf("requeue of the topic: %d, %v", n, err)
			}
			res, err := pub.PublishOnce(t.Context())
			if err != nil || res.Published != 4 {
				t.Fatalf("after requeue: %+v %v", res, err)
			}
			if got := len(outboxtest.Consume(t, addrs, "refunds", 4, 10*time.Second)); got != 4 {
				t.Fatalf("consumed %d, want 4", got)
			}
		})
	}
}

func TestPublisherMarksOnlyTheFailedPartOfABatch(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 2, "exists") // "missing" is never created
		err := db.Transaction(func(tx *gorm.DB) error {
			return outbox.Enqueue(tx,
				outbox.Message{Topic: "exists", Key: "a", Payload: "1"},
				outbox.Message{Topic: "missing", Key: "b", Payload: "2"},
				outbox.Message{Topic: "exists", Key: "c", Payload: "3"})
		})
		if err != nil {
			t.Fatal(err)
		}
		pub, err := outbox.NewPublisher(db, kafkaSender(t, addrs))
		if err != nil {
			t.Fatal(err)
		}
		res, err := pub.PublishOnce(t.Context())
		if err != nil || res.Published != 2 || res.Failed != 1 {
			t.Fatalf("result %+v, %v; want 2 published, 1 failed", res, err)
		}
		for _, m := range messages(t, db) {
			want := outbox.StatePublished
			if m.Topic == "missing" {
				want = outbox.StatePending
				if m.Attempts != 1 || m.LastError == "" {
					t.Errorf("failed message: attempts %d, last error %q", m.Attempts, m.LastError)
				}
			}
			if m.State != want {
				t.Errorf("%s: %s, want %s", m.Topic, m.State, want)
			}
		}
		if n := len(outboxtest.ReadAll(t, addrs, "exists", 2, 300*time.Millisecond)); n != 2 {
			t.Fatalf("topic holds %d, want 2", n)
		}
	})
}

func TestPublisherBrokerDownCostsNoAttempt(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		cluster, addrs := outboxtest.Kafka(t, 1, "audit")
		sender := kafkaSender(t, addrs)
		cluster.Close()
		enqueueN(t, db, "audit", 5)
		pub, err := outbox.NewPublisher(db, sender, outbox.WithRetryPolicy(outbox.RetryPolicy{MaxAttempts: 1}))
		if err != nil {
			t.Fatal(err)
		}
		res, err := pub.PublishOnce(t.Context())
		if !errors.Is(err, outbox.ErrBrokerUnavailable) || res.Released != 5 || res.Failed != 0 {
			t.Fatalf("result %+v, err %v; want 5 released with ErrBrokerUnavailable", res, err)
		}
		for _, m := range messages(t, db) {
			if m.State != outbox.StatePending || m.Attempts != 0 || m.ClaimToken != nil || m.NextAttemptAt.After(time.Now()) {
				t.Errorf("after an outage: %s attempts %d claim %v next %v", m.State, m.Attempts, m.ClaimToken, m.NextAttemptAt)
			}
		}
	})
}

// gatedSender holds every Send until the gate opens (or its context ends),
// to stop a publisher in the middle of a batch. It wraps the real sender.
type gatedSender struct {
	inner   outbox.Sender
	started chan struct{}
	gate    chan struct{}
	calls   atomic.Int32
}

func (g *gatedSender) Send(ctx context.Context, msgs []*outbox.OutboxMessage) error {
	if g.calls.Add(1) == 1 {
		close(g.started)
	}
	select {
	case <-g.gate:
	case <-ctx.Done():
		return ctx.Err()
	}
	return g.inner.Send(ctx, msgs)
}

func TestPublisherGracefulStopMidBatchLosesNothing(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 1, "ledger")
		enqueueN(t, db, "ledger", 25)
		g := &gatedSender{inner: kafkaSender(t, addrs), started: make(chan struct{}), gate: make(chan struct{})}
		pub, err := outbox.NewPublisher(db, g, outbox.WithBatchSize(10))
		if err != nil {
			t.Fatal(err)
		}
		if err := pub.Start(t.Context()); err != nil {
			t.Fatal(err)
		}
		<-g.started
		stopped := make(chan error)
		go func() { stopped <- pub.Stop(context.Background()) }()
		select {
		case err := <-stopped:
			t.Fatalf("Stop returned (%v) while a batch was being sent", err)
		case <-time.After(200 * time.Millisecond):
		}
		close(g.gate)
		if err := <-stopped; err != nil {
			t.Fatal(err)
		}
		counts := map[outbox.State]int{}
		for _, m := range messages(t, db) {
			counts[m.State]++
			if m.ClaimToken != nil {
				t.Errorf("message %s still claimed after Stop", m.ID)
			}
		}
		if counts[outbox.StatePublished] != 10 || counts[outbox.StatePending] != 15 {
			t.Fatalf("after Stop: %v, want the batch in flight published and the rest pending", counts)
		}
		if n := len(outboxtest.ReadAll(t, addrs, "ledger", 10, 300*time.Millisecond)); n != 10 {
			t.Fatalf("topic holds %d, want the 10 of the batch in flight", n)
		}
		// A new publisher takes over the rest.
		pub2, err := outbox.NewPublisher(db, kafkaSender(t, addrs), outbox.WithPollInterval(10*time.Millisecond))
		if err != nil {
			t.Fatal(err)
		}
		if err := pub2.Start(t.Context()); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = pub2.Stop(context.Background()) }()
		if got := len(outboxtest.Consume(t, addrs, "ledger", 25, 20*time.Second)); got != 25 {
			t.Fatalf("consumed %d, want 25", got)
		}
	})
}

func TestPublisherStopDeadlineHandsTheClaimBack(t *testing.T) {
	db := setup(t, outboxtest.SQLite(t, nil))
	enqueueN(t, db, "t", 3)
	g := &gatedSender{inner: outbox.SenderFunc(func(context.Context, []*outbox.OutboxMessage) error { return nil }),
		started: make(chan struct{}), gate: make(chan struct{})}
	pub, err := outbox.NewPublisher(db, g)
	if err != nil {
		t.Fatal(err)
	}
	if err := pub.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	<-g.started
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := pub.Stop(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Stop = %v, want the deadline's error", err)
	}
	for _, m := range messages(t, db) {
		if m.State != outbox.StatePending || m.Attempts != 0 {
			t.Errorf("aborted message: %s attempts %d", m.State, m.Attempts)
		}
	}
	if err := pub.Start(t.Context()); err != nil { // it can be started again
		t.Fatal(err)
	}
	if err := pub.Start(t.Context()); !errors.Is(err, outbox.ErrPublisherRunning) {
		t.Fatalf("second Start = %v", err)
	}
	if err := pub.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
}
