package outbox_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/glebarez/sqlite"
	"github.com/twmb/franz-go/pkg/kfake"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/kafka"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// exampleDB opens a throwaway SQLite database for the examples.
func exampleDB() (*gorm.DB, func()) {
	dir, err := os.MkdirTemp("", "outbox-example")
	if err != nil {
		panic(err)
	}
	db, err := gorm.Open(sqlite.Open(outboxtest.SQLiteDSN(filepath.Join(dir, "app.db"))),
		&gorm.Config{Logger: logger.Discard})
	if err != nil {
		panic(err)
	}
	return db, func() {
		if sqlDB, err := db.DB(); err == nil {
			sqlDB.Close()
		}
		os.RemoveAll(dir)
	}
}

func ExamplePlugin() {
	db, cleanup := exampleDB()
	defer cleanup()

	// Registers the outbox and migrates its table.
	if err := db.Use(outbox.Plugin(outbox.WithTableName("outbox"))); err != nil {
		panic(err)
	}
	fmt.Println(db.Migrator().HasTable("outbox"))
	// Output: true
}

func ExampleEnqueue() {
	db, cleanup := exampleDB()
	defer cleanup()
	if err := db.Use(outbox.Plugin()); err != nil {
		panic(err)
	}
	type Customer struct {
		ID   uint
		Name string
	}
	_ = db.AutoMigrate(&Customer{})

	// The customer and its event commit together, or neither does.
	err := db.Transaction(func(tx *gorm.DB) error {
		c := Customer{Name: "Ada"}
		if err := tx.Create(&c).Error; err != nil {
			return err
		}
		return outbox.Enqueue(tx, outbox.Message{
			Topic:   "customers",
			Key:     fmt.Sprint(c.ID),
			Payload: map[string]any{"id": c.ID, "name": c.Name}, // encoded as JSON
			Headers: map[string]string{"type": "customer.created"},
		})
	})
	if err != nil {
		panic(err)
	}

	// A bad event rolls the whole transaction back.
	err = db.Transaction(func(tx *gorm.DB) error {
		if err := tx.Create(&Customer{Name: "Bob"}).Error; err != nil {
			return err
		}
		return outbox.Enqueue(tx, outbox.Message{Topic: "customers!", Payload: "x"})
	})
	fmt.Println(err)

	var customers, events int64
	db.Model(&Customer{}).Count(&customers)
	db.Table(outbox.DefaultTableName).Count(&events)
	fmt.Println(customers, "customer,", events, "event")
	// Output:
	// outbox: topic "customers!" has the character '!'; Kafka allows only [a-zA-Z0-9._-]
	// 1 customer, 1 event
}

func ExampleNewPublisher() {
	db, cleanup := exampleDB()
	defer cleanup()
	if err := db.Use(outbox.Plugin()); err != nil {
		panic(err)
	}
	// An in-process Kafka for the example; use your brokers' addresses.
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, "greetings"))
	if err != nil {
		panic(err)
	}
	defer cluster.Close()

	sender, err := kafka.NewSender(cluster.ListenAddrs(), nil) // reliable producer defaults
	if err != nil {
		panic(err)
	}
	defer sender.Close()
	pub, err := outbox.NewPublisher(db, sender, outbox.WithLogger(discardLogger()))
	if err != nil {
		panic(err)
	}
	if err := pub.Start(context.Background()); err != nil {
		panic(err)
	}

	_ = db.Transaction(func(tx *gorm.DB) error {
		return outbox.Enqueue(tx, outbox.Message{Topic: "greetings", Key: "en", Payload: "hello"})
	})
	pub.Wake() // do not wait for the next poll

	recs, err := outboxtest.ConsumeRecords(cluster.ListenAddrs(), "greetings", 1, 10*time.Second)
	if err != nil {
		panic(err)
	}
	// Stop returns once the batch in flight is sent and recorded.
	if err := pub.Stop(context.Background()); err != nil {
		panic(err)
	}
	for _, r := range recs {
		fmt.Printf("%s=%s\n", r.Key, r.Value)
	}
	// Output: en=hello
}

func ExampleDDL() {
	stmts, err := outbox.DDL("postgres", "outbox_messages")
	if err != nil {
		panic(err)
	}
	fmt.Println(strings.SplitN(stmts[0], "\n", 2)[0])
	fmt.Println(stmts[1])
	// Output:
	// CREATE TABLE IF NOT EXISTS "outbox_messages" (
	// CREATE INDEX IF NOT EXISTS "idx_outbox_messages_pending" ON "outbox_messages" ("id") WHERE state = 'pending'
}

