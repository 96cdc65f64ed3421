// Command inbox shows two services chained through Kafka, each change
// applied once. The orders service writes an order and its event in one
// transaction (the outbox), and its publisher relays the event. The billing
// service consumes it with an inbox consumer: the handler adds the order to
// the customer's balance in a transaction that also records the event's
// identity. Then the publisher's events are sent a second time, as they
// are after a publisher crash between Kafka's acknowledgement and its own
// record, and billing skips every one: no balance is charged twice.
//
//	go run ./examples/inbox
//
// With no flags it needs no server: a temporary SQLite file per service and
// an in-process Kafka broker (kfake). Point it at real ones, where both
// services share the database, with
//
//	go run ./examples/inbox -db 'postgres://postgres@127.0.0.1:5432/test' -brokers localhost:9092
//	go run ./examples/inbox -db 'root@tcp(127.0.0.1:3306)/test?parseTime=true'
//
// or the variables OUTBOX_DATABASE_URL and OUTBOX_KAFKA_BROKERS.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/glebarez/sqlite"
	"github.com/twmb/franz-go/pkg/kfake"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	"gorm.io/driver/mysql"
	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/inbox"
	"github.com/gorm-outbox/outbox/kafka"
	"github.com/gorm-outbox/outbox/outboxtest"
)

const topic = "inbox-example.orders"

// Order is the orders service's row.
type Order struct {
	ID       uint
	Customer string
	Cents    int64
}

// orderPlaced is the event the orders service publishes.
type orderPlaced struct {
	OrderID  uint   `json:"order_id"`
	Customer string `json:"customer"`
	Cents    int64  `json:"cents"`
}

// Balance is the billing service's row: what a customer owes. Adding to
// it is not idempotent, which is what the inbox is for.
type Balance struct {
	Customer string `gorm:"primaryKey;size:64"`
	Cents    int64
}

func main() {
	dsn := flag.String("db", os.Getenv("OUTBOX_DATABASE_URL"), "database of both services: a postgres:// URL, a MariaDB/MySQL DSN (user@tcp(host:3306)/db?parseTime=true), or a SQLite file path (default: a temporary SQLite file per service)")
	brokers := flag.String("brokers", os.Getenv("OUTBOX_KAFKA_BROKERS"), "comma-separated Kafka brokers (default: an in-process broker)")
	flag.Parse()
	if err := run(*dsn, *brokers); err != nil {
		log.Fatal(err)
	}
}

func run(dsn, brokerList string) error {
	ctx := context.Background()
	quiet := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ordersDB, billingDB, closeDBs, err := openDBs(dsn)
	if err != nil {
		return err
	}
	defer closeDBs()

	// The orders service: the outbox on its database.
	if err := ordersDB.Use(outbox.Plugin()); err != nil {
		return err
	}
	if err := ordersDB.AutoMigrate(&Order{}); err != nil {
		return err
	}
	// The billing service: the inbox on its database.
	if err := billingDB.Use(inbox.Plugin()); err != nil {
		return err
	}
	if err := billingDB.AutoMigrate(&Balance{}); err != nil {
		return err
	}

	addrs := splitList(brokerList)
	if len(addrs) == 0 {
		cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(3, topic))
		if err != nil {
			return err
		}
		defer cluster.Close()
		addrs = cluster.ListenAddrs()
		fmt.Println("kafka:    in-process broker at", addrs[0])
	} else {
		fmt.Println("kafka:   ", strings.Join(addrs, ","))
	}

	// Billing's consumer. Its metrics are read back below to tell when it
	// has seen every event; an application would export them.
	reader := sdkmetric.NewManualReader()
	meters := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	defer func() { _ = meters.Shutdown(ctx) }()
	consumer, err := inbox.NewConsumer(billingDB, addrs, "billing", []string{topic}, charge,
		inbox.WithMeterProvider(meters), inbox.WithLogger(quiet))
	if err != nil {
		return err
	}
	if err := consumer.Start(ctx); err != nil {
		return err
	}
	defer func() { _ = consumer.Stop(ctx) }() // on an early return; the end of run stops it and checks

	// The orders service places orders: each row and its event commit together.
	placed := []Order{{Customer: "ada", Cents: 1200}, {Customer: "grace", Cents: 800}, {Customer: "ada", Cents: 450}, {Customer: "linus", Cents: 300}}
	for i := range placed {
		o := &placed[i]
		err := outbox.Transaction(ordersDB, func(tx *gorm.DB) error {
			if err := tx.Create(o).Error; err != nil {
				return err
			}
			return outbox.Enqueue(tx, outbox.Message{Topic: topic, Key: o.Customer, // a customer's events in order
				Payload: orderPlaced{o.ID, o.Customer, o.Cents}, Headers: map[string]string{"type": "order.placed"}})
		})
		if err != nil {
			return err
		}
	}
	fmt.Printf("orders:   placed %d orders, each with its event in the same transaction\n", len(placed))

	sender, err := kafka.NewSender(addrs, nil)
	if err != nil {
		return err
	}
	defer sender.Close()
	pub, err := outbox.NewPublisher(ordersDB, sender, outbox.WithLogger(quiet))
	if err != nil {
		return err
	}
	if err := pub.Start(ctx); err != nil {
		return err
	}
	defer func() { _ = pub.Stop(ctx) }() // on an early return, as the consumer

	n := int64(len(placed))
	if err := waitFor(ctx, reader, "inbox.messages.applied", n); err != nil {
		return err
	}
	fmt.Printf("billing:  applied %d events; owed: %s\n", n, balances(billingDB))

	// The publisher sends a message again when it crashed after Kafka
	// acknowledged it and before it recorded that: the same event, with
	// the same outbox-message-id. Sending the last published ones again
	// with the publisher's own sender does just that.
	store, err := outbox.StoreOf(ordersDB)
	if err != nil {
		return err
	}
	published, err := store.List(ctx, outbox.ListOptions{State: outbox.StatePublished, Topic: topic, NewestFirst: true, Limit: len(placed)})
	if err != nil {
		return err
	}
	again := make([]*outbox.OutboxMessage, len(published))
	for i := range published {
		again[i] = &published[i]
	}
	if err := sender.Send(ctx, again); err != nil {
		return err
	}
	fmt.Printf("kafka:    the same %d events sent again, as after a publisher crash\n", len(again))
	if err := waitFor(ctx, reader, "inbox.messages.duplicates", int64(len(again))); err != nil {
		return err
	}
	applied, err := counter(ctx, reader, "inbox.messages.applied")
	if err != nil {
		return err
	}
	fmt.Printf("billing:  skipped %d duplicates without calling the handler; %d applied in all; owed: %s\n",
		len(again), applied, balances(billingDB))
	if applied != n {
		return fmt.Errorf("billing applied %d events, want %d", applied, n)
	}

	if err := consumer.Stop(ctx); err != nil {
		return err
	}
	return pub.Stop(ctx)
}

