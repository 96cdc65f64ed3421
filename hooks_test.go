package outbox_test

import (
	"encoding/json"
	"fmt"
	"testing"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/hooks"
)

// Order records its events declaratively; the plugin writes them.
type Order struct {
	ID     uint
	Status string
	hooks.Events
}

func (o *Order) Place(status string) {
	o.Status = status
	o.RecordEvent("orders", "", map[string]string{"status": status})
}

// Invoice writes its events from its own GORM hooks with the tx they are given.
type Invoice struct {
	ID     uint
	Amount int
}

func (i *Invoice) event(tx *gorm.DB, kind string) error {
	return outbox.Enqueue(tx, outbox.Message{Topic: "invoices", Key: fmt.Sprint(i.ID), Payload: map[string]any{"kind": kind, "amount": i.Amount}})
}

func (i *Invoice) AfterCreate(tx *gorm.DB) error { return i.event(tx, "created") }
func (i *Invoice) AfterUpdate(tx *gorm.DB) error { return i.event(tx, "updated") }
func (i *Invoice) AfterDelete(tx *gorm.DB) error { return i.event(tx, "deleted") }

func kinds(t *testing.T, db *gorm.DB, topic string) map[string]int {
	t.Helper()
	out := map[string]int{}
	for _, m := range messages(t, db) {
		if m.Topic != topic {
			continue
		}
		var p map[string]any
		if err := json.Unmarshal(m.Payload, &p); err != nil {
			t.Fatal(err)
		}
		k, _ := p["kind"].(string)
		if k == "" {
			k, _ = p["status"].(string)
		}
		out[k]++
	}
	return out
}

func TestModelHooksEnqueueInTheirTransaction(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		one := Invoice{Amount: 1}
		if err := db.Create(&one).Error; err != nil {
			t.Fatal(err)
		}
		many := []Invoice{{Amount: 2}, {Amount: 3}, {Amount: 4}}
		if err := db.Create(&many).Error; err != nil {
			t.Fatal(err)
		}
		batch := make([]*Invoice, 7)
		for i := range batch {
			batch[i] = &Invoice{Amount: 10 + i}
		}
		if err := db.CreateInBatches(&batch, 3).Error; err != nil {
			t.Fatal(err)
		}
		one.Amount = 100
		if err := db.Save(&one).Error; err != nil {
			t.Fatal(err)
		}
		if err := db.Delete(&many[0]).Error; err != nil {
			t.Fatal(err)
		}
		got := kinds(t, db, "invoices")
		if got["created"] != 11 || got["updated"] != 1 || got["deleted"] != 1 || len(got) != 3 {
			t.Fatalf("events = %v, want created:11 updated:1 deleted:1", got)
		}
		// The hook's event rolls back with the row.
		err := db.Transaction(func(tx *gorm.DB) error {
			if err := tx.Create(&Invoice{Amount: 5}).Error; err != nil {
				return err
			}
			return fmt.Errorf("business rule failed")
		})
		if err == nil || count(t, db, "invoices") != 10 || len(messages(t, db)) != 13 {
			t.Fatalf("rollback kept rows: err=%v invoices=%d messages=%d", err, count(t, db, "invoices"), len(messages(t, db)))
		}
	})
}

func TestRecordedEventsAreWrittenOnceAndCleared(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		one := &Order{}
		one.Place("single")
		if err := db.Create(one).Error; err != nil {
			t.Fatal(err)
		}
		if len(one.RecordedEvents()) != 0 {
			t.Fatal("events not cleared after Create")
		}
		slice := []Order{{}, {}, {}}
		for i := range slice {
			slice[i].Place("slice")
		}
		if err := db.Create(&slice).Error; err != nil {
			t.Fatal(err)
		}
		batch := make([]Order, 5)
		for i := range batch {
			batch[i].Place("batch")
		}
		if err := db.CreateInBatches(&batch, 2).Error; err != nil {
			t.Fatal(err)
		}
		saved := &Order{}
		saved.Place("save-new")
		if err := db.Save(saved).Error; err != nil { // Save of a new row creates
			t.Fatal(err)
		}
		saved.Place("save-update")
		if err := db.Save(saved).Error; err != nil { // Save of an existing row updates
			t.Fatal(err)
		}
		// Save with a primary key that does not exist yet: GORM updates
		// nothing, then creates. The event must be written exactly once.
		fallback := &Order{ID: 9999}
		fallback.Place("save-fallback")
		if err := db.Save(fallback).Error; err != nil {
			t.Fatal(err)
		}
		saveMany := []Order{{}, {}}
		for i := range saveMany {
			saveMany[i].Place("save-slice")
		}
		if err := db.Save(&saveMany).Error; err != nil {
			t.Fatal(err)
		}
		deleted := slice[0]
		deleted.Place("delete")
		if err := db.Delete(&deleted).Error; err != nil {
			t.Fatal(err)
		}
		// Saving again with nothing recorded writes nothing more.
		if err := db.Save(saved).Error; err != nil {
			t.Fatal(err)
		}
		got := kinds(t, db, "orders")
		want := map[string]int{"single": 1, "slice": 3, "batch": 5, "save-new": 1, "save-update": 1, "save-fallback": 1, "save-slice": 2, "delete": 1}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("events = %v\nwant     %v", got, want)
		}
		for _, o := range append(append(slice, batch...), saveMany...) {
			if len(o.RecordedEvents()) != 0 {
				t.Fatal("events not cleared")
			}
		}
	})
}

func TestRecordedEventsRollBackWithTheRow(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		o := &Order{}
		o.Place("rolled-back")
		err := db.Transaction(func(tx *gorm.DB) error {
			if err := tx.Create(o).Error; err != nil {
				return err
			}
			return fmt.Errorf("abort")
		})
		if err == nil {
			t.Fatal("transaction did not fail")
		}
		if n := count(t, db, "orders"); n != 0 {
			t.Fatalf("orders = %d after rollback", n)
		}
		if n := len(messages(t, db)); n != 0 {
			t.Fatalf("outbox has %d messages after rollback", n)
		}
		// A bad event fails the statement itself, and the row with it.
		bad := &Order{}
		bad.Record(outbox.Message{Topic: "bad topic!", Payload: "x"})
		if err := db.Create(bad).Error; err == nil {
			t.Fatal("Create with an invalid event succeeded")
		}
		if n := count(t, db, "orders"); n != 0 {
			t.Fatalf("orders = %d after a refused event", n)
		}
	})
}
