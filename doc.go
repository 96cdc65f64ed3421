// Package outbox is a GORM plugin for the transactional outbox: events are
// written in the same database transaction as the domain rows they
// describe, and a Publisher relays the committed ones to a broker (Kafka,
// with the kafka package), so that none is lost between the database and
// the broker and none of a rolled-back transaction is sent.
//
//	if err := db.Use(outbox.Plugin()); err != nil {
//		return err
//	}
//
//	err := outbox.Transaction(db, func(tx *gorm.DB) error {
//		if err := tx.Create(&order).Error; err != nil {
//			return err
//		}
//		return outbox.Enqueue(tx, outbox.Message{Topic: "orders", Key: strconv.FormatUint(uint64(order.ID), 10), Payload: order})
//	})
//
//	sender, err := kafka.NewSender(brokers, nil) // connects at the first send
//	if err != nil {
//		return err
//	}
//	defer sender.Close()
//	pub, err := outbox.NewPublisher(db, sender)
//	if err != nil {
//		return err
//	}
//	if err := pub.Start(ctx); err != nil {
//		return err
//	}
//	defer pub.Stop(context.Background())
//
// Models can also record events (embed hooks.Events) for the plugin to
// write before GORM commits. Delivery is at-least-once with a stable
// message id header, in order per key, with retries, backoff and a dead
// state; PostgreSQL, MariaDB/MySQL and SQLite are supported. The
// repository's docs/guarantees.md states each guarantee and its limits.
package outbox
