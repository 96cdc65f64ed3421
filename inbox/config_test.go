package inbox_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/inbox"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// accept is a handler for consumers that are never started.
func accept(*gorm.DB, inbox.Message) error { return nil }

// Every misuse of NewConsumer is an error that names it, not a panic.
func TestNewConsumerRefusesBadInput(t *testing.T) {
	db := setup(t, outboxtest.SQLite(t, nil))
	bare := outboxtest.SQLite(t, nil)
	brokers, topics := []string{"127.0.0.1:9092"}, []string{"orders"}
	for _, tc := range []struct {
		name string
		make func() (*inbox.Consumer, error)
		want string
	}{
		{"no plugin", func() (*inbox.Consumer, error) { return inbox.NewConsumer(bare, brokers, "g", topics, accept) }, "not registered"},
		{"nil db", func() (*inbox.Consumer, error) { return inbox.NewConsumer(nil, brokers, "g", topics, accept) }, "nil"},
		{"nil handler", func() (*inbox.Consumer, error) { return inbox.NewConsumer(db, brokers, "g", topics, nil) }, "handler is nil"},
		{"nil batch handler", func() (*inbox.Consumer, error) { return inbox.NewBatchConsumer(db, brokers, "g", topics, nil) }, "handler is nil"},
		{"no brokers", func() (*inbox.Consumer, error) { return inbox.NewConsumer(db, nil, "g", topics, accept) }, "broker"},
		{"empty broker", func() (*inbox.Consumer, error) { return inbox.NewConsumer(db, []string{" "}, "g", topics, accept) }, "broker"},
		{"empty group", func() (*inbox.Consumer, error) { return inbox.NewConsumer(db, brokers, "", topics, accept) }, "group"},
		{"blank group", func() (*inbox.Consumer, error) { return inbox.NewConsumer(db, brokers, "  ", topics, accept) }, "group"},
		{"long group", func() (*inbox.Consumer, error) {
			return inbox.NewConsumer(db, brokers, strings.Repeat("g", 256), topics, accept)
		}, "255"},
		{"no topics", func() (*inbox.Consumer, error) { return inbox.NewConsumer(db, brokers, "g", nil, accept) }, "topic"},
		{"empty topic", func() (*inbox.Consumer, error) { return inbox.NewConsumer(db, brokers, "g", []string{""}, accept) }, "topic"},
		{"nil option", func() (*inbox.Consumer, error) {
			return inbox.NewConsumer(db, brokers, "g", topics, accept, quiet, nil)
		}, "option 2 of 2 is nil"},
		{"negative batch size", func() (*inbox.Consumer, error) {
			return inbox.NewConsumer(db, brokers, "g", topics, accept, inbox.WithBatchSize(-1))
		}, "batch size"},
		{"zero key parallelism", func() (*inbox.Consumer, error) {
			return inbox.NewConsumer(db, brokers, "g", topics, accept, inbox.WithKeyParallelism(0))
		}, "parallelism"},
		{"negative retention", func() (*inbox.Consumer, error) {
			return inbox.NewConsumer(db, brokers, "g", topics, accept, inbox.WithRetention(-time.Hour, time.Minute))
		}, "retention"},
		{"zero retention interval", func() (*inbox.Consumer, error) {
			return inbox.NewConsumer(db, brokers, "g", topics, accept, inbox.WithRetention(time.Hour, 0))
		}, "interval"},
		{"zero retry check interval", func() (*inbox.Consumer, error) {
			return inbox.NewConsumer(db, brokers, "g", topics, accept, inbox.WithRetryCheckInterval(0))
		}, "retry check"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := tc.make()
			if err == nil || c != nil {
				t.Fatalf("got %v, %v; want an error", c, err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not say %q", err, tc.want)
			}
		})
	}
}

// Stop on a consumer that never ran does nothing; a running consumer
// refuses to start again, and starts again once stopped.
func TestStartAndStop(t *testing.T) {
	db := setup(t, outboxtest.SQLite(t, nil))
	_, addrs := outboxtest.Kafka(t, 1, "orders")
	g := group(t)
	c, err := inbox.NewConsumer(db, addrs, g, []string{"orders"}, applier(nil), quiet)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Stop(context.Background()); err != nil {
		t.Errorf("Stop before Start: %v", err)
	}
	var none *inbox.Consumer
	if err := none.Stop(context.Background()); err != nil {
		t.Errorf("Stop on nil: %v", err)
	}
	if err := new(inbox.Consumer).Start(context.Background()); err == nil {
		t.Error("a Consumer not made by NewConsumer started")
	}
	if err := c.Start(nil); err == nil { //nolint:staticcheck // a nil context is what is tested
		t.Error("Start(nil) succeeded")
	}
	if err := c.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := c.Start(context.Background()); !errors.Is(err, inbox.ErrConsumerRunning) {
		t.Errorf("second Start: %v, want ErrConsumerRunning", err)
	}
	if err := c.Run(context.Background()); !errors.Is(err, inbox.ErrConsumerRunning) {
		t.Errorf("Run while started: %v, want ErrConsumerRunning", err)
	}
	produce(t, addrs, "orders", record{key: "k", value: "v-1", id: "id-1"})
	waitFor(t, time.Minute, "the first message applied", func() (bool, string) {
		return countRows(t, db, "applieds", "") == 1, "not yet"
	})
	stop(t, c)
	if err := c.Stop(context.Background()); err != nil {
		t.Errorf("second Stop: %v", err)
	}
	// Stopped, it starts again and goes on from where it left.
	run(t, c)
	produce(t, addrs, "orders", record{key: "k", value: "v-2", id: "id-2"})
	waitFor(t, time.Minute, "the second message applied", func() (bool, string) {
		n := countRows(t, db, "applieds", "")
		return n == 2, fmt.Sprintf("%d applied", n)
	})
}

