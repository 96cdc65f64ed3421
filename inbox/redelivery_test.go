package inbox_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/outboxtest"
)

// A group that reads everything again (its offsets deleted, as after a
// crash before the commit) finds every message recorded: the handler is not
// called again, nothing is written twice, and each one counts as a
// duplicate.
func TestRedeliveryIsSkipped(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		const partitions, n = 3, 30
		_, addrs := outboxtest.Kafka(t, partitions, "orders")
		g := group(t)
		var recs []*kgo.Record
		for i := range n {
			id := ""
			if i%2 == 0 { // half are identified by their place in Kafka
				id = fmt.Sprint("id-", i)
			}
			recs = append(recs, rec(fmt.Sprint("k", i%5), fmt.Sprint("v-", i), id))
		}
		produceRecords(t, addrs, "orders", recs...)

		var seen calls
		first := consume(t, db, addrs, g, []string{"orders"}, applier(&seen))
		waitFor(t, time.Minute, "every message applied", func() (bool, string) {
			got := countRows(t, db, "applieds", "")
			return got >= n, fmt.Sprintf("%d applied", got)
		})
		stop(t, first)
		admin := saramaAdmin(t, addrs)
		// Stop committed what was applied: without deleting the group, a
		// restart would read nothing again and the test would prove nothing.
		if got := committedOffsets(t, admin, g, "orders", partitions); got != n {
			t.Fatalf("the group committed offsets summing to %d after Stop, want %d", got, n)
		}
		before := inboxRows(t, db, g)
		deleteGroup(t, admin, g)

		reader, mp := meter()
		consume(t, db, addrs, g, []string{"orders"}, applier(&seen), mp)
		waitFor(t, time.Minute, "every message redelivered", func() (bool, string) {
			sums, _ := metricValues(t, reader)
			return sums["inbox.messages.duplicates"] >= n, fmt.Sprintf("metrics %v", sums)
		})
		time.Sleep(300 * time.Millisecond) // a message applied again would show now

		sums, _ := metricValues(t, reader)
		if sums["inbox.messages.consumed"] != n || sums["inbox.messages.duplicates"] != n || sums["inbox.messages.applied"] != 0 {
			t.Errorf("after the redelivery: consumed %d, duplicates %d, applied %d; want %d, %d, 0",
				sums["inbox.messages.consumed"], sums["inbox.messages.duplicates"], sums["inbox.messages.applied"], n, n)
		}
		byID := appliedByID(t, db)
		if len(byID) != n {
			t.Errorf("%d messages have domain rows, want %d", len(byID), n)
		}
		for id, k := range byID {
			if k != 1 {
				t.Errorf("message %s written %d times", id, k)
			}
			if c := seen.get(id); c != 1 {
				t.Errorf("message %s: handler called %d times", id, c)
			}
		}
		after := inboxRows(t, db, g)
		if len(after) != len(before) || len(after) != n {
			t.Fatalf("the inbox holds %d rows after the redelivery, %d before, want %d", len(after), len(before), n)
		}
		for id, b := range before {
			a := after[id]
			if a.State != "applied" || a.Attempts != b.Attempts || !a.ProcessedAt.Equal(b.ProcessedAt) {
				t.Errorf("message %s: row %+v became %+v", id, b, a)
			}
		}
	})
}
