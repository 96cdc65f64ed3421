package inbox_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/inbox"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// While the inbox table cannot be written (renamed away, so that every
// transaction fails in the database and none in the handler), consumption
// pauses: messages that arrive meanwhile are neither applied, skipped nor
// parked, and no attempt is counted against them. Once the table is back,
// every message is applied exactly once.
func TestDatabaseFailurePausesWithoutLosingMessages(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 2, "orders")
		g := group(t)
		reader, mp := meter()
		var logs logBuffer
		var seen calls
		produceN := func(from, to int) {
			var recs []record
			for i := from; i < to; i++ {
				recs = append(recs, record{key: fmt.Sprint("k", i%4), value: fmt.Sprint("v-", i), id: fmt.Sprint("id-", i)})
			}
			produce(t, addrs, "orders", recs...)
		}
		produceN(0, 10)
		consume(t, db, addrs, g, []string{"orders"}, applier(&seen), mp, logs.option(), fastRetries,
			inbox.WithRetryCheckInterval(50*time.Millisecond))
		waitFor(t, time.Minute, "the first messages applied", func() (bool, string) {
			n := countRows(t, db, "applieds", "")
			return n == 10, fmt.Sprintf("%d applied", n)
		})

		if err := db.Exec("ALTER TABLE " + inbox.DefaultTableName + " RENAME TO inbox_away").Error; err != nil {
			t.Fatalf("renaming the inbox away: %v", err)
		}
		produceN(10, 30)
		waitFor(t, time.Minute, "the consumer to meet the missing table", func() (bool, string) {
			return strings.Contains(logs.String(), "database transaction failed"), "no database failure logged yet"
		})
		time.Sleep(500 * time.Millisecond) // a few more failed tries
		if n := countRows(t, db, "applieds", ""); n != 10 {
			t.Errorf("%d domain rows while the inbox is away, want the first 10", n)
		}
		if err := db.Exec("ALTER TABLE inbox_away RENAME TO " + inbox.DefaultTableName).Error; err != nil {
			t.Fatalf("renaming the inbox back: %v", err)
		}

		// The pause after a failure grows to 5 s.
		waitFor(t, time.Minute, "every message applied", func() (bool, string) {
			n := countRows(t, db, "applieds", "")
			return n >= 30, fmt.Sprintf("%d applied", n)
		})
		time.Sleep(300 * time.Millisecond) // a message applied twice would show now
		byID := appliedByID(t, db)
		for i := range 30 {
			if id := fmt.Sprint("id-", i); byID[id] != 1 {
				t.Errorf("%s applied %d times", id, byID[id])
			}
		}
		rows := inboxRows(t, db, g)
		if len(rows) != 30 {
			t.Errorf("the inbox records %d messages, want 30", len(rows))
		}
		for id, r := range rows {
			if r.State != "applied" || r.Attempts != 1 {
				t.Errorf("%s: state %s after %d attempts, want applied at the first", id, r.State, r.Attempts)
			}
		}
		sums, _ := metricValues(t, reader)
		if sums["inbox.handler.failures"] != 0 || sums["inbox.messages.parked"] != 0 || sums["inbox.messages.duplicates"] != 0 {
			t.Errorf("handler failures %d, parked %d, duplicates %d; want none", sums["inbox.handler.failures"],
				sums["inbox.messages.parked"], sums["inbox.messages.duplicates"])
		}
	})
}
