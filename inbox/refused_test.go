package inbox_test

import (
	"strings"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/inbox"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// A message whose transaction the database refuses, while it answers, is
// parked with the database's error instead of stopping its partition: here
// a handler that swallows its statement's error, which leaves PostgreSQL's
// transaction aborted, so that its commit fails outside the handler.
func TestMessageTheDatabaseRefusesIsParkedNotRetriedForever(t *testing.T) {
	db := setup(t, outboxtest.Postgres(t, nil))
	_, addrs := outboxtest.Kafka(t, 1, "orders")
	g := group(t)
	produce(t, addrs, "orders",
		record{key: "a", value: "0", id: "id-0"},
		record{key: "b", value: "poison", id: "id-poison"},
		record{key: "c", value: "2", id: "id-2"})
	consume(t, db, addrs, g, []string{"orders"}, func(tx *gorm.DB, m inbox.Message) error {
		if string(m.Value) == "poison" {
			_ = tx.Exec("SELECT 1/0").Error // swallowed: the transaction stays aborted
			return nil
		}
		return tx.Create(&Applied{MessageID: m.ID, Key: string(m.Key)}).Error
	}, fastRetries)
	waitFor(t, time.Minute, "the poison parked and the others applied", func() (bool, string) {
		rows := inboxRows(t, db, g)
		return rows["id-poison"].State == "parked" && rows["id-0"].State == "applied" && rows["id-2"].State == "applied", states(rows)
	})
	if p := inboxRows(t, db, g)["id-poison"]; p.Attempts != 3 || p.LastError == "" {
		t.Errorf("parked after %d attempts with error %q; want 3 and the commit's error", p.Attempts, p.LastError)
	}
	got := appliedByID(t, db)
	if got["id-0"] != 1 || got["id-2"] != 1 || got["id-poison"] != 0 {
		t.Errorf("applied %v; want id-0 and id-2 once, the poison never", got)
	}
	if strings.Contains(inboxRows(t, db, g)["id-poison"].LastError, "\x00") {
		t.Error("the recorded error holds a NUL byte")
	}
}
