// Package hooks lets GORM models record domain events that the outbox plugin
// writes in the same transaction as the model's row.
//
// Embed Events in a model and record events in its methods or GORM hooks:
//
//	type Order struct {
//		ID     uint
//		Status string
//		hooks.Events
//	}
//
//	func (o *Order) Pay() {
//		o.Status = "paid"
//		o.Record(outbox.Message{Topic: "orders", Key: fmt.Sprint(o.ID), Payload: o})
//	}
//
// After db.Save(&order) (or Create, Update, Delete), and before GORM commits,
// the plugin writes the recorded events and clears them, so each is written
// exactly once. If the statement fails, they stay recorded and the
// transaction rolls back.
package hooks

import "github.com/gorm-outbox/outbox"

// Events records domain events on a model. Its zero value is ready to use and
// it has no exported fields, so GORM gives it no column.
type Events struct {
	events []outbox.Message
}

// Record adds events to be written with the model's next create, update or delete.
func (e *Events) Record(msgs ...outbox.Message) { e.events = append(e.events, msgs...) }

// RecordEvent is Record for one event given by its parts.
func (e *Events) RecordEvent(topic, key string, payload any) {
	e.Record(outbox.Message{Topic: topic, Key: key, Payload: payload})
}

// RecordedEvents implements outbox.EventRecorder.
func (e *Events) RecordedEvents() []outbox.Message {
	if e == nil {
		return nil
	}
	return e.events
}

// ClearRecordedEvents implements outbox.EventRecorder.
func (e *Events) ClearRecordedEvents() {
	if e != nil {
		e.events = nil
	}
}

var _ outbox.EventRecorder = (*Events)(nil)
