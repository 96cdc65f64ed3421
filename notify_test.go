package outbox_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// openAgain opens a second *gorm.DB on the same schema, with a plugin of its
// own: to the outbox it is another process, which no in-process wake-up
// reaches.
func openAgain(t *testing.T, dsn string, opts ...outbox.PluginOption) *gorm.DB {
	t.Helper()
	db, err := gorm.Open(postgres.Open(dsn), &gorm.Config{Logger: logger.Discard})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if sqlDB, err := db.DB(); err == nil {
			sqlDB.Close()
		}
	})
	return setup(t, db, append([]outbox.PluginOption{outbox.WithoutMigration()}, opts...)...)
}

func TestNotifyWakesPublishersOfOtherProcesses(t *testing.T) {
	for _, listen := range []bool{true, false} {
		name := map[bool]string{true: "listening", false: "WithoutListen"}[listen]
		t.Run(name, func(t *testing.T) {
			enqueuer, dsn := outboxtest.PostgresSchema(t, nil)
			setup(t, enqueuer)
			other := openAgain(t, dsn)
			_, addrs := outboxtest.Kafka(t, 1, "notify")
			clock := newAckClock(kafkaSender(t, addrs))
			opts := []outbox.PublisherOption{outbox.WithPollInterval(time.Hour)}
			if !listen {
				opts = append(opts, outbox.WithoutListen())
			}
			startClockedPublisher(t, other, clock, opts...)
			time.Sleep(200 * time.Millisecond) // the first, empty claims are over

			// A plain db.Transaction, which nothing in-process sees commit.
			err := enqueuer.Transaction(func(tx *gorm.DB) error {
				return outbox.Enqueue(tx, outbox.Message{Topic: "notify", Key: "k", Payload: "hello"})
			})
			if err != nil {
				t.Fatal(err)
			}
			if listen {
				waitFor(t, "the NOTIFY to wake the other process's publisher", func() bool { return clock.count() == 1 })
				return
			}
			time.Sleep(time.Second)
			if n := clock.count(); n != 0 {
				t.Fatalf("a publisher WithoutListen and an hour's poll interval sent %d messages", n)
			}
		})
	}
}

// TestNotifyIsSentOncePerIntervalAndOnlyOnCommit listens on the outbox's
// channel with pgx directly and counts what enqueuing transactions send.
func TestNotifyIsSentOncePerIntervalAndOnlyOnCommit(t *testing.T) {
	db, dsn := outboxtest.PostgresSchema(t, nil)
	setup(t, db, outbox.WithNotifyInterval(time.Hour))
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var channel string
	if err := conn.QueryRow(ctx, "SELECT 'outbox_' || left(md5(current_schema() || '.outbox_messages'), 16)").Scan(&channel); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{channel}.Sanitize()); err != nil {
		t.Fatal(err)
	}
	received := func() int {
		n := 0
		for {
			wctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
			_, err := conn.WaitForNotification(wctx)
			cancel()
			if err != nil {
				if !errors.Is(err, context.DeadlineExceeded) && !pgconnTimeout(err) {
					t.Fatal(err)
				}
				return n
			}
			n++
		}
	}
	enqueue := func(rollback bool) {
		t.Helper()
		err := db.Transaction(func(tx *gorm.DB) error {
			if err := outbox.Enqueue(tx, outbox.Message{Topic: "t", Payload: "x"}); err != nil {
				return err
			}
			if err := outbox.Enqueue(tx, outbox.Message{Topic: "t", Payload: "y"}); err != nil {
				return err
			}
			if rollback {
				return errors.New("roll back")
			}
			return nil
		})
		if rollback != (err != nil) {
			t.Fatalf("transaction: %v", err)
		}
	}
	enqueue(true) // the first NOTIFY of the interval, rolled back with its transaction
	if n := received(); n != 0 {
		t.Fatalf("a rolled-back transaction delivered %d notifications", n)
	}

	// A notifier that has sent nothing yet, for one message per transaction
	// (the NOTIFY rides on the INSERT) and for two (a statement after it).
	for _, batch := range []int{1, 2} {
		fresh := openAgain(t, dsn, outbox.WithNotifyInterval(time.Hour))
		rec := &sqlRecorder{Interface: logger.Discard}
		msgs := []outbox.Message{{Topic: "t", Payload: "x"}, {Topic: "t", Payload: "y"}}[:batch]
		for i := range 20 {
			tdb := fresh
			if i == 0 {
				tdb = fresh.Session(&gorm.Session{Logger: rec})
			}
			if err := tdb.Transaction(func(tx *gorm.DB) error { return outbox.Enqueue(tx, msgs...) }); err != nil {
				t.Fatal(err)
			}
		}
		if n := received(); n != 1 {
			t.Fatalf("20 transactions of %d messages within the interval delivered %d notifications, want 1", batch, n)
		}
		want := 1 // the one-row INSERT notifies: no statement of its own
		if batch > 1 {
			want = 2
		}
		if len(rec.stmt) != want || !strings.Contains(rec.stmt[want-1], "pg_notify") {
			t.Fatalf("the notifying enqueue of %d messages ran %q, want %d statements, the last notifying", batch, rec.stmt, want)
		}
	}

	off := openAgain(t, dsn, outbox.WithNotifyInterval(0))
	if err := off.Transaction(func(tx *gorm.DB) error {
		return outbox.Enqueue(tx, outbox.Message{Topic: "t", Payload: "x"})
	}); err != nil {
		t.Fatal(err)
	}
	if n := received(); n != 0 {
		t.Fatalf("WithNotifyInterval(0) delivered %d notifications", n)
	}
}

// pgconnTimeout reports pgx's wrapping of a context deadline.
func pgconnTimeout(err error) bool {
	var te interface{ Timeout() bool }
	return errors.As(err, &te) && te.Timeout()
}
