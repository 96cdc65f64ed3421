package kafka_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/IBM/sarama"
	"github.com/google/uuid"
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
			var want []string
			err := db.Transaction(func(tx *gorm.DB) error {
				var msgs []outbox.Message
				for i := range 40 {
					want = append(want, fmt.Sprint("event-", i))
					msgs = append(msgs, outbox.Message{Topic: "eo", Key: fmt.Sprint("key-", i%4), Payload: want[i]})
				}
				return outbox.Enqueue(tx, msgs...)
			})
			if err != nil {
				t.Fatal(err)
			}
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
			heir, err := outbox.NewPublisher(db, newTransactional(t, addrs, id))
			if err != nil {
				t.Fatal(err)
			}
			for range 3 {
				if _, err := heir.PublishOnce(t.Context()); err != nil {
					t.Fatal(err)
				}
			}
			close(wake)
			if err := <-zombieErr; !errors.Is(err, outbox.ErrFenced) {
				t.Errorf("the zombie's commit ended with %v, want an error wrapping outbox.ErrFenced", err)
			}
			got := map[string]int{}
			for _, r := range outboxtest.ReadAll(t, addrs, "eo", len(want), 2*time.Second) {
				got[string(r.Value)]++
			}
			for _, w := range want {
				if got[w] != 1 {
					t.Errorf("%s read %d times with read_committed, want once", w, got[w])
				}
			}
			if len(got) != len(want) {
				t.Errorf("read %d distinct events, want %d", len(got), len(want))
			}
		})
	}
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
