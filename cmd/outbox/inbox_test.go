package main_test

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/inbox"
	"github.com/gorm-outbox/outbox/internal/databases"
	"github.com/gorm-outbox/outbox/internal/inboxstore"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// populateInbox registers the inbox on db and records, for group billing,
// 3 applied messages, 1 parked and 1 held behind it; for group shipping,
// 1 applied and 1 parked on another topic.
func populateInbox(t *testing.T, db *gorm.DB) {
	t.Helper()
	if err := db.Use(inbox.Plugin()); err != nil {
		t.Fatal(err)
	}
	d, err := databases.Named(db.Dialector.Name())
	if err != nil {
		t.Fatal(err)
	}
	store := inboxstore.New(db, inbox.DefaultTableName, d.Inbox)
	at := time.Now().UTC().Add(-time.Hour)
	row := func(group, id, topic string, offset int64, key, state string, attempts int, lastErr string) *inboxstore.Row {
		at = at.Add(time.Second) // List's order: the order received
		r := &inboxstore.Row{ConsumerGroup: group, MessageID: id, Topic: topic, Offset: offset, Key: []byte(key),
			State: state, Attempts: attempts, LastError: lastErr, ReceivedAt: at, ProcessedAt: at}
		if state != inboxstore.Applied {
			r.Payload = []byte(`{"order":"` + key + `"}`)
		}
		return r
	}
	rows := []*inboxstore.Row{
		row("billing", "m1", "orders", 0, "k0", inboxstore.Applied, 1, ""),
		row("billing", "m2", "orders", 1, "k1", inboxstore.Parked, 5, "no such customer"),
		row("billing", "m3", "orders", 2, "k1", inboxstore.Held, 0, ""),
		row("billing", "m4", "orders", 3, "k2", inboxstore.Applied, 1, ""),
		row("billing", "m5", "orders", 4, "k3", inboxstore.Applied, 2, ""),
		row("shipping", "m1", "orders", 0, "k0", inboxstore.Applied, 1, ""),
		row("shipping", "r1", "returns", 0, "k9", inboxstore.Parked, 5, "carrier refused"),
	}
	if err := db.Transaction(func(tx *gorm.DB) error { return store.Insert(tx, rows) }); err != nil {
		t.Fatal(err)
	}
}

// statusLine returns the fields of the status line that starts with name.
func statusLine(out, name string) []string {
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) > 0 && f[0] == name {
			return f
		}
	}
	return nil
}

