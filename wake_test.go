package outbox_test

import (
	"context"
	"database/sql"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// ackClock wraps the Kafka sender and notes when each message was acknowledged.
type ackClock struct {
	inner outbox.Sender
	mu    sync.Mutex
	acked map[uuid.UUID]time.Time
	cond  *sync.Cond
}

func newAckClock(inner outbox.Sender) *ackClock {
	a := &ackClock{inner: inner, acked: map[uuid.UUID]time.Time{}}
	a.cond = sync.NewCond(&a.mu)
	return a
}

func (a *ackClock) Send(ctx context.Context, msgs []*outbox.OutboxMessage) error {
	err := a.inner.Send(ctx, msgs)
	now := time.Now()
	a.mu.Lock()
	if err == nil {
		for _, m := range msgs {
			a.acked[m.ID] = now
		}
	}
	a.cond.Broadcast()
	a.mu.Unlock()
	return err
}

// count is how many messages have been acknowledged.
func (a *ackClock) count() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.acked)
}

// startClockedPublisher starts a publisher on db that sends through clock,
// with opts after a discarding logger, and stops it when the test ends.
func startClockedPublisher(tb testing.TB, db *gorm.DB, clock *ackClock, opts ...outbox.PublisherOption) {
	tb.Helper()
	pub, err := outbox.NewPublisher(db, clock, append([]outbox.PublisherOption{outbox.WithLogger(discardLogger())}, opts...)...)
	if err != nil {
		tb.Fatal(err)
	}
	if err := pub.Start(context.Background()); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = pub.Stop(context.Background()) })
}

func TestPublishersWakeWhenATransactionCommits(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 1, "wake", "orders", "invoices")
		clock := newAckClock(kafkaSender(t, addrs))
		// A poll interval no test would wait for: only a wake-up can deliver.
		startClockedPublisher(t, db, clock, outbox.WithPollInterval(time.Hour))
		time.Sleep(50 * time.Millisecond) // the first, empty poll is over

		err := outbox.Transaction(db, func(tx *gorm.DB) error {
			return outbox.Enqueue(tx, outbox.Message{Topic: "wake", Payload: "from outbox.Transaction"})
		})
		if err != nil {
			t.Fatal(err)
		}
		waitFor(t, "outbox.Transaction's commit to wake the publisher", func() bool { return clock.count() == 1 })

		// GORM's own transaction around a model with recorded events.
		o := &Order{}
		o.Place("placed")
		if err := db.Create(o).Error; err != nil {
			t.Fatal(err)
		}
		waitFor(t, "Create's commit to wake the publisher", func() bool { return clock.count() == 2 })

		// A model whose own hook enqueues, inside outbox.Transaction.
		err = outbox.Transaction(db, func(tx *gorm.DB) error { return tx.Create(&Invoice{Amount: 3}).Error })
		if err != nil {
			t.Fatal(err)
		}
		waitFor(t, "a hook's enqueue in outbox.Transaction to wake the publisher", func() bool { return clock.count() == 3 })
		// And one in GORM's own transaction: the hook shares its statement.
		if err := db.Create(&Invoice{Amount: 4}).Error; err != nil {
			t.Fatal(err)
		}
		waitFor(t, "a hook's commit to wake the publisher", func() bool { return clock.count() == 4 })
	})
}

// Inside a plain db.Transaction no callback sees the commit; the enqueue
// nudges the publishers to look again shortly. NOTIFY is off here, so on
// PostgreSQL too only the nudge can deliver before the hour-long poll.
func TestEnqueueInAPlainTransactionNudgesThePublishers(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 1, "nudge")
		clock := newAckClock(kafkaSender(t, addrs))
		startClockedPublisher(t, db, clock, outbox.WithPollInterval(time.Hour), outbox.WithoutListen())
		time.Sleep(50 * time.Millisecond) // the first, empty poll is over
		for i := range 3 {
			err := db.Transaction(func(tx *gorm.DB) error {
				if err := outbox.Enqueue(tx, outbox.Message{Topic: "nudge", Payload: fmt.Sprint("plain ", i)}); err != nil {
					return err
				}
				if i == 2 {
					// Commits after the nudged look: a later look finds it.
					time.Sleep(50 * time.Millisecond)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			waitFor(t, "a plain transaction's events to leave without a poll", func() bool { return clock.count() == i+1 })
		}
	}, outbox.WithNotifyInterval(0))
}

// BenchmarkCommitToAck measures, on each database, the time from a
// transaction's commit to the broker's acknowledgement of its one event,
// with the wake-ups ("wake": outbox.Transaction, and NOTIFY on PostgreSQL)
// and in a plain db.Transaction with no NOTIFY ("plain": only the enqueue's
// nudge, then the poll, every 100ms by default). It reports p50 and p99 in
// milliseconds.
//
//	go test -run x -bench CommitToAck -benchtime 200x .
func BenchmarkCommitToAck(b *testing.B) {
	for _, d := range databases {
		for _, mode := range []string{"wake", "plain"} {
			b.Run(d.name+"/"+mode, func(b *testing.B) {
				var opts []outbox.PluginOption
				var popts []outbox.PublisherOption
				if mode == "plain" {
					opts = append(opts, outbox.WithNotifyInterval(0))
					popts = append(popts, outbox.WithoutListen())
				}
				db := setup(b, d.open(b, nil), opts...)
				_, addrs := outboxtest.Kafka(b, 1, "latency")
				clock := newAckClock(kafkaSender(b, addrs))
				startClockedPublisher(b, db, clock, popts...)
				run := db.Transaction
				if mode == "wake" {
					run = func(fn func(tx *gorm.DB) error, _ ...*sql.TxOptions) error { return outbox.Transaction(db, fn) }
				}
				var lat []time.Duration
				for i := 0; b.Loop(); i++ {
					var last []outbox.OutboxMessage
					err := run(func(tx *gorm.DB) error {
						if err := outbox.Enqueue(tx, outbox.Message{Topic: "latency", Key: fmt.Sprint(i), Payload: "x"}); err != nil {
							return err
						}
						return tx.Table(outbox.DefaultTableName).Order("id DESC").Limit(1).Find(&last).Error
					})
					committed := time.Now()
					if err != nil || len(last) != 1 {
						b.Fatal(err)
					}
					id := last[0].ID
					clock.mu.Lock()
					for clock.acked[id].IsZero() {
						clock.cond.Wait()
					}
					lat = append(lat, clock.acked[id].Sub(committed))
					clock.mu.Unlock()
				}
				sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
				ms := func(q float64) float64 { return float64(lat[int(q*float64(len(lat)-1))].Microseconds()) / 1000 }
				b.ReportMetric(ms(0.5), "p50-ms")
				b.ReportMetric(ms(0.99), "p99-ms")
			})
		}
	}
}
