package outbox_test

import (
	"log/slog"
	"strings"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// A pool too small to keep the workers' connections idle closes and opens
// them again at every claim: the publisher says so, once, with what to do.
// On a server database: SQLite's workers write in turns, one connection at
// a time.
func TestPublisherWarnsOfAPoolThatChurns(t *testing.T) {
	// A check counts the connections closed since the last one: the
	// interval must be long enough for a churning pool of 4 workers to close
	// more than 4 connections, however slowly connections open.
	const interval = 500 * time.Millisecond
	defer outbox.SetPoolCheckInterval(interval)()
	eachDBWith(t, func(f features) bool { return f.processes }, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 1, "t")
		for _, c := range []struct {
			idle int
			warn bool
		}{{1, true}, {10, false}} {
			sqlDB, err := db.DB()
			if err != nil {
				t.Fatal(err)
			}
			sqlDB.SetMaxIdleConns(c.idle)
			var logs syncBuffer
			pub, err := outbox.NewPublisher(db, kafkaSender(t, addrs), outbox.WithWorkers(4), outbox.WithPollInterval(time.Millisecond),
				outbox.WithLogger(slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))))
			if err != nil {
				t.Fatal(err)
			}
			if err := pub.Start(t.Context()); err != nil {
				t.Fatal(err)
			}
			if c.warn {
				deadline := time.Now().Add(5 * time.Second)
				for !strings.Contains(logs.String(), "SetMaxIdleConns") && time.Now().Before(deadline) {
					time.Sleep(20 * time.Millisecond)
				}
			}
			time.Sleep(3 * interval) // three more checks: a second warning, or a first one, would show
			if err := pub.Stop(t.Context()); err != nil {
				t.Fatal(err)
			}
			if got := strings.Count(logs.String(), "SetMaxIdleConns"); got != map[bool]int{true: 1, false: 0}[c.warn] {
				t.Fatalf("%d idle connections: %d warnings about the pool; logs:\n%s", c.idle, got, logs.String())
			}
		}
	})
}
