package kafka_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/IBM/sarama"
	"github.com/google/uuid"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kmsg"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/kafka"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// A zombie: a publisher paused between its transaction's sends and its
// commit, past its slot's lease. Another publisher takes the slot over,
// which fences it, and sends the same messages. When the zombie wakes and
// commits, the broker must refuse: read_committed readers see each message
// once.
func TestTransactionalSenderFencesAZombieThatWakesAfterATakeover(t *testing.T) {
	for _, d := range []struct {
		name string
		open func(testing.TB, *gorm.Config) *gorm.DB
	}{{"postgres", outboxtest.Postgres}, {"mariadb", outboxtest.MariaDB}} {
		t.Run(d.name, func(t *testing.T) {
			db := d.open(t, nil)
			if err := db.Use(outbox.Plugin()); err != nil {
				t.Fatal(err)
			}
			_, addrs := outboxtest.Kafka(t, 3, "eo")
			want := events(40, "event-%d")
			enqueueInOneTransaction(t, db, "eo", want, 4)
			id := "zombie-" + uuid.NewString()[:8]
			zombieSender := newTransactional(t, addrs, id)
			blocked, wake := make(chan struct{}), make(chan struct{})
			var once sync.Once
			kafka.PauseBeforeCommit(zombieSender, func() {
				once.Do(func() {
					close(blocked)
					<-wake
				})
			})
			zombie, err := outbox.NewPublisher(db, zombieSender, outbox.WithLease(500*time.Millisecond))
			if err != nil {
				t.Fatal(err)
			}
			zombieErr := make(chan error, 1)
			go func() {
				_, err := zombie.PublishOnce(context.Background())
				zombieErr <- err
			}()
			<-blocked
			time.Sleep(700 * time.Millisecond) // past the zombie's slot lease
			heir, err := outbox.NewPublisher(anotherProcess(t, db), newTransactional(t, addrs, id))
			if err != nil {
				t.Fatal(err)
			}
			// The zombie's rows are free once the database has ended its
			// idle transaction: after the lease, in whole seconds on MariaDB.
			for deadline := time.Now().Add(10 * time.Second); countRows(t, db, "state = 'pending'") > 0; {
				if time.Now().After(deadline) {
					t.Fatal("the heir did not publish the zombie's messages within 10s")
				}
				if _, err := heir.PublishOnce(t.Context()); err != nil {
					t.Fatal(err)
				}
				time.Sleep(50 * time.Millisecond)
			}
			close(wake)
			if err := <-zombieErr; !errors.Is(err, outbox.ErrFenced) {
				t.Errorf("the zombie's commit ended with %v, want an error wrapping outbox.ErrFenced", err)
			}
			expectEachOnce(t, addrs, "eo", want)
		})
	}
}

// anotherProcess is db as another process has it: a pool of its own, and
// the plugin registered on it. A process's publishers know the rows its own
// claims hold, even one whose transaction the database has ended.
func anotherProcess(t testing.TB, db *gorm.DB) *gorm.DB {
	t.Helper()
	other, err := gorm.Open(db.Dialector, &gorm.Config{Logger: db.Logger})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if sqlDB, err := other.DB(); err == nil {
			_ = sqlDB.Close()
		}
	})
	if err := other.Use(outbox.Plugin()); err != nil {
		t.Fatal(err)
	}
	return other
}

func newTransactional(t testing.TB, addrs []string, id string) *kafka.TransactionalSender {
	t.Helper()
	s, err := kafka.NewTransactionalSender(addrs, id, nil, kafka.WithSlots(1))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func TestNewTransactionalSenderSaysWhatIsWrong(t *testing.T) {
	old := kafka.NewConfig()
	old.Version = sarama.V0_10_2_0
	for _, c := range []struct {
		name    string
		brokers []string
		id      string
		cfg     *sarama.Config
		opts    []kafka.TransactionalOption
		want    string
	}{
		{"no broker", nil, "x", nil, nil, "no broker addresses"},
		{"empty broker", []string{" "}, "x", nil, nil, "broker address 1 of 1 is empty"},
		{"no transactional id", []string{"b:9092"}, " ", nil, nil, "transactional id is empty"},
		{"a version without transactions", []string{"b:9092"}, "x", old, nil, "at least 0.11"},
		{"no slot", []string{"b:9092"}, "x", nil, []kafka.TransactionalOption{kafka.WithSlots(0)}, "slots (WithSlots) must be positive"},
		{"nil option", []string{"b:9092"}, "x", nil, []kafka.TransactionalOption{nil}, "option 1 of 1 is nil"},
		{"no marker topic", []string{"b:9092"}, "x", nil, []kafka.TransactionalOption{kafka.WithMarkerTopic("")}, "marker topic (WithMarkerTopic) is empty"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := kafka.NewTransactionalSender(c.brokers, c.id, c.cfg, c.opts...)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want an error saying %q", err, c.want)
			}
		})
	}
	s, err := kafka.NewTransactionalSender([]string{"b:9092"}, "orders-outbox", nil)
	if err != nil {
		t.Fatal(err)
	}
	if s.Slots() != kafka.DefaultSlots || s.TransactionalID(3) != "orders-outbox-3" || s.MarkerTopic() != "orders-outbox-markers" {
		t.Errorf("slots %d, id %q, marker topic %q", s.Slots(), s.TransactionalID(3), s.MarkerTopic())
	}
	if err := s.Send(t.Context(), nil); err == nil {
		t.Error("Send outside a publisher succeeded")
	}
}

