package outbox

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"fmt"
	"hash/fnv"
	"strings"
	"time"

	"gorm.io/gorm"
)

// migrationLockWait bounds the wait for another process's migration of the
// table: one that takes longer is stuck, and an error says so where a
// silent wait would hang the deployment.
const migrationLockWait = 60 * time.Second

// migrateAlone runs migrate with no other process migrating the same table,
// on the transaction or connection that holds the turn. The replicas of a
// deployment start together: two that both found the table (or an index)
// missing would both create it, and one of them would fail. Whoever goes
// second finds, and keeps, what the first created.
func (s *GormStore) migrateAlone(ctx context.Context, migrate func(db *gorm.DB) error) error {
	wait := migrationLockWait
	if d, ok := ctx.Deadline(); ok {
		wait = min(wait, time.Until(d))
	}
	wait = max(wait, time.Millisecond)
	db := s.db.WithContext(ctx)
	switch s.dialect.name {
	case "postgres":
		return s.migrateAlonePostgres(db, wait, migrate)
	case "mysql":
		return s.migrateAloneMySQL(ctx, db, wait, migrate)
	case "sqlite":
		return s.migrateAloneSQLite(ctx, db, wait, migrate)
	}
	return migrate(db)
}

// migrateAlonePostgres runs the migration in one transaction that first takes
// an advisory lock, which its end releases: PostgreSQL's DDL is
// transactional, so a failed migration leaves nothing half made, and a
// transaction's lock also holds behind PgBouncer's transaction pooling. It
// reads committed data whatever default_transaction_isolation says: a
// snapshot taken before the lock would miss the table its holder made.
func (s *GormStore) migrateAlonePostgres(db *gorm.DB, wait time.Duration, migrate func(db *gorm.DB) error) error {
	return db.Transaction(func(tx *gorm.DB) error {
		var schema, lockTimeout string
		if err := tx.Raw("SELECT COALESCE(current_schema(), ''), current_setting('lock_timeout')").Row().Scan(&schema, &lockTimeout); err != nil {
			return fmt.Errorf("outbox: migrating table %s: reading the schema: %w", s.cfg.table, err)
		}
		table := s.cfg.table
		if !strings.Contains(table, ".") {
			table = schema + "." + table
		}
		// lock_timeout bounds the advisory lock's wait too; the migration's
		// own statements then wait as the session says.
		if err := tx.Exec("SELECT set_config('lock_timeout', ?, true)", fmt.Sprintf("%dms", wait.Milliseconds())).Error; err != nil {
			return fmt.Errorf("outbox: migrating table %s: setting lock_timeout: %w", s.cfg.table, err)
		}
		if err := tx.Exec("SELECT pg_advisory_xact_lock(?)", migrationKey(table)).Error; err != nil {
			return s.migrationLockError(wait, err)
		}
		if err := tx.Exec("SELECT set_config('lock_timeout', ?, true)", lockTimeout).Error; err != nil {
			return fmt.Errorf("outbox: migrating table %s: setting lock_timeout: %w", s.cfg.table, err)
		}
		return migrate(tx.Session(&gorm.Session{NewDB: true}))
	}, &sql.TxOptions{Isolation: sql.LevelReadCommitted}) // each statement sees what the lock's last holder committed
}

// migrateAloneMySQL holds a named lock on one connection around the
// migration: MySQL's DDL commits as it goes, so a transaction cannot hold
// the turn, and a named lock belongs to its connection.
func (s *GormStore) migrateAloneMySQL(ctx context.Context, db *gorm.DB, wait time.Duration, migrate func(db *gorm.DB) error) error {
	return db.Connection(func(conn *gorm.DB) error {
		table := s.cfg.table
		if !strings.Contains(table, ".") {
			table = conn.Migrator().CurrentDatabase() + "." + table
		}
		name := migrationLockName(table)
		var got sql.NullInt64
		if err := conn.Raw("SELECT GET_LOCK(?, ?)", name, wait.Seconds()).Row().Scan(&got); err != nil {
			return s.migrationLockError(wait, err)
		}
		if !got.Valid || got.Int64 != 1 {
			return s.migrationLockError(wait, fmt.Errorf("GET_LOCK(%q) timed out", name))
		}
		defer func() {
			// Released even when ctx has ended: a lock left on a pooled
			// connection would stall every later migration, so a
			// connection that cannot release it is closed instead.
			if err := conn.WithContext(context.WithoutCancel(ctx)).Exec("SELECT RELEASE_LOCK(?)", name).Error; err != nil {
				discardConn(conn)
			}
		}()
		return migrate(conn.Session(&gorm.Session{NewDB: true}))
	})
}

