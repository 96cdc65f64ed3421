package inbox_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/glebarez/sqlite"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/inbox"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// exampleDB opens a throwaway SQLite database for the examples.
func exampleDB() (*gorm.DB, func()) {
	dir, err := os.MkdirTemp("", "inbox-example")
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

// exampleKafka starts an in-process Kafka with topic, of one partition.
func exampleKafka(topic string) (*kfake.Cluster, []string) {
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, topic))
	if err != nil {
		panic(err)
	}
	return cluster, cluster.ListenAddrs()
}

// exampleProduce writes recs to topic, in order, as another service would.
func exampleProduce(addrs []string, topic string, recs ...*kgo.Record) {
	cl, err := kgo.NewClient(kgo.SeedBrokers(addrs...), kgo.DefaultProduceTopic(topic))
	if err != nil {
		panic(err)
	}
	defer cl.Close()
	if err := cl.ProduceSync(context.Background(), recs...).FirstErr(); err != nil {
		panic(err)
	}
}

// exampleWait polls cond until it holds, for at most 30 seconds.
func exampleWait(cond func() bool) {
	for deadline := time.Now().Add(30 * time.Second); !cond(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			panic("waited 30s")
		}
	}
}

// exampleStop stops c, and with it the example's consumer group.
func exampleStop(c *inbox.Consumer) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.Stop(ctx); err != nil {
		panic(err)
	}
}

func ExamplePlugin() {
	db, cleanup := exampleDB()
	defer cleanup()

	// Registers the inbox and migrates its table.
	if err := db.Use(inbox.Plugin(inbox.WithTableName("inbox"))); err != nil {
		panic(err)
	}
	fmt.Println(db.Migrator().HasTable("inbox"))
	// Output: true
}

// For applications that own their migrations: the plugin then registers
// the table WithoutMigration.
func ExampleDDL() {
	stmts, err := inbox.DDL("postgres", inbox.DefaultTableName)
	if err != nil {
		panic(err)
	}
	for _, s := range stmts {
		lines := strings.Split(s, "\n")
		fmt.Println(lines[0])
		for _, l := range lines {
			if strings.Contains(l, "PRIMARY KEY") {
				fmt.Println(l)
			}
		}
	}
	// Output:
	// CREATE TABLE IF NOT EXISTS "inbox_messages" (
	//   PRIMARY KEY ("consumer_group", "message_id")
	// CREATE INDEX IF NOT EXISTS "idx_inbox_messages_unapplied" ON "inbox_messages" ("consumer_group", "topic", "kafka_partition") WHERE state <> 'applied'
	// CREATE INDEX IF NOT EXISTS "idx_inbox_messages_processed" ON "inbox_messages" USING brin ("processed_at")
}

// The handler writes on tx, the transaction that also records the message:
// a message sent twice (the same outbox-message-id) is applied once.
func ExampleNewConsumer() {
	db, cleanup := exampleDB()
	defer cleanup()
	if err := db.Use(inbox.Plugin()); err != nil {
		panic(err)
	}
	type Invoice struct {
		ID      uint
		OrderID string
	}
	if err := db.AutoMigrate(&Invoice{}); err != nil {
		panic(err)
	}
	cluster, addrs := exampleKafka("orders")
	defer cluster.Close()
	id := func(v string) []kgo.RecordHeader {
		return []kgo.RecordHeader{{Key: inbox.MessageIDHeader, Value: []byte(v)}}
	}
	exampleProduce(addrs, "orders",
		&kgo.Record{Key: []byte("order-1"), Value: []byte("placed"), Headers: id("e1")},
		&kgo.Record{Key: []byte("order-1"), Value: []byte("placed"), Headers: id("e1")}, // sent twice
		&kgo.Record{Key: []byte("order-2"), Value: []byte("placed"), Headers: id("e2")},
	)

	c, err := inbox.NewConsumer(db, addrs, "billing", []string{"orders"}, func(tx *gorm.DB, m inbox.Message) error {
		return tx.Create(&Invoice{OrderID: string(m.Key)}).Error
	})
	if err != nil {
		panic(err)
	}
	if err := c.Start(context.Background()); err != nil {
		panic(err)
	}
	defer exampleStop(c)

	// One partition, in order: once order-2 is invoiced, the copy of e1
	// before it has been skipped.
	exampleWait(func() bool {
		var n int64
		db.Model(&Invoice{}).Where("order_id = ?", "order-2").Count(&n)
		return n == 1
	})
	var orders []string
	db.Model(&Invoice{}).Order("id").Pluck("order_id", &orders)
	fmt.Println(orders)
	// Output: [order-1 order-2]
}

// A batch handler writes the rows of many messages in one statement.
func ExampleNewBatchConsumer() {
	db, cleanup := exampleDB()
	defer cleanup()
	if err := db.Use(inbox.Plugin()); err != nil {
		panic(err)
	}
	type Reading struct {
		ID     uint
		Sensor string
		Value  string
	}
	if err := db.AutoMigrate(&Reading{}); err != nil {
		panic(err)
	}
	cluster, addrs := exampleKafka("readings")
	defer cluster.Close()
	var recs []*kgo.Record
	for i := range 5 {
		recs = append(recs, &kgo.Record{Key: []byte("s1"), Value: fmt.Appendf(nil, "%d", 20+i)})
	}
	exampleProduce(addrs, "readings", recs...)

	c, err := inbox.NewBatchConsumer(db, addrs, "dashboard", []string{"readings"}, func(tx *gorm.DB, ms []inbox.Message) error {
		rows := make([]Reading, len(ms))
		for i, m := range ms {
			rows[i] = Reading{Sensor: string(m.Key), Value: string(m.Value)}
		}
		return tx.Create(&rows).Error
	}, inbox.WithBatchSize(100))
	if err != nil {
		panic(err)
	}
	if err := c.Start(context.Background()); err != nil {
		panic(err)
	}
	defer exampleStop(c)

	exampleWait(func() bool {
		var n int64
		db.Model(&Reading{}).Count(&n)
		return n == 5
	})
	var values []string
	db.Model(&Reading{}).Order("id").Pluck("value", &values)
	fmt.Println(values)
	// Output: [20 21 22 23 24]
}