// A broker that is down when a slot opens is an outage: it costs nothing
// and the publisher retries.
func TestTransactionalSenderReportsAnUnreachableBroker(t *testing.T) {
	s, err := kafka.NewTransactionalSender([]string{"127.0.0.1:1"}, "down", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	if _, err := s.OpenSlot(ctx, 0); !errors.Is(err, outbox.ErrBrokerUnavailable) {
		t.Fatalf("OpenSlot with no broker: %v, want an error wrapping outbox.ErrBrokerUnavailable", err)
	}
}

// A transaction that fails as a whole, here the broker refusing to add the
// batch's marker to it (sarama adds it at the commit), is no message's
// fault: the publisher reports the broker's failure, no message is charged
// an attempt, and the next tries deliver every message once.
func TestTransactionalSenderChargesNoAttemptForAFailedMarker(t *testing.T) {
	db := outboxtest.Postgres(t, nil)
	if err := db.Use(outbox.Plugin()); err != nil {
		t.Fatal(err)
	}
	cluster, addrs := outboxtest.Kafka(t, 3, "eo")
	want := events(20, "event-%d")
	enqueueInOneTransaction(t, db, "eo", want, 4)
	var refused atomic.Int32
	cluster.ControlKey(int16(kmsg.AddOffsetsToTxn), func(kreq kmsg.Request) (kmsg.Response, error, bool) {
		refused.Add(1)
		resp := kreq.(*kmsg.AddOffsetsToTxnRequest).ResponseKind().(*kmsg.AddOffsetsToTxnResponse)
		resp.ErrorCode = kerr.GroupAuthorizationFailed.Code // abortable: the transaction is aborted, the producer kept
		return resp, nil, true
	})
	pub, err := outbox.NewPublisher(db, newTransactional(t, addrs, "marker-"+uuid.NewString()[:8]),
		outbox.WithPollInterval(20*time.Millisecond), outbox.WithMaxPause(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	if err := pub.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = pub.Stop(context.Background()) }()
	deadline := time.Now().Add(20 * time.Second)
	for countRows(t, db, "state <> ?", outbox.StatePublished) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d messages still not published after 20s", countRows(t, db, "state <> ?", outbox.StatePublished))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := pub.Stop(t.Context()); err != nil {
		t.Fatal(err)
	}
	if refused.Load() != 1 {
		t.Fatalf("the refusal ran %d times, want once (the test refuses one marker)", refused.Load())
	}
	if n := countRows(t, db, "attempts > 0"); n != 0 {
		t.Errorf("the refused transaction charged %d messages an attempt, want none", n)
	}
	expectEachOnce(t, addrs, "eo", want)
}

// events returns n distinct payloads, format given the index.
func events(n int, format string) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf(format, i)
	}
	return out
}

// enqueueInOneTransaction enqueues payloads to topic in one database
// transaction, over keys keys.
func enqueueInOneTransaction(t testing.TB, db *gorm.DB, topic string, payloads []string, keys int) {
	t.Helper()
	err := db.Transaction(func(tx *gorm.DB) error {
		msgs := make([]outbox.Message, len(payloads))
		for i, p := range payloads {
			msgs[i] = outbox.Message{Topic: topic, Key: fmt.Sprint("key-", i%keys), Payload: p}
		}
		return outbox.Enqueue(tx, msgs...)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// expectEachOnce reads topic with read_committed and checks that it holds
// each of want once, and nothing else.
func expectEachOnce(t testing.TB, addrs []string, topic string, want []string) {
	t.Helper()
	got := map[string]int{}
	for _, r := range outboxtest.ReadAll(t, addrs, topic, len(want), 2*time.Second) {
		got[string(r.Value)]++
	}
	for _, w := range want {
		if got[w] != 1 {
			t.Errorf("%.20s read %d times with read_committed, want once", w, got[w])
		}
	}
	if len(got) != len(want) {
		t.Errorf("read %d distinct events, want %d", len(got), len(want))
	}
}

// countRows counts the outbox rows that match where.
func countRows(t testing.TB, db *gorm.DB, where string, args ...any) int64 {
	t.Helper()
	var n int64
	if err := db.Table(outbox.DefaultTableName).Where(where, args...).Count(&n).Error; err != nil {
		t.Fatal(err)
	}
	return n
}