func TestInboxCommand(t *testing.T) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) {
			db, dsn := b.open(t)
			populate(t, db)
			populateInbox(t, db)

			r := runCmd(t, dsn, "", "status")
			if r.code != 0 || !strings.Contains(r.stdout, "pending            3") || !strings.Contains(r.stdout, "inbox table inbox_messages") ||
				strings.Join(statusLine(r.stdout, "group"), " ") != "group applied parked held retry" ||
				strings.Join(statusLine(r.stdout, "billing"), " ") != "billing 3 1 1 0" ||
				strings.Join(statusLine(r.stdout, "shipping"), " ") != "shipping 1 1 0 0" {
				t.Fatalf("status: %+v", r)
			}
			r = runCmd(t, dsn, "", "status", "--json")
			var st struct {
				Pending float64
				Inbox   struct {
					Table  string
					Groups map[string]map[string]int64
				}
			}
			if err := json.Unmarshal([]byte(r.stdout), &st); err != nil || st.Pending != 3 || st.Inbox.Table != inbox.DefaultTableName ||
				st.Inbox.Groups["billing"]["parked"] != 1 || st.Inbox.Groups["billing"]["applied"] != 3 || st.Inbox.Groups["shipping"]["retry"] != 0 {
				t.Fatalf("status --json: %v %+v", err, r)
			}

			r = runCmd(t, dsn, "", "inbox", "list", "--group", "billing", "--state", "parked")
			lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
			if r.code != 0 || len(lines) != 2 || !strings.HasPrefix(lines[0], "ID ") || !strings.HasPrefix(lines[1], "m2 ") ||
				!strings.Contains(lines[1], "no such customer") || strings.Contains(lines[1], `{"order"`) {
				t.Fatalf("inbox list --group --state: %+v", r)
			}
			if f := strings.Fields(lines[1]); len(f) < 8 || strings.Join(f[:8], " ") != "m2 billing parked orders 0 1 k1 5" {
				t.Fatalf("inbox list: the row reads %q", lines[1])
			}
			r = runCmd(t, dsn, "", "inbox", "list", "--state", "held", "--payload")
			if r.code != 0 || strings.Count(r.stdout, "\n") != 2 || !strings.Contains(r.stdout, `{"order":"k1"}`) {
				t.Fatalf("inbox list --payload: %+v", r)
			}
			r = runCmd(t, dsn, "", "inbox", "list", "--topic", "returns")
			if r.code != 0 || strings.Count(r.stdout, "\n") != 2 || !strings.Contains(r.stdout, "carrier refused") {
				t.Fatalf("inbox list --topic: %+v", r)
			}
			r = runCmd(t, dsn, "", "inbox", "list", "--limit", "2")
			if r.code != 0 || strings.Count(r.stdout, "\n") != 3 || !strings.Contains(r.stdout, "m2 ") || !strings.Contains(r.stderr, "--limit") {
				t.Fatalf("inbox list --limit 2: %+v", r)
			}
			r = runCmd(t, dsn, "", "inbox", "list")
			if r.code != 0 || strings.Count(r.stdout, "\n") != 8 || r.stderr != "" {
				t.Fatalf("inbox list: %+v", r)
			}

			// An id given twice is one message, and one that is not parked,
			// or not the group's, is named.
			r = runCmd(t, dsn, "", "inbox", "retry", "--group", "billing", "m2", "m2", "m3", "r1")
			if r.code != 1 || !strings.Contains(r.stdout, "retrying 1 parked messages of group billing") ||
				!strings.Contains(r.stderr, "m3 is not parked") || !strings.Contains(r.stderr, "no message r1 in group billing") {
				t.Fatalf("inbox retry ids: %+v", r)
			}
			r = runCmd(t, dsn, "", "inbox", "list", "--state", "retry")
			if r.code != 0 || strings.Count(r.stdout, "\n") != 2 || !strings.Contains(r.stdout, "m2 ") {
				t.Fatalf("inbox list --state retry: %+v", r)
			}
			r = runCmd(t, dsn, "", "inbox", "retry", "--group", "shipping", "--parked")
			if r.code != 0 || !strings.Contains(r.stdout, "retrying 1 parked messages of group shipping") {
				t.Fatalf("inbox retry --parked: %+v", r)
			}
			r = runCmd(t, dsn, "", "inbox", "retry", "--group", "shipping", "--parked")
			if r.code != 0 || !strings.Contains(r.stdout, "retrying 0 parked") {
				t.Fatalf("inbox retry --parked with none parked: %+v", r)
			}
			r = runCmd(t, dsn, "", "status")
			if strings.Join(statusLine(r.stdout, "billing"), " ") != "billing 3 0 1 1" || strings.Join(statusLine(r.stdout, "shipping"), " ") != "shipping 1 0 0 1" {
				t.Fatalf("status after the retries: %+v", r)
			}

			r = runCmd(t, dsn, "", "--inbox-table", "nope", "inbox", "list")
			if r.code != 1 || !strings.Contains(r.stderr, `inbox table "nope" does not exist`) {
				t.Fatalf("missing inbox table: %+v", r)
			}
			r = runCmd(t, dsn, "", "--inbox-table", "nope", "status")
			if r.code != 1 || !strings.Contains(r.stderr, `inbox table "nope" does not exist`) {
				t.Fatalf("status with a missing inbox table named: %+v", r)
			}
		})
	}
}

