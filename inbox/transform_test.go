package inbox_test

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/inbox"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// A handler that enqueues to the outbox commits its events with the
// message's record: an attempt that fails after enqueuing leaves no event,
// a parked message none, and each applied message exactly one.
func TestConsumeTransformProduce(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		if err := db.Use(outbox.Plugin()); err != nil {
			t.Fatalf("db.Use(outbox.Plugin()): %v", err)
		}
		_, addrs := outboxtest.Kafka(t, 2, "orders")
		g := group(t)
		const n = 12
		var recs []record
		for i := range n {
			recs = append(recs, record{key: fmt.Sprint("k", i%3), value: fmt.Sprint("v-", i), id: fmt.Sprint("id-", i)})
		}
		recs = append(recs, record{key: "poison", value: "poison", id: "id-poison"})
		produce(t, addrs, "orders", recs...)

		var seen calls
		apply := applier(nil)
		h := func(tx *gorm.DB, m inbox.Message) error {
			seen.add(m.ID)
			if err := outbox.Enqueue(tx, outbox.Message{Topic: "invoices", Key: string(m.Key), Payload: "invoice for " + m.ID}); err != nil {
				return err
			}
			if err := apply(tx, m); err != nil {
				return err
			}
			if seen.get(m.ID) == 1 || string(m.Value) == "poison" {
				return errors.New("failing after enqueuing")
			}
			return nil
		}
		consume(t, db, addrs, g, []string{"orders"}, h, fastRetries)
		waitFor(t, time.Minute, "every message applied and the poison parked", func() (bool, string) {
			rows := inboxRows(t, db, g)
			applied := countRows(t, db, inbox.DefaultTableName, "consumer_group = ? AND state = ?", g, "applied")
			return applied == n && rows["id-poison"].State == "parked", states(rows)
		})
		var payloads []string
		if err := db.Table(outbox.DefaultTableName).Pluck("payload", &payloads).Error; err != nil {
			t.Fatal(err)
		}
		byPayload := map[string]int{}
		for _, p := range payloads {
			byPayload[p]++
		}
		if len(payloads) != n {
			t.Errorf("%d outbox rows, want %d (one per applied message): %v", len(payloads), n, byPayload)
		}
		for i := range n {
			if p := fmt.Sprint("invoice for id-", i); byPayload[p] != 1 {
				t.Errorf("%d outbox rows for id-%d, want 1", byPayload[p], i)
			}
			if seen.get(fmt.Sprint("id-", i)) < 2 {
				t.Errorf("id-%d: handler called %d times; its first attempt was to fail", i, seen.get(fmt.Sprint("id-", i)))
			}
		}
		if byPayload["invoice for id-poison"] != 0 {
			t.Errorf("the parked message left %d outbox rows", byPayload["invoice for id-poison"])
		}
		for id, k := range appliedByID(t, db) {
			if k != 1 || id == "id-poison" {
				t.Errorf("%s has %d domain rows", id, k)
			}
		}
	})
}