// charge is billing's handler: it adds the order to the customer's
// balance on tx, the transaction that also records the event as applied.
func charge(tx *gorm.DB, m inbox.Message) error {
	var e orderPlaced
	if err := json.Unmarshal(m.Value, &e); err != nil {
		return err // a malformed event is retried, then parked for `outbox inbox retry`
	}
	b := Balance{Customer: e.Customer}
	if err := tx.FirstOrCreate(&b).Error; err != nil {
		return err
	}
	return tx.Model(&b).Update("cents", gorm.Expr("cents + ?", e.Cents)).Error
}

// waitFor waits until the consumer's counter name reaches want.
func waitFor(ctx context.Context, reader *sdkmetric.ManualReader, name string, want int64) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		got, err := counter(ctx, reader, name)
		if err != nil || got >= want {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s is %d after 30s, want %d", name, got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// counter is the sum of a counter's points.
func counter(ctx context.Context, reader *sdkmetric.ManualReader, name string) (int64, error) {
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(ctx, &rm); err != nil {
		return 0, err
	}
	var total int64
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if sum, ok := m.Data.(metricdata.Sum[int64]); ok && m.Name == name {
				for _, p := range sum.DataPoints {
					total += p.Value
				}
			}
		}
	}
	return total, nil
}

// balances reads billing's balances as "ada 16.50, ...".
func balances(db *gorm.DB) string {
	var bs []Balance
	if err := db.Find(&bs).Error; err != nil {
		return err.Error()
	}
	sort.Slice(bs, func(i, j int) bool { return bs[i].Customer < bs[j].Customer })
	var out []string
	for _, b := range bs {
		out = append(out, fmt.Sprintf("%s %d.%02d", b.Customer, b.Cents/100, b.Cents%100))
	}
	return strings.Join(out, ", ")
}

// openDBs opens the two services' databases: dsn for both, or a temporary
// SQLite file for each.
func openDBs(dsn string) (orders, billing *gorm.DB, closeAll func(), err error) {
	cfg := &gorm.Config{Logger: logger.Default.LogMode(logger.Silent)}
	var dialectors [2]gorm.Dialector
	cleanup := func() {}
	switch {
	case strings.Contains(dsn, "@tcp("), strings.Contains(dsn, "@unix("):
		dialectors = [2]gorm.Dialector{mysql.Open(dsn), mysql.Open(dsn)}
		fmt.Println("database: MariaDB/MySQL, for both services")
	case strings.HasPrefix(dsn, "postgres://"), strings.HasPrefix(dsn, "postgresql://"), strings.Contains(dsn, "host="):
		dialectors = [2]gorm.Dialector{postgres.Open(dsn), postgres.Open(dsn)}
		fmt.Println("database: PostgreSQL, for both services")
	case dsn != "":
		dialectors = [2]gorm.Dialector{sqlite.Open(outboxtest.SQLiteDSN(dsn)), sqlite.Open(outboxtest.SQLiteDSN(dsn))}
		fmt.Println("database: SQLite at", dsn, "for both services")
	default:
		dir, err := os.MkdirTemp("", "outbox-inbox-example")
		if err != nil {
			return nil, nil, nil, err
		}
		cleanup = func() { os.RemoveAll(dir) }
		a, b := filepath.Join(dir, "orders.db"), filepath.Join(dir, "billing.db")
		dialectors = [2]gorm.Dialector{sqlite.Open(outboxtest.SQLiteDSN(a)), sqlite.Open(outboxtest.SQLiteDSN(b))}
		fmt.Println("database: SQLite, orders at", a, "and billing at", b)
	}
	var dbs [2]*gorm.DB
	closeAll = func() {
		for _, db := range dbs {
			if db == nil {
				continue
			}
			if sqlDB, err := db.DB(); err == nil {
				sqlDB.Close()
			}
		}
		cleanup()
	}
	for i, d := range dialectors {
		if dbs[i], err = gorm.Open(d, cfg); err != nil {
			closeAll()
			return nil, nil, nil, err
		}
	}
	return dbs[0], dbs[1], closeAll, nil
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