// migrateAloneSQLite runs the migration in one transaction that takes the
// database's write lock as it begins (BEGIN IMMEDIATE, whatever the DSN's
// _txlock): SQLite has one writer, so the migration reads the schema as the
// last writer left it and nobody changes it before the commit. A deferred
// transaction would read first and could then fail to become the writer.
func (s *GormStore) migrateAloneSQLite(ctx context.Context, db *gorm.DB, wait time.Duration, migrate func(db *gorm.DB) error) error {
	return db.Connection(func(conn *gorm.DB) error {
		c, ok := conn.Statement.ConnPool.(*sql.Conn)
		if !ok {
			return fmt.Errorf("outbox: migrating table %s: no connection of its own (%T)", s.cfg.table, conn.Statement.ConnPool)
		}
		if err := s.beginImmediate(ctx, c, wait); err != nil {
			discardConn(conn) // it may be left in a transaction, or with a short busy timeout
			return err
		}
		tx := writeTx{c}
		conn.Statement.ConnPool = tx
		if err := migrate(conn.Session(&gorm.Session{NewDB: true})); err != nil {
			if rerr := tx.Rollback(); rerr != nil {
				discardConn(conn)
			}
			return err
		}
		if err := tx.Commit(); err != nil {
			if rerr := tx.Rollback(); rerr != nil {
				discardConn(conn)
			}
			return fmt.Errorf("outbox: migrating table %s: committing: %w", s.cfg.table, err)
		}
		return nil
	})
}

// beginImmediate begins c's write transaction, waiting at most wait for the
// writer before it. A busy timeout would wait inside BEGIN past wait and
// ctx, which cannot interrupt it, so the wait is made of short ones and the
// connection's own timeout is put back once the transaction has begun.
func (s *GormStore) beginImmediate(ctx context.Context, c *sql.Conn, wait time.Duration) error {
	var busyTimeout int64
	if err := c.QueryRowContext(ctx, "PRAGMA busy_timeout").Scan(&busyTimeout); err != nil {
		return fmt.Errorf("outbox: migrating table %s: reading busy_timeout: %w", s.cfg.table, err)
	}
	deadline := time.Now().Add(wait)
	for {
		step := max(min(time.Until(deadline), 100*time.Millisecond), time.Millisecond)
		if _, err := c.ExecContext(ctx, fmt.Sprintf("PRAGMA busy_timeout = %d", step.Milliseconds())); err != nil {
			return s.migrationLockError(wait, err)
		}
		_, err := c.ExecContext(ctx, "BEGIN IMMEDIATE")
		if err == nil {
			break
		}
		if ctx.Err() != nil || sqliteBusy(err) && time.Now().After(deadline) {
			return s.migrationLockError(wait, err)
		}
		if !sqliteBusy(err) {
			return fmt.Errorf("outbox: migrating table %s: beginning the migration's transaction: %w", s.cfg.table, err)
		}
	}
	if _, err := c.ExecContext(ctx, fmt.Sprintf("PRAGMA busy_timeout = %d", busyTimeout)); err != nil {
		return fmt.Errorf("outbox: migrating table %s: restoring busy_timeout: %w", s.cfg.table, err)
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

// sqliteBusy tells whether err is SQLite's "another connection writes"
// (SQLITE_BUSY), in the words of the drivers GORM's SQLite dialectors use.
func sqliteBusy(err error) bool {
	msg := err.Error()
	return strings.Contains(msg, "SQLITE_BUSY") || strings.Contains(msg, "database is locked")
}

// discardConn closes the connection conn holds instead of handing it back
// to the pool, with whatever lock or transaction it still has.
func discardConn(conn *gorm.DB) {
	var c *sql.Conn
	switch pool := conn.Statement.ConnPool.(type) {
	case *sql.Conn:
		c = pool
	case writeTx:
		c = pool.Conn
	default:
		return
	}
	_ = c.Raw(func(any) error { return driver.ErrBadConn })
}

func (s *GormStore) migrationLockError(wait time.Duration, err error) error {
	return fmt.Errorf("outbox: migrating table %s: waited up to %v for another process to finish migrating it: %w",
		s.cfg.table, wait.Round(time.Millisecond), err)
}

// migrationKey is the PostgreSQL advisory lock of a schema-qualified
// table's migration; advisory locks are per database.
func migrationKey(table string) int64 {
	h := fnv.New64a()
	h.Write([]byte("gorm-outbox-migrate:" + table))
	return int64(h.Sum64())
}

// migrationLockName is the MySQL named lock of a database-qualified table's
// migration. Named locks are server-wide, and MySQL refuses names longer
// than 64 characters: a longer one is hashed.
func migrationLockName(table string) string {
	name := "outbox-migrate:" + table
	if len(name) > 64 {
		h := fnv.New64a()
		h.Write([]byte(table))
		name = fmt.Sprintf("outbox-migrate:%x", h.Sum64())
	}
	return name
}
