// Package testdb opens the PostgreSQL driver variants that the tests of
// several packages run on, beside outboxtest's: each in a schema of its own.
package testdb

import (
	"database/sql"
	"strings"
	"testing"

	_ "github.com/lib/pq" // the other PostgreSQL driver, for the paths that do without pgx
	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/gorm-outbox/outbox/outboxtest"
	"github.com/gorm-outbox/outbox/pgxpipeline"
)

// PostgresPipelined is PostgreSQL through package pgxpipeline: the
// enqueue's INSERT waits for the transaction's next statement.
func PostgresPipelined(t testing.TB, cfg *gorm.Config) *gorm.DB {
	t.Helper()
	_, dsn := outboxtest.PostgresSchema(t, nil) // the schema, dropped at the end
	return OpenInSchema(t, postgres.New(postgres.Config{DriverName: pgxpipeline.DriverName, DSN: dsn}), cfg)
}

// PostgresLibPQ is PostgreSQL through lib/pq instead of pgx: where the
// store reads through pgx itself (the held claim's walk and lock) it falls
// back to GORM, and a publisher polls instead of LISTENing.
func PostgresLibPQ(t testing.TB, cfg *gorm.Config) *gorm.DB {
	t.Helper()
	_, dsn := outboxtest.PostgresSchema(t, nil) // the schema, dropped at the end
	sqlDB, err := sql.Open("postgres", dsn+" sslmode=disable")
	if err != nil {
		t.Fatal(err)
	}
	return OpenInSchema(t, postgres.New(postgres.Config{Conn: sqlDB}), cfg)
}

// OpenInSchema opens dialector and checks that its connections are in the
// test's own schema (search_path from the DSN).
func OpenInSchema(t testing.TB, dialector gorm.Dialector, cfg *gorm.Config) *gorm.DB {
	t.Helper()
	if cfg == nil {
		cfg = &gorm.Config{Logger: logger.Discard}
	}
	db, err := gorm.Open(dialector, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if sqlDB, err := db.DB(); err == nil {
			sqlDB.Close()
		}
	})
	var schema string
	if err := db.Raw("SELECT current_schema()").Scan(&schema).Error; err != nil || !strings.HasPrefix(schema, "t_") {
		t.Fatalf("connected to schema %q (%v), not the test's own", schema, err)
	}
	return db
}
