package outbox_test

import (
	"database/sql"
	"strings"
	"testing"

	_ "github.com/lib/pq" // the other PostgreSQL driver, for the paths that do without pgx
	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/gorm-outbox/outbox/outboxtest"
)

// postgresLibPQ is PostgreSQL through lib/pq instead of pgx: where the
// store reads through pgx itself (the held claim's walk and lock) it falls
// back to GORM, and a publisher polls instead of LISTENing.
func postgresLibPQ(t testing.TB, cfg *gorm.Config) *gorm.DB {
	t.Helper()
	_, dsn := outboxtest.PostgresSchema(t, nil) // the schema, dropped at the end
	sqlDB, err := sql.Open("postgres", dsn+" sslmode=disable")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sqlDB.Close() })
	if cfg == nil {
		cfg = &gorm.Config{Logger: logger.Discard}
	}
	db, err := gorm.Open(postgres.New(postgres.Config{Conn: sqlDB}), cfg)
	if err != nil {
		t.Fatal(err)
	}
	var schema string
	if err := db.Raw("SELECT current_schema()").Scan(&schema).Error; err != nil || !strings.HasPrefix(schema, "t_") {
		t.Fatalf("lib/pq connected to schema %q (%v), not the test's own", schema, err)
	}
	return db
}
