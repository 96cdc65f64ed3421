package outbox_test

import (
	"testing"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/kafka"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// features are what a backend can do; a case that needs one runs only on
// the backends that have it.
type features struct {
	// processes: several processes claim and clean one table (a server
	// database, with locks between processes); SQLite has one writer.
	processes bool
	// partialIndexes: the pending indexes hold only pending rows.
	partialIndexes bool
}

// databases are the backends every shared case runs on.
var databases = []struct {
	name     string
	open     func(testing.TB, *gorm.Config) *gorm.DB
	features features
}{
	{"postgres", outboxtest.Postgres, features{processes: true, partialIndexes: true}},
	// As behind PgBouncer in transaction pooling: arguments go as text.
	{"postgres-simple-protocol", outboxtest.PostgresSimpleProtocol, features{processes: true, partialIndexes: true}},
	// The enqueue's INSERT sent with the transaction's next statement.
	{"postgres-pipelined", postgresPipelined, features{processes: true, partialIndexes: true}},
	// Through lib/pq: what the store does through pgx itself falls back to GORM.
	{"postgres-libpq", postgresLibPQ, features{processes: true, partialIndexes: true}},
	{"sqlite", outboxtest.SQLite, features{partialIndexes: true}},
	{"mariadb", outboxtest.MariaDB, features{processes: true}},
}

// eachDB runs fn as a subtest on every backend, with the plugin registered
// with opts and the test's domain tables migrated.
func eachDB(t *testing.T, fn func(t *testing.T, db *gorm.DB), opts ...outbox.PluginOption) {
	t.Helper()
	eachDBWith(t, func(features) bool { return true }, fn, opts...)
}

// eachDBWith is eachDB on the backends whose features satisfy has.
func eachDBWith(t *testing.T, has func(features) bool, fn func(t *testing.T, db *gorm.DB), opts ...outbox.PluginOption) {
	t.Helper()
	ran := 0
	for _, d := range databases {
		if !has(d.features) {
			continue
		}
		ran++
		t.Run(d.name, func(t *testing.T) {
			fn(t, setup(t, d.open(t, nil), opts...))
		})
	}
	if ran == 0 {
		t.Fatal("no backend has the features this test needs")
	}
}

func setup(t testing.TB, db *gorm.DB, opts ...outbox.PluginOption) *gorm.DB {
	t.Helper()
	if err := db.Use(outbox.Plugin(opts...)); err != nil {
		t.Fatalf("db.Use(outbox.Plugin()): %v", err)
	}
	if err := db.AutoMigrate(&Account{}, &Order{}, &Invoice{}); err != nil {
		t.Fatalf("migrating domain tables: %v", err)
	}
	return db
}

// Account is a plain domain model with no events.
type Account struct {
	ID   uint
	Name string
}

func count(t testing.TB, db *gorm.DB, table string, where ...any) int64 {
	t.Helper()
	var n int64
	q := db.Table(table)
	if len(where) > 0 {
		q = q.Where(where[0], where[1:]...)
	}
	if err := q.Count(&n).Error; err != nil {
		t.Fatalf("counting %s: %v", table, err)
	}
	return n
}

func messages(t testing.TB, db *gorm.DB) []outbox.OutboxMessage {
	t.Helper()
	store, err := outbox.StoreOf(db)
	if err != nil {
		t.Fatal(err)
	}
	msgs, err := store.List(t.Context(), outbox.ListOptions{Limit: 100000})
	if err != nil {
		t.Fatal(err)
	}
	return msgs
}

func kafkaSender(t testing.TB, addrs []string) *kafka.Sender {
	t.Helper()
	s, err := kafka.NewSender(addrs, nil)
	if err != nil {
		t.Fatalf("kafka.NewSender: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}