// The plugin refuses a table name that is not a plain identifier, and
// Retry refuses a database without the plugin or an empty group.
func TestPluginAndRetryRefuseBadInput(t *testing.T) {
	db := outboxtest.SQLite(t, nil)
	for _, name := range []string{"bad name", "", "x;drop", "a.b.c", strings.Repeat("t", 64)} {
		if err := db.Use(inbox.Plugin(inbox.WithTableName(name))); err == nil || !strings.Contains(err.Error(), "table name") {
			t.Errorf("db.Use(inbox.Plugin(inbox.WithTableName(%q))) = %v, want an error about the table name", name, err)
		}
	}
	if err := db.Use(inbox.Plugin(nil)); err == nil || !strings.Contains(err.Error(), "is nil") {
		t.Errorf("db.Use(inbox.Plugin(nil)) = %v, want an error about the nil option", err)
	}
	if _, err := inbox.Retry(context.Background(), db, "g"); err == nil {
		t.Error("Retry without the plugin succeeded")
	}
	db = setup(t, db)
	if _, err := inbox.Retry(context.Background(), db, ""); err == nil {
		t.Error("Retry of an empty group succeeded")
	}
	if n, err := inbox.Retry(context.Background(), db, "nobody"); err != nil || n != 0 {
		t.Errorf("Retry of a group with nothing parked = %d, %v", n, err)
	}
}

// DDL refuses an unknown database and a bad table name; for each database
// it is statements that create a working inbox for a plugin registered
// WithoutMigration.
func TestDDL(t *testing.T) {
	if _, err := inbox.DDL("oracle", inbox.DefaultTableName); err == nil {
		t.Error("DDL for oracle succeeded")
	}
	if _, err := inbox.DDL("postgres", "bad name"); err == nil {
		t.Error("DDL of a bad table name succeeded")
	}
	mysql, err := inbox.DDL("mysql", "t")
	if err != nil {
		t.Fatal(err)
	}
	if mariadb, err := inbox.DDL("mariadb", "t"); err != nil || !slices.Equal(mariadb, mysql) {
		t.Errorf("DDL for mariadb = %v, %v; want MySQL's", mariadb, err)
	}
	for _, d := range databases {
		t.Run(d.name, func(t *testing.T) {
			// Without migration and without the DDL there is no table.
			bare := d.open(t, nil)
			if err := bare.Use(inbox.Plugin(inbox.WithoutMigration())); err != nil {
				t.Fatal(err)
			}
			if bare.Migrator().HasTable(inbox.DefaultTableName) {
				t.Fatal("WithoutMigration created the table")
			}

			db := d.open(t, nil)
			ddl, err := inbox.DDL(db.Dialector.Name(), "app_inbox")
			if err != nil {
				t.Fatal(err)
			}
			for range 2 { // the statements may run again
				for _, q := range ddl {
					if err := db.Exec(q).Error; err != nil {
						t.Fatalf("%s: %v", q, err)
					}
				}
			}
			db = setup(t, db, inbox.WithTableName("app_inbox"), inbox.WithoutMigration())
			_, addrs := outboxtest.Kafka(t, 1, "orders")
			g := group(t)
			produce(t, addrs, "orders", record{key: "k", value: "v-1", id: "id-1"}, record{key: "k", value: "v-1", id: "id-1"},
				record{key: "k", value: "v-2", id: "id-2"})
			consume(t, db, addrs, g, []string{"orders"}, applier(nil))
			waitFor(t, time.Minute, "two messages applied in app_inbox", func() (bool, string) {
				n := countRows(t, db, "app_inbox", "consumer_group = ? AND state = ?", g, "applied")
				return n == 2, fmt.Sprintf("%d recorded", n)
			})
			if n := countRows(t, db, "applieds", ""); n != 2 {
				t.Errorf("%d domain rows, want 2", n)
			}
			if db.Migrator().HasTable(inbox.DefaultTableName) {
				t.Error("the default table was created beside app_inbox")
			}
		})
	}
}
