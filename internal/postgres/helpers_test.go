package postgres_test

import (
	"strings"
	"testing"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/internal/postgres"
	"github.com/gorm-outbox/outbox/internal/sqlstore"
	"github.com/gorm-outbox/outbox/internal/testdb"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// backends are the PostgreSQL drivers the package's cases run on.
var backends = []struct {
	name string
	open func(testing.TB, *gorm.Config) *gorm.DB
}{
	{"pgx", outboxtest.Postgres},
	// As behind PgBouncer in transaction pooling: arguments go as text.
	{"simple-protocol", outboxtest.PostgresSimpleProtocol},
	// The enqueue's INSERT sent with the transaction's next statement.
	{"pipelined", testdb.PostgresPipelined},
	// Through lib/pq: what the store does through pgx itself falls back to GORM.
	{"libpq", testdb.PostgresLibPQ},
}

// eachBackend runs fn as a subtest on every driver, with the plugin
// registered with opts (it migrates the table and enqueues).
func eachBackend(t *testing.T, fn func(t *testing.T, db *gorm.DB), opts ...outbox.PluginOption) {
	t.Helper()
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) { fn(t, setup(t, b.open(t, nil), opts...)) })
	}
}

func setup(t testing.TB, db *gorm.DB, opts ...outbox.PluginOption) *gorm.DB {
	t.Helper()
	if err := db.Use(outbox.Plugin(opts...)); err != nil {
		t.Fatalf("db.Use(outbox.Plugin()): %v", err)
	}
	return db
}

// newStore is a store of the outbox table on db, as another publisher
// process would have: its claims in flight are its own.
func newStore(db *gorm.DB, deleteOnPublish bool) *sqlstore.Store {
	return postgres.Open(db, sqlstore.Config{Table: outbox.DefaultTableName, DeletePublished: deleteOnPublish}, 0)
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

func keysOf(msgs []*outbox.OutboxMessage) string {
	var out []string
	for _, m := range msgs {
		out = append(out, m.Key+":"+string(m.Payload))
	}
	return strings.Join(out, " ")
}

// indexRead is PostgreSQL's plan for query, as text.
func indexRead(t *testing.T, db *gorm.DB, query string, args []any) string {
	t.Helper()
	var plan []string
	if err := db.Raw("EXPLAIN "+query, args...).Scan(&plan).Error; err != nil {
		t.Fatal(err)
	}
	return strings.Join(plan, " ")
}
