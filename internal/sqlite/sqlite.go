// Package sqlite is the outbox store's SQLite part: one writer at a time,
// in the process and in the database.
package sqlite

import (
	"context"
	"database/sql"
	"fmt"
	"strings"
	"time"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/internal/sqlstore"
)

// Schema is the table on SQLite.
var Schema = sqlstore.Schema{
	Quote: '"',
	Types: map[string]string{"id": "uuid", "topic": "text", "message_key": "text", "payload": "blob", "headers": "text",
		"state": "text", "attempts": "integer", "last_error": "text", "next_attempt_at": "datetime", "claim_token": "text",
		"created_at": "datetime", "published_at": "datetime", "tx_group": "uuid"},
	Indexes: []sqlstore.Index{
		{Suffix: "pending", Columns: "id", Where: "state = 'pending'"},
		{Suffix: "published", Columns: "published_at", Where: "state = 'published'"},
		{Suffix: "dead", Columns: "created_at", Where: "state = 'dead'"},
		{Suffix: "tx_group", Columns: "tx_group", Where: "tx_group IS NOT NULL"},
	},
}

// DDL returns the statements that create table on SQLite.
func DDL(table string) []string { return Schema.DDL(table) }

// Open returns the store of cfg.Table on a SQLite db.
func Open(db *gorm.DB, cfg sqlstore.Config) *sqlstore.Store {
	return sqlstore.New(db, cfg, &dialect{table: cfg.Table, writer: make(chan struct{}, 1)})
}

type dialect struct {
	sqlstore.ListArgs
	table string
	// writer holds a token during a write turn: the store's own write
	// transactions (claims, results, cleanups) take turns in the process.
	// SQLite has one writer, and one that finds it taken sleeps in steps
	// of up to 100 ms (busy_timeout), so that several workers would spend
	// most of their time asleep.
	writer chan struct{}
}

func (d *dialect) PendingHint() string                         { return "" }
func (d *dialect) CheckServer(context.Context, *gorm.DB) error { return nil }

func (d *dialect) LockPicked(_ *gorm.DB, _ time.Time, picked []sqlstore.Picked) ([]sqlstore.Picked, error) {
	return picked, nil
}

func (d *dialect) DeleteOld(table, id, where string) string {
	return "DELETE FROM " + table + " WHERE " + id + " IN (SELECT " + id + " FROM " + table + " WHERE " + where + " LIMIT ?)"
}

// writing waits for this store's turn to write, and returns what ends the
// turn; or ctx's error if it ends first (a stopping publisher does not
// wait its turn).
func (d *dialect) writing(ctx context.Context) (func(), error) {
	select {
	case d.writer <- struct{}{}:
		return func() { <-d.writer }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Serialized needs no lock: the database has one writer, and the
// process's turn keeps the store's own writers from waiting on it.
func (d *dialect) Serialized(ctx context.Context, db *gorm.DB, _ sqlstore.Turn, _ int64, fn func(tx *gorm.DB) error) error {
	done, err := d.writing(ctx)
	if err != nil {
		return err
	}
	defer done()
	return db.Transaction(fn)
}

func (d *dialect) Recording(ctx context.Context, db *gorm.DB, inTx bool, fn func(db *gorm.DB) error) error {
	done, err := d.writing(ctx)
	if err != nil {
		return err
	}
	defer done()
	if !inTx {
		return fn(db)
	}
	return db.Transaction(fn)
}

// Migrate runs the migration in one transaction that takes the database's
// write lock as it begins (BEGIN IMMEDIATE, whatever the DSN's _txlock):
// SQLite has one writer, so the migration reads the schema as the last
// writer left it and nobody changes it before the commit. A deferred
// transaction would read first and could then fail to become the writer.
func (d *dialect) Migrate(ctx context.Context, db *gorm.DB) error {
	wait := sqlstore.MigrationWait(ctx)
	return db.Connection(func(conn *gorm.DB) error {
		c, ok := conn.Statement.ConnPool.(*sql.Conn)
		if !ok {
			return fmt.Errorf("outbox: migrating table %s: no connection of its own (%T)", d.table, conn.Statement.ConnPool)
		}
		if err := d.beginImmediate(ctx, c, wait); err != nil {
			sqlstore.DiscardConn(conn) // it may be left in a transaction, or with a short busy timeout
			return err
		}
		tx := writeTx{c}
		conn.Statement.ConnPool = tx
		if err := Schema.MigrateTable(conn.Session(&gorm.Session{NewDB: true}), d.table, ""); err != nil {
			if rerr := tx.Rollback(); rerr != nil {
				sqlstore.DiscardConn(conn)
			}
			return err
		}
		if err := tx.Commit(); err != nil {
			if rerr := tx.Rollback(); rerr != nil {
				sqlstore.DiscardConn(conn)
			}
			return fmt.Errorf("outbox: migrating table %s: committing: %w", d.table, err)
		}
		return nil
	})
}

// beginImmediate begins c's write transaction, waiting at most wait for the
// writer before it. A busy timeout would wait inside BEGIN past wait and
// ctx, which cannot interrupt it, so the wait is made of short ones and the
// connection's own timeout is put back once the transaction has begun.
func (d *dialect) beginImmediate(ctx context.Context, c *sql.Conn, wait time.Duration) error {
	var busyTimeout int64
	if err := c.QueryRowContext(ctx, "PRAGMA busy_timeout").Scan(&busyTimeout); err != nil {
		return fmt.Errorf("outbox: migrating table %s: reading busy_timeout: %w", d.table, err)
	}
	deadline := time.Now().Add(wait)
	for {
		step := max(min(time.Until(deadline), 100*time.Millisecond), time.Millisecond)
		if _, err := c.ExecContext(ctx, fmt.Sprintf("PRAGMA busy_timeout = %d", step.Milliseconds())); err != nil {
			return sqlstore.MigrationLockError(d.table, wait, err)
		}
		_, err := c.ExecContext(ctx, "BEGIN IMMEDIATE")
		if err == nil {
			break
		}
		if ctx.Err() != nil || busy(err) && time.Now().After(deadline) {
			return sqlstore.MigrationLockError(d.table, wait, err)
		}
		if !busy(err) {
			return fmt.Errorf("outbox: migrating table %s: beginning the migration's transaction: %w", d.table, err)
		}
	}
	if _, err := c.ExecContext(ctx, fmt.Sprintf("PRAGMA busy_timeout = %d", busyTimeout)); err != nil {
		return fmt.Errorf("outbox: migrating table %s: restoring busy_timeout: %w", d.table, err)
	}
	return nil
}

// writeTx is a transaction begun by hand on one connection. GORM takes it
// for a transaction (a TxCommitter), so that one it nests (the SQLite
// migrator rebuilds a table in one) becomes a savepoint, not a second BEGIN.
type writeTx struct{ *sql.Conn }

func (t writeTx) Commit() error {
	_, err := t.ExecContext(context.Background(), "COMMIT")
	return err
}

func (t writeTx) Rollback() error {
	_, err := t.ExecContext(context.Background(), "ROLLBACK")
	return err
}

// Connection is the connection the transaction runs on (sqlstore.DiscardConn).
func (t writeTx) Connection() *sql.Conn { return t.Conn }

// busy tells whether err is SQLite's "another connection writes"
// (SQLITE_BUSY), in the words of the drivers GORM's SQLite dialectors use.
func busy(err error) bool {
	msg := err.Error()
	return strings.Contains(msg, "SQLITE_BUSY") || strings.Contains(msg, "database is locked")
}
