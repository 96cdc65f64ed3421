// Command quickstart shows the outbox end to end: orders whose GORM hooks
// record events, written in the orders' own transactions, relayed to Kafka
// by the publisher, and read back by a separate Kafka consumer.
//
//	go run ./examples/quickstart
//
// With no flags it needs no server: SQLite in a temporary file and an
// in-process Kafka broker (kfake). Point it at real ones with
//
//	go run ./examples/quickstart -db 'postgres://postgres@127.0.0.1:5432/test' -brokers localhost:9092
//	go run ./examples/quickstart -db 'root@tcp(127.0.0.1:3306)/test?parseTime=true'
//
// or the variables OUTBOX_DATABASE_URL and OUTBOX_KAFKA_BROKERS. With
// -exactly-once the publisher sends each batch in a Kafka transaction, and
// the consumer reads with isolation.level=read_committed.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/glebarez/sqlite"
	"github.com/twmb/franz-go/pkg/kfake"
	"gorm.io/driver/mysql"
	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/hooks"
	"github.com/gorm-outbox/outbox/kafka"
	"github.com/gorm-outbox/outbox/outboxtest"
)

const topic = "quickstart.orders"

// Order records its domain events; the outbox plugin writes them with the row.
type Order struct {
	ID       uint
	Customer string
	Status   string
	hooks.Events
}

type orderEvent struct {
	OrderID  uint   `json:"order_id"`
	Customer string `json:"customer"`
	Status   string `json:"status"`
}

func (o *Order) record(kind string) {
	o.Record(outbox.Message{
		Topic:   topic,
		Key:     fmt.Sprint(o.ID),
		Payload: orderEvent{o.ID, o.Customer, o.Status},
		Headers: map[string]string{"type": kind},
	})
}

// AfterCreate records the creation event once the row has its id; the
// plugin writes it before GORM commits.
func (o *Order) AfterCreate(*gorm.DB) error {
	o.record("order.placed")
	return nil
}

// Pay changes the order and records why.
func (o *Order) Pay() {
	o.Status = "paid"
	o.record("order.paid")
}

func main() {
	dsn := flag.String("db", os.Getenv("OUTBOX_DATABASE_URL"), "database: a postgres:// URL, a MariaDB/MySQL DSN (user@tcp(host:3306)/db?parseTime=true), or a SQLite file path (default: a temporary SQLite file)")
	brokers := flag.String("brokers", os.Getenv("OUTBOX_KAFKA_BROKERS"), "comma-separated Kafka brokers (default: an in-process broker)")
	exactlyOnce := flag.Bool("exactly-once", false, "deliver in Kafka transactions: no duplicate after any crash")
	flag.Parse()
	if err := run(*dsn, *brokers, *exactlyOnce); err != nil {
		log.Fatal(err)
	}
}

func run(dsn, brokerList string, exactlyOnce bool) error {
	ctx := context.Background()
	db, closeDB, err := openDB(dsn)
	if err != nil {
		return err
	}
	defer closeDB()
	if err := db.Use(outbox.Plugin()); err != nil {
		return err
	}
	if err := db.AutoMigrate(&Order{}); err != nil {
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

	// Domain writes: each order and its events commit together.
	var orders []Order
	for _, c := range []string{"ada", "grace", "linus"} {
		o := Order{Customer: c, Status: "placed"}
		if err := db.Create(&o).Error; err != nil {
			return err
		}
		orders = append(orders, o)
	}
	orders[0].Pay()
	if err := db.Save(&orders[0]).Error; err != nil {
		return err
	}
	// A transaction that fails: neither its order nor its event survive.
	err = db.Transaction(func(tx *gorm.DB) error {
		if err := tx.Create(&Order{Customer: "mallory", Status: "placed"}).Error; err != nil {
			return err
		}
		return errors.New("payment declined")
	})
	fmt.Println("rolled back:", err)

	var sender interface {
		outbox.Sender
		Close() error
	}
	if exactlyOnce {
		// The transactional id names this table's producers on the cluster.
		sender, err = kafka.NewTransactionalSender(addrs, "quickstart-orders", nil)
	} else {
		sender, err = kafka.NewSender(addrs, nil)
	}
	if err != nil {
		return err
	}
	defer sender.Close()
	pub, err := outbox.NewPublisher(db, sender,
		outbox.WithLogger(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))))
	if err != nil {
		return err
	}
	if err := pub.Start(ctx); err != nil {
		return err
	}
	defer func() {
		if err := pub.Stop(ctx); err != nil {
			log.Printf("stopping the publisher: %v", err)
		}
	}()

	// Read the topic back with franz-go, a client other than the producer.
	const want = 4
	recs, err := outboxtest.ConsumeRecords(addrs, topic, want, 20*time.Second)
	if err != nil {
		return err
	}
	fmt.Printf("consumed %d events from %s:\n", len(recs), topic)
	for _, r := range recs {
		kind, _ := outboxtest.Header(r, "type")
		id, _ := outboxtest.Header(r, kafka.MessageIDHeader)
		fmt.Printf("  partition=%d key=%s type=%-12s %s  (%s=%s)\n", r.Partition, r.Key, kind, r.Value, kafka.MessageIDHeader, id)
	}
	if len(recs) != want {
		return fmt.Errorf("expected %d events, consumed %d", want, len(recs))
	}
	if err := pub.Stop(ctx); err != nil {
		return err
	}
	store, err := outbox.StoreOf(db)
	if err != nil {
		return err
	}
	counts, err := store.Count(ctx)
	if err != nil {
		return err
	}
	fmt.Printf("outbox:   %d published, %d pending, %d dead\n", counts[outbox.StatePublished], counts[outbox.StatePending], counts[outbox.StateDead])
	return nil
}

func openDB(dsn string) (*gorm.DB, func(), error) {
	cfg := &gorm.Config{Logger: logger.Default.LogMode(logger.Silent)}
	cleanup := func() {}
	var dialector gorm.Dialector
	switch {
	case strings.Contains(dsn, "@tcp("), strings.Contains(dsn, "@unix("):
		dialector = mysql.Open(dsn)
		fmt.Println("database: MariaDB/MySQL")
	case strings.HasPrefix(dsn, "postgres://"), strings.HasPrefix(dsn, "postgresql://"), strings.Contains(dsn, "host="):
		dialector = postgres.Open(dsn)
		fmt.Println("database: PostgreSQL")
	default:
		path := dsn
		if path == "" {
			dir, err := os.MkdirTemp("", "outbox-quickstart")
			if err != nil {
				return nil, nil, err
			}
			cleanup = func() { os.RemoveAll(dir) }
			path = filepath.Join(dir, "quickstart.db")
		}
		dialector = sqlite.Open(outboxtest.SQLiteDSN(path))
		fmt.Println("database: SQLite at", path)
	}
	db, err := gorm.Open(dialector, cfg)
	if err != nil {
		cleanup()
		return nil, nil, err
	}
	return db, func() {
		if sqlDB, err := db.DB(); err == nil {
			sqlDB.Close()
		}
		cleanup()
	}, nil
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
