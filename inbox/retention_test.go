package inbox_test

import (
	"fmt"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/inbox"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// Retention deletes the group's applied rows older than the window, and
// keeps the applied rows inside it, every parked, held or retried row
// however old, and other groups' rows.
func TestRetentionDeletesOnlyOldAppliedRows(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 1, "orders")
		g := group(t)
		now := time.Now().UTC()
		row := func(group, id, state string, age time.Duration) inboxRow {
			at := now.Add(-age)
			r := inboxRow{ConsumerGroup: group, MessageID: id, Topic: "elsewhere", Offset: 1, Key: []byte("k-" + id),
				State: state, ReceivedAt: at, ProcessedAt: at}
			if state != "applied" {
				r.Payload, r.Attempts, r.LastError = []byte("kept"), 3, "refused"
			}
			return r
		}
		var rows []inboxRow
		// More than one retention batch (1000 rows), the youngest just
		// outside the window. SQLite, pure Go under the race detector, writes
		// them slowly; the other databases cover the batches.
		old := 1100
		if db.Dialector.Name() == "sqlite" {
			old = 50
		}
		for i := range old {
			rows = append(rows, row(g, fmt.Sprint("old-", i), "applied", time.Hour+time.Minute+time.Duration(i)*time.Second))
		}
		rows = append(rows,
			row(g, "recent-1", "applied", 59*time.Minute),
			row(g, "recent-2", "applied", time.Minute),
			row(g, "parked", "parked", 30*24*time.Hour),
			row(g, "held", "held", 30*24*time.Hour),
			row(g, "retry", "retry", 30*24*time.Hour),
			row("another-group", "old-other", "applied", 30*24*time.Hour),
		)
		err := db.Transaction(func(tx *gorm.DB) error { return tx.Table(inbox.DefaultTableName).CreateInBatches(&rows, 50).Error })
		if err != nil {
			t.Fatalf("inserting old rows: %v", err)
		}
		produce(t, addrs, "orders", record{key: "k", value: "v-1", id: "fresh"})
		consume(t, db, addrs, g, []string{"orders"}, applier(nil), inbox.WithRetention(time.Hour, 20*time.Millisecond))
		waitFor(t, time.Minute, "the old applied rows deleted and the fresh message applied", func() (bool, string) {
			left := countRows(t, db, inbox.DefaultTableName, "consumer_group = ? AND message_id LIKE ?", g, "old-%")
			fresh := countRows(t, db, inbox.DefaultTableName, "consumer_group = ? AND message_id = ? AND state = ?", g, "fresh", "applied")
			return left == 0 && fresh == 1, fmt.Sprintf("%d old rows left, fresh applied: %d", left, fresh)
		})
		time.Sleep(200 * time.Millisecond) // ten more rounds of retention
		got := inboxRows(t, db, g)
		for id, state := range map[string]string{"recent-1": "applied", "recent-2": "applied", "fresh": "applied",
			"parked": "parked", "held": "held", "retry": "retry"} {
			r, ok := got[id]
			if !ok || r.State != state {
				t.Errorf("row %s: present %v, state %q; want kept as %s", id, ok, r.State, state)
			}
			if state != "applied" && string(r.Payload) != "kept" {
				t.Errorf("row %s lost its payload: %q", id, r.Payload)
			}
		}
		if len(got) != 6 {
			t.Errorf("the group keeps %d rows, want 6: %s", len(got), states(got))
		}
		if n := len(inboxRows(t, db, "another-group")); n != 1 {
			t.Errorf("another group's old row: %d rows left, want 1", n)
		}
	})
}
