package hooks_test

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/glebarez/sqlite"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/hooks"
)

type Order struct {
	ID           uint
	Status       string
	hooks.Events // records events; no column
}

// Pay changes the order and records the event that says so.
func (o *Order) Pay() {
	o.Status = "paid"
	o.Record(outbox.Message{Topic: "orders", Key: fmt.Sprint(o.ID), Payload: map[string]string{"status": o.Status}})
}

func ExampleEvents() {
	dir, _ := os.MkdirTemp("", "hooks-example")
	defer os.RemoveAll(dir)
	db, err := gorm.Open(sqlite.Open(filepath.Join(dir, "app.db")), &gorm.Config{Logger: logger.Discard})
	if err != nil {
		panic(err)
	}
	if err := db.Use(outbox.Plugin()); err != nil {
		panic(err)
	}
	_ = db.AutoMigrate(&Order{})

	order := Order{Status: "new"}
	db.Create(&order)
	order.Pay()
	// The plugin writes the recorded event in Save's transaction, then clears it.
	if err := db.Save(&order).Error; err != nil {
		panic(err)
	}
	var events []outbox.OutboxMessage
	db.Table(outbox.DefaultTableName).Find(&events)
	for _, e := range events {
		fmt.Println(e.Topic, e.Key, string(e.Payload))
	}
	fmt.Println(len(order.RecordedEvents()), "left to write")
	// Output:
	// orders 1 {"status":"paid"}
	// 0 left to write
}