// TestStatusWithOneTable: an application with only an outbox sees the
// status it always saw; one with only an inbox sees the inbox's, and the
// outbox's commands say that its table is missing.
func TestStatusWithOneTable(t *testing.T) {
	dir := t.TempDir()
	outboxOnly := filepath.Join(dir, "outbox.db")
	db, err := gorm.Open(sqliteDialector(outboxOnly), &gorm.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s, _ := db.DB(); s.Close() })
	populate(t, db)
	r := runCmd(t, outboxOnly, "", "status")
	if r.code != 0 || !strings.Contains(r.stdout, "pending            3") || strings.Contains(r.stdout, "inbox") {
		t.Fatalf("status without an inbox: %+v", r)
	}
	r = runCmd(t, outboxOnly, "", "status", "--json")
	var st map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil || st["pending"] != 3.0 || st["inbox"] != nil {
		t.Fatalf("status --json without an inbox: %v %+v", err, r)
	}
	r = runCmd(t, outboxOnly, "", "inbox", "list")
	if r.code != 1 || !strings.Contains(r.stderr, `inbox table "inbox_messages" does not exist`) {
		t.Fatalf("inbox list without an inbox: %+v", r)
	}

	inboxOnly := filepath.Join(dir, "inbox.db")
	db, err = gorm.Open(sqliteDialector(inboxOnly), &gorm.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s, _ := db.DB(); s.Close() })
	if err := db.Use(inbox.Plugin()); err != nil {
		t.Fatal(err)
	}
	r = runCmd(t, inboxOnly, "", "status")
	if r.code != 0 || r.stdout != "inbox table inbox_messages\n  no messages\n" {
		t.Fatalf("status of an empty inbox alone: %+v", r)
	}
	r = runCmd(t, inboxOnly, "", "status", "--json")
	st = nil
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil || st["inbox"] == nil || st["pending"] != nil {
		t.Fatalf("status --json of an inbox alone: %v %+v", err, r)
	}
	r = runCmd(t, inboxOnly, "", "--table", outbox.DefaultTableName, "status")
	if r.code != 1 || !strings.Contains(r.stderr, `table "outbox_messages" does not exist`) {
		t.Fatalf("status with the missing outbox table named: %+v", r)
	}
	r = runCmd(t, inboxOnly, "", "list")
	if r.code != 1 || !strings.Contains(r.stderr, `table "outbox_messages" does not exist`) {
		t.Fatalf("list of an inbox alone: %+v", r)
	}

	neither := filepath.Join(dir, "neither.db")
	db, err = gorm.Open(sqliteDialector(neither), &gorm.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s, _ := db.DB(); s.Close() })
	if err := db.Exec("CREATE TABLE t (x int)").Error; err != nil {
		t.Fatal(err)
	}
	r = runCmd(t, neither, "", "status")
	if r.code != 1 || !strings.Contains(r.stderr, `table "outbox_messages" does not exist`) {
		t.Fatalf("status of neither table: %+v", r)
	}
}

// TestInboxRetryReachesTheConsumer: a message parked by a running consumer
// is applied by it after `outbox inbox retry`.
func TestInboxRetryReachesTheConsumer(t *testing.T) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) {
			db, dsn := b.open(t)
			if err := db.Use(inbox.Plugin()); err != nil {
				t.Fatal(err)
			}
			type Invoice struct {
				ID    uint
				Order string `gorm:"size:64"`
			}
			if err := db.AutoMigrate(&Invoice{}); err != nil {
				t.Fatal(err)
			}
			_, addrs := outboxtest.Kafka(t, 1, "orders")
			var broken atomic.Bool
			broken.Store(true)
			c, err := inbox.NewConsumer(db, addrs, "billing", []string{"orders"}, func(tx *gorm.DB, m inbox.Message) error {
				if broken.Load() {
					return io.ErrUnexpectedEOF
				}
				return tx.Create(&Invoice{Order: string(m.Key) + " " + string(m.Value)}).Error
			}, inbox.WithRetryPolicy(outbox.RetryPolicy{MaxAttempts: 1}), inbox.WithRetryCheckInterval(50*time.Millisecond),
				inbox.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
			if err != nil {
				t.Fatal(err)
			}
			if err := c.Start(context.Background()); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				if err := c.Stop(ctx); err != nil {
					t.Errorf("Stop: %v", err)
				}
			})
			produceTo(t, addrs, "orders", "o-7", "placed", "paid")

			waitUntil(t, "the first message parked and the second held behind it", func() bool {
				r := runCmd(t, dsn, "", "status")
				return strings.Join(statusLine(r.stdout, "billing"), " ") == "billing 0 1 1 0"
			})
			broken.Store(false)
			r := runCmd(t, dsn, "", "inbox", "retry", "--group", "billing", "--parked")
			if r.code != 0 || !strings.Contains(r.stdout, "retrying") {
				t.Fatalf("inbox retry: %+v", r)
			}
			waitUntil(t, "both applied", func() bool {
				r := runCmd(t, dsn, "", "status")
				return strings.Join(statusLine(r.stdout, "billing"), " ") == "billing 2 0 0 0"
			})
			var orders []string
			if err := db.Model(&Invoice{}).Order("id").Pluck("order", &orders).Error; err != nil {
				t.Fatal(err)
			}
			if strings.Join(orders, ",") != "o-7 placed,o-7 paid" {
				t.Fatalf("invoices for %q, want placed then paid, once each", orders)
			}
		})
	}
}

// produceTo writes a record of key per value to topic, in order, with a
// client other than the consumer's.
func produceTo(t *testing.T, addrs []string, topic, key string, values ...string) {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(addrs...), kgo.DefaultProduceTopic(topic))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, v := range values {
		if err := cl.ProduceSync(ctx, &kgo.Record{Key: []byte(key), Value: []byte(v)}).FirstErr(); err != nil {
			t.Fatal(err)
		}
	}
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited a minute for %s", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
