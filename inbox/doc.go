// Package inbox consumes Kafka topics into a GORM database effectively
// once: each message is applied by the application's handler in a database
// transaction that also records the message's identity in the inbox table,
// and a message already recorded is skipped without calling the handler.
//
// Together with the outbox, a chain of services is effectively-once end to
// end: a handler that calls outbox.Enqueue on its transaction commits the
// message's effects and the events they cause together.
//
//	db.Use(inbox.Plugin())
//	c, err := inbox.NewConsumer(db, brokers, "billing", []string{"orders"},
//		func(tx *gorm.DB, m inbox.Message) error {
//			return tx.Create(&Invoice{OrderID: string(m.Key)}).Error
//		})
//	c.Start(ctx)
//	defer c.Stop(ctx)
//
// A message is identified by its outbox-message-id header (set by the
// outbox's publisher), or by its topic, partition and offset. Offsets are
// committed to Kafka only after the database commit; a redelivery after a
// crash or a rebalance finds the message recorded.
package inbox