// A message whose handler fails on every attempt is parked, and holds the
// later messages of its key. Once the cause is fixed, Retry (or `outbox
// inbox retry`) has the consumer apply it, then the messages it held.
func ExampleRetry() {
	db, cleanup := exampleDB()
	defer cleanup()
	if err := db.Use(inbox.Plugin()); err != nil {
		panic(err)
	}
	type Shipment struct {
		ID      uint
		OrderID string
		Step    string
	}
	if err := db.AutoMigrate(&Shipment{}); err != nil {
		panic(err)
	}
	cluster, addrs := exampleKafka("orders")
	defer cluster.Close()
	exampleProduce(addrs, "orders",
		&kgo.Record{Key: []byte("order-7"), Value: []byte("packed")},
		&kgo.Record{Key: []byte("order-7"), Value: []byte("shipped")},
	)

	var carrierDown atomic.Bool
	carrierDown.Store(true)
	c, err := inbox.NewConsumer(db, addrs, "shipping", []string{"orders"}, func(tx *gorm.DB, m inbox.Message) error {
		if carrierDown.Load() {
			return errors.New("the carrier's API is down")
		}
		return tx.Create(&Shipment{OrderID: string(m.Key), Step: string(m.Value)}).Error
	},
		inbox.WithRetryPolicy(outbox.RetryPolicy{MaxAttempts: 2, MinBackoff: time.Millisecond}),
		inbox.WithRetryCheckInterval(50*time.Millisecond),
		inbox.WithLogger(slog.New(slog.DiscardHandler)), // the example prints no failure lines
	)
	if err != nil {
		panic(err)
	}
	if err := c.Start(context.Background()); err != nil {
		panic(err)
	}
	defer exampleStop(c)

	states := func() string {
		var s []string
		db.Table(inbox.DefaultTableName).Order("kafka_offset").Pluck("state", &s)
		return strings.Join(s, " ")
	}
	exampleWait(func() bool { return states() == "parked held" })
	fmt.Println(states())

	carrierDown.Store(false)
	n, err := inbox.Retry(context.Background(), db, "shipping") // every parked message of the group
	if err != nil {
		panic(err)
	}
	fmt.Println(n, "to retry")
	exampleWait(func() bool { return states() == "applied applied" })
	var steps []string
	db.Model(&Shipment{}).Order("id").Pluck("step", &steps)
	fmt.Println(steps)
	// Output:
	// parked held
	// 1 to retry
	// [packed shipped]
}

// Consume, transform, produce: the handler enqueues the events a message
// causes on its own transaction, so that they are sent if and only if the
// message was applied, and once however often it is delivered.
func Example_consumeTransformProduce() {
	db, cleanup := exampleDB()
	defer cleanup()
	if err := db.Use(inbox.Plugin()); err != nil {
		panic(err)
	}
	if err := db.Use(outbox.Plugin()); err != nil {
		panic(err)
	}
	cluster, addrs := exampleKafka("orders")
	defer cluster.Close()
	id := func(v string) []kgo.RecordHeader {
		return []kgo.RecordHeader{{Key: inbox.MessageIDHeader, Value: []byte(v)}}
	}
	exampleProduce(addrs, "orders",
		&kgo.Record{Key: []byte("order-1"), Value: []byte("paid"), Headers: id("e1")},
		&kgo.Record{Key: []byte("order-1"), Value: []byte("paid"), Headers: id("e1")}, // sent twice
		&kgo.Record{Key: []byte("order-2"), Value: []byte("paid"), Headers: id("e2")},
	)

	var calls atomic.Int32
	c, err := inbox.NewConsumer(db, addrs, "fulfilment", []string{"orders"}, func(tx *gorm.DB, m inbox.Message) error {
		calls.Add(1)
		return outbox.Enqueue(tx, outbox.Message{Topic: "shipments", Key: string(m.Key), Payload: "requested"})
	})
	if err != nil {
		panic(err)
	}
	if err := c.Start(context.Background()); err != nil {
		panic(err)
	}
	store, err := outbox.StoreOf(db)
	if err != nil {
		panic(err)
	}
	// One partition, in order: once order-2's event is committed, the copy
	// of e1 before it has been skipped. (The handler's calls are counted
	// before their transaction commits, and Stop rolls back a batch in
	// flight: the wait is on what committed.)
	var counts map[outbox.State]int64
	exampleWait(func() bool {
		counts, err = store.Count(context.Background())
		return err == nil && counts[outbox.StatePending] == 2
	})
	exampleStop(c)
	fmt.Println("3 messages,", calls.Load(), "calls of the handler,", counts[outbox.StatePending], "events to publish")
	// Output: 3 messages, 2 calls of the handler, 2 events to publish
}