// The design document's calls: SaveToOutbox in a transaction, then one
// PublishFromOutbox pass from a background job.
func ExamplePublishFromOutbox() {
	db, cleanup := exampleDB()
	defer cleanup()
	if err := db.Use(outbox.Plugin()); err != nil {
		panic(err)
	}
	store, err := outbox.StoreOf(db)
	if err != nil {
		panic(err)
	}
	ctx := context.Background()
	_ = db.Transaction(func(tx *gorm.DB) error {
		return outbox.SaveToOutbox(ctx, tx, store, "user.created", map[string]string{"id": "42"}, nil)
	})

	// A Sender that prints, where a real one sends to Kafka.
	printer := outbox.SenderFunc(func(_ context.Context, msgs []*outbox.OutboxMessage) error {
		for _, m := range msgs {
			fmt.Println(m.Topic, string(m.Payload))
		}
		return nil
	})
	if err := outbox.PublishFromOutbox(ctx, store, printer, 100); err != nil {
		panic(err)
	}
	counts, _ := store.Count(ctx)
	fmt.Println(counts[outbox.StatePublished], "published")
	// Output:
	// user.created {"id":"42"}
	// 1 published
}

// With WithDeleteOnPublish the table keeps only what is still to be sent
// (and the dead messages): an acknowledged message is deleted, not marked.
func ExampleWithDeleteOnPublish() {
	db, cleanup := exampleDB()
	defer cleanup()
	if err := db.Use(outbox.Plugin(outbox.WithDeleteOnPublish())); err != nil {
		panic(err)
	}
	_ = db.Transaction(func(tx *gorm.DB) error {
		return outbox.Enqueue(tx, outbox.Message{Topic: "orders", Key: "42", Payload: "placed"})
	})
	store, _ := outbox.StoreOf(db)
	ctx := context.Background()
	before, _ := store.Count(ctx)
	acknowledging := outbox.SenderFunc(func(context.Context, []*outbox.OutboxMessage) error { return nil })
	if err := outbox.PublishFromOutbox(ctx, store, acknowledging, 100); err != nil {
		panic(err)
	}
	after, _ := store.Count(ctx)
	fmt.Println(before[outbox.StatePending], "pending before;", len(after), "rows of any state after")
	// Output: 1 pending before; 0 rows of any state after
}

// Transaction is db.Transaction that also wakes this process's publishers
// once it commits. A transaction that fails takes its events with it.
func ExampleTransaction() {
	db, cleanup := exampleDB()
	defer cleanup()
	if err := db.Use(outbox.Plugin()); err != nil {
		panic(err)
	}
	err := outbox.Transaction(db, func(tx *gorm.DB) error {
		if err := outbox.Enqueue(tx, outbox.Message{Topic: "orders", Key: "1", Payload: "placed"}); err != nil {
			return err
		}
		return errors.New("payment declined") // rolls back the event too
	})
	fmt.Println(err)

	err = outbox.Transaction(db, func(tx *gorm.DB) error {
		return outbox.Enqueue(tx, outbox.Message{Topic: "orders", Key: "2", Payload: "placed"})
	})
	if err != nil {
		panic(err)
	}
	store, err := outbox.StoreOf(db)
	if err != nil {
		panic(err)
	}
	counts, err := store.Count(context.Background())
	if err != nil {
		panic(err)
	}
	fmt.Println(counts[outbox.StatePending], "pending")
	// Output:
	// payment declined
	// 1 pending
}

// kafka.NewSender does not connect: a service starts while Kafka is down,
// and its publisher treats the unreachable broker as an outage. Only what
// no retry mends is refused at once.
func Example_lazyKafkaSender() {
	sender, err := kafka.NewSender([]string{"127.0.0.1:1"}, nil) // nothing listens there
	fmt.Println(sender != nil, err)
	if sender != nil {
		sender.Close()
	}

	_, err = kafka.NewSender(nil, nil)
	fmt.Println(err)
	// Output:
	// true <nil>
	// outbox/kafka: no broker addresses
}

// Exactly-once mode: the same publisher, given a transactional sender,
// sends each batch in one Kafka transaction. Consumers read with
// isolation.level=read_committed (as outboxtest's reader does).
func ExampleNewPublisher_exactlyOnce() {
	db, cleanup := exampleDB()
	defer cleanup()
	if err := db.Use(outbox.Plugin()); err != nil {
		panic(err)
	}
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, "greetings"))
	if err != nil {
		panic(err)
	}
	defer cluster.Close()

	// "greetings-outbox" names this table's producers on the cluster: the
	// same for every publisher of the table, unique to it.
	sender, err := kafka.NewTransactionalSender(cluster.ListenAddrs(), "greetings-outbox", nil)
	if err != nil {
		panic(err)
	}
	defer sender.Close()
	pub, err := outbox.NewPublisher(db, sender, outbox.WithLogger(discardLogger()))
	if err != nil {
		panic(err)
	}
	if err := pub.Start(context.Background()); err != nil {
		panic(err)
	}
	_ = db.Transaction(func(tx *gorm.DB) error {
		return outbox.Enqueue(tx, outbox.Message{Topic: "greetings", Key: "fr", Payload: "bonjour"})
	})
	pub.Wake()

	recs, err := outboxtest.ConsumeRecords(cluster.ListenAddrs(), "greetings", 1, 10*time.Second)
	if err != nil {
		panic(err)
	}
	if err := pub.Stop(context.Background()); err != nil {
		panic(err)
	}
	for _, r := range recs {
		fmt.Printf("%s=%s\n", r.Key, r.Value)
	}
	// Output: fr=bonjour
}
