package inbox_test

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/inbox"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// With four transactions at once per partition, each key's messages are
// still applied in order, and every message once.
func TestKeyParallelismKeepsEachKeysOrder(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 1, "orders")
		g := group(t)
		const keys, perKey = 12, 25
		var recs []*kgo.Record
		for i := range perKey {
			for k := range keys {
				recs = append(recs, rec(fmt.Sprint("k", k), fmt.Sprintf("k%d-%d", k, i), fmt.Sprintf("id-%d-%d", k, i)))
			}
		}
		produceRecords(t, addrs, "orders", recs...)
		var seen calls
		var inFlight, most atomic.Int32
		apply := applier(&seen)
		h := func(tx *gorm.DB, m inbox.Message) error {
			n := inFlight.Add(1)
			defer inFlight.Add(-1)
			for {
				prev := most.Load()
				if n <= prev || most.CompareAndSwap(prev, n) {
					break
				}
			}
			return apply(tx, m)
		}
		consume(t, db, addrs, g, []string{"orders"}, h, inbox.WithKeyParallelism(4), inbox.WithBatchSize(40))
		waitFor(t, time.Minute, "every message applied", func() (bool, string) {
			n := countRows(t, db, "applieds", "")
			return n >= keys*perKey, fmt.Sprintf("%d applied", n)
		})
		time.Sleep(300 * time.Millisecond) // a message applied twice would show now
		rows := appliedRows(t, db)
		if len(rows) != keys*perKey {
			t.Fatalf("%d rows applied, want %d", len(rows), keys*perKey)
		}
		for k := range keys {
			got := seqsOf(rows, fmt.Sprint("k", k))
			for i, s := range got {
				if s != i {
					t.Fatalf("key k%d applied in the order %v", k, got)
				}
			}
		}
		for _, r := range rows {
			if n := seen.get(r.MessageID); n != 1 {
				t.Errorf("%s: handler called %d times", r.MessageID, n)
			}
		}
		t.Logf("at most %d handlers ran at once", most.Load())
	})
}

// A batch handler gets the messages already fetched together; when it
// fails on one, the consumer applies the others one at a time and parks
// only the failing one.
func TestBatchHandlerFailureParksOnlyTheFailingMessage(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 1, "orders")
		g := group(t)
		const n = 40
		var recs []*kgo.Record
		for i := range n {
			v := fmt.Sprint("v-", i)
			if i == 7 {
				v = "bad"
			}
			recs = append(recs, rec(fmt.Sprint("k", i), v, fmt.Sprint("id-", i)))
		}
		produceRecords(t, addrs, "orders", recs...)
		var mu sync.Mutex
		var sizes []int
		h := func(tx *gorm.DB, ms []inbox.Message) error {
			mu.Lock()
			sizes = append(sizes, len(ms))
			mu.Unlock()
			rows := make([]Applied, 0, len(ms))
			for _, m := range ms {
				if string(m.Value) == "bad" {
					return errors.New("cannot apply bad")
				}
				rows = append(rows, Applied{MessageID: m.ID, Key: string(m.Key), Seq: seqOfValue(m.Value)})
			}
			return tx.Create(&rows).Error // one statement for the batch
		}
		c, err := inbox.NewBatchConsumer(db, addrs, g, []string{"orders"}, h, quiet, fastRetries, inbox.WithBatchSize(50))
		if err != nil {
			t.Fatal(err)
		}
		run(t, c)
		waitFor(t, time.Minute, "the bad message parked and the others applied", func() (bool, string) {
			rows := inboxRows(t, db, g)
			applied := countRows(t, db, "applieds", "")
			return rows["id-7"].State == "parked" && applied >= n-1, fmt.Sprintf("%d applied; %s", applied, states(rows))
		})
		mu.Lock()
		got := slices.Clone(sizes)
		mu.Unlock()
		if slices.Max(got) < 2 {
			t.Errorf("the handler got batches of %v, never several messages", got)
		}
		byID := appliedByID(t, db)
		for i := range n {
			id, want := fmt.Sprint("id-", i), 1
			if i == 7 {
				want = 0
			}
			if byID[id] != want {
				t.Errorf("%s applied %d times, want %d", id, byID[id], want)
			}
		}
		parked := 0
		for id, r := range inboxRows(t, db, g) {
			if r.State == "parked" {
				parked++
				if id != "id-7" || r.Attempts != 3 || r.LastError != "cannot apply bad" {
					t.Errorf("parked %s after %d attempts with %q", id, r.Attempts, r.LastError)
				}
			}
		}
		if parked != 1 {
			t.Errorf("%d messages parked, want 1", parked)
		}
	})
}
