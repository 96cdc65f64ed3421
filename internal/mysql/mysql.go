// Package mysql is the outbox store's MySQL and MariaDB part: InnoDB's
// locking read, named locks, READ COMMITTED where REPEATABLE READ would wait
// or read the past, and the server version that has SKIP LOCKED.
package mysql

import (
	"context"
	"database/sql"
	"fmt"
	"hash/fnv"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/google/uuid"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/internal/core"
	"github.com/gorm-outbox/outbox/internal/sqlstore"
)

// Schema is the table on MySQL and MariaDB. They have no partial indexes:
// the state, first, narrows the pending index to pending rows, the key,
// last, lets a walk that skips busy keys test them in the index (index
// condition pushdown) instead of reading each row, and one (state,
// created_at) index serves retention and monitoring. MySQL has no CREATE
// INDEX IF NOT EXISTS, so the DDL declares them in the table.
//
// The index of tx_group (GroupIndex) is not among them: without a partial
// index it holds an entry for every row, which InnoDB writes at each
// enqueue and purges after each delete, and only exactly-once mode reads
// it, which creates it when it starts (EnsureGroupIndex).
var Schema = sqlstore.Schema{
	Quote: '`',
	Types: map[string]string{"id": "uuid", "topic": "varchar(249)", "message_key": "varchar(255)", "payload": "longblob",
		"headers": "text", "state": "varchar(16)", "attempts": "bigint", "last_error": "text",
		"next_attempt_at": "datetime(3)", "claim_token": "varchar(36)", "created_at": "datetime(3)", "published_at": "datetime(3)",
		"tx_group": "uuid"},
	Indexes: []sqlstore.Index{
		{Suffix: "pending", Columns: "state, id, message_key"},
		{Suffix: "state", Columns: "state, created_at"},
	},
	InlineIndexes: true,
}

// GroupIndex finds the other messages of a transaction's group, for
// exactly-once mode's claims.
var GroupIndex = sqlstore.Index{Suffix: "tx_group", Columns: "tx_group"}

// EnsureGroupIndex creates GroupIndex on the table if it lacks it. InnoDB
// builds it online, but the statement first waits for the transactions
// open on the table, and every statement that comes after it waits too:
// the wait is bounded so that a long transaction fails the start of
// exactly-once mode, with the statement to run, instead of stalling the
// table's writers.
func (d *dialect) EnsureGroupIndex(ctx context.Context, db *gorm.DB) error {
	name := sqlstore.IndexName(d.table, GroupIndex.Suffix)
	if db.Migrator().HasIndex(d.table, name) {
		return nil
	}
	create := Schema.IndexStatement(d.table, GroupIndex).Create
	err := db.Connection(func(conn *gorm.DB) error {
		if err := conn.Exec("SET SESSION lock_wait_timeout = 10").Error; err != nil {
			return err
		}
		defer conn.WithContext(context.WithoutCancel(ctx)).Exec("SET SESSION lock_wait_timeout = DEFAULT")
		return conn.Exec(create).Error
	})
	if err != nil && !db.Migrator().HasIndex(d.table, name) { // another process may have created it meanwhile
		return fmt.Errorf("outbox: exactly-once mode needs the index %s on %s; creating it failed (run %q): %w", name, d.table, create, err)
	}
	return nil
}

// DDL returns the statements that create table on MySQL or MariaDB.
func DDL(table string) []string { return Schema.DDL(table) }

// Open returns the store of cfg.Table on a MySQL or MariaDB db.
func Open(db *gorm.DB, cfg sqlstore.Config) *sqlstore.Store {
	d := &dialect{table: cfg.Table}
	d.store = sqlstore.New(db, cfg, d)
	d.held = sqlstore.NewHeldClaims(d.store, d)
	return d.store
}

// Claims pick their rows with a plain read, and lock by primary key only
// what they picked (see ClaimBatch). A locking read of the queue would
// either wait for every open enqueuing transaction (FOR UPDATE blocks on
// their uncommitted rows) or, with SKIP LOCKED, skip rows InnoDB locked
// for other reasons, among them a key's oldest message, and take the next
// one.
type dialect struct {
	sqlstore.ListArgs
	table string
	store *sqlstore.Store
	held  *sqlstore.HeldClaims
	// database is the connection's database, which names the named locks
	// (lockName); read once.
	database atomic.Pointer[string]
	// mariadb: CheckServer found MariaDB (see FirstWalkFrom).
	mariadb atomic.Bool
}

// readCommitted are the options of the claim's transaction and of the one
// that records results. The claim's: REPEATABLE READ would read the busy
// keys from an older snapshot. The results': REPEATABLE READ makes InnoDB
// lock the record after each id an UPDATE looks up; when that is a row an
// open transaction has just inserted, the UPDATE waits for that
// transaction's end, and a long one outlasts the lease, so the batch is
// sent twice.
var readCommitted = &sql.TxOptions{Isolation: sql.LevelReadCommitted}

// NotInIDs leaves the rows in flight for the walk to skip: a NOT IN list
// of thousands of ids costs InnoDB's range optimizer more to plan than the
// walk costs to read those rows.
func (d *dialect) NotInIDs(string, []uuid.UUID) (string, any) { return "", nil }

// PendingHint: MariaDB's optimizer reads "state = 'pending' ORDER BY id
// LIMIT n" along the primary key, through every published row, instead of
// along the pending index, so a claim slows down with every row retention
// keeps; a hint that names no index of ours cannot fail on a table created
// by hand.
func (d *dialect) PendingHint() string { return " IGNORE INDEX (PRIMARY)" }

// FirstWalkFrom: on MariaDB, where published rows are deleted, a walk
// begins on the clustered index. Along the pending index, InnoDB looks up
// each entry's row in the clustered index (for the columns the index
// lacks, and for its version, since the claims' writes keep the queue's
// front pages recent): a descent per row, deeper as the table grows. With
// the published rows gone, the clustered index holds few rows that are not
// pending, the dead ones; the bounds, a descent of the pending index each,
// keep the walk off those older or newer than every pending row. Where
// published rows are kept, they lie between the pending rows. MySQL's use
// of the bounds is untested, and without them each walk would read every
// dead row: it keeps the pending index.
func (d *dialect) FirstWalkFrom(table string, deletesPublished bool) string {
	if !deletesPublished || !d.mariadb.Load() {
		return ""
	}
	pending := " WHERE `state` = 'pending'"
	ends := " FROM " + table + d.PendingHint() + pending + ")"
	return " FROM " + table + " FORCE INDEX (PRIMARY)" + pending +
		" AND `id` BETWEEN (SELECT MIN(`id`)" + ends + " AND (SELECT MAX(`id`)" + ends
}

// DeleteOld deletes with LIMIT: MySQL cannot read the table it deletes
// from in a subquery.
func (d *dialect) DeleteOld(table, _, where string) string {
	return "DELETE FROM " + table + " WHERE " + where + " LIMIT ?"
}

// Serialized takes the table's named lock on one connection before the
// transaction and releases it after the commit, so that the next holder
// sees what this one committed: a named lock belongs to a connection, not
// to a transaction. A claim waits for it up to 30 s; a cleanup does not
// wait.
func (d *dialect) Serialized(ctx context.Context, db *gorm.DB, turn sqlstore.Turn, key int64, fn func(tx *gorm.DB) error) error {
	wait := 30
	if turn == sqlstore.CleanupTurn {
		wait = 0
	}
	return db.Connection(func(conn *gorm.DB) error {
		name := d.lockName(conn, key)
		var got sql.NullInt64
		if err := conn.Raw("SELECT GET_LOCK(?, ?)", name, wait).Scan(&got).Error; err != nil {
			return err
		}
		if got.Valid && got.Int64 == 0 {
			return core.ErrLockBusy
		}
		// Released even when ctx has ended: a pooled connection that kept
		// the lock would stall every other claim for GET_LOCK's timeout.
		defer conn.WithContext(context.WithoutCancel(ctx)).Exec("SELECT RELEASE_LOCK(?)", name)
		return conn.Transaction(fn, readCommitted)
	})
}

// lockName is a named lock's name: named locks are server-wide, so it
// carries the database's name as well as the table's. GORM reads the
// database's name with two queries: it is read once.
func (d *dialect) lockName(db *gorm.DB, key int64) string {
	name := d.database.Load()
	if name == nil {
		current := db.Migrator().CurrentDatabase()
		name = &current
		if current != "" { // "" when the read failed: read again next time
			d.database.Store(name)
		}
	}
	return fmt.Sprintf("outbox:%s:%x", *name, key)
}

// Recording always runs in a READ COMMITTED transaction (see readCommitted).
func (d *dialect) Recording(_ context.Context, db *gorm.DB, _ bool, fn func(db *gorm.DB) error) error {
	return db.Transaction(fn, readCommitted)
}

// Migrate holds a named lock on one connection around the migration:
// MySQL's DDL commits as it goes, so a transaction cannot hold the turn,
// and a named lock belongs to its connection.
func (d *dialect) Migrate(ctx context.Context, db *gorm.DB) error {
	wait := sqlstore.MigrationWait(ctx)
	return db.Connection(func(conn *gorm.DB) error {
		table := d.table
		if !strings.Contains(table, ".") {
			table = conn.Migrator().CurrentDatabase() + "." + table
		}
		name := migrationLockName(table)
		var got sql.NullInt64
		if err := conn.Raw("SELECT GET_LOCK(?, ?)", name, wait.Seconds()).Row().Scan(&got); err != nil {
			return sqlstore.MigrationLockError(d.table, wait, err)
		}
		if !got.Valid || got.Int64 != 1 {
			return sqlstore.MigrationLockError(d.table, wait, fmt.Errorf("GET_LOCK(%q) timed out", name))
		}
		defer func() {
			// Released even when ctx has ended: a lock left on a pooled
			// connection would stall every later migration, so a
			// connection that cannot release it is closed instead.
			if err := conn.WithContext(context.WithoutCancel(ctx)).Exec("SELECT RELEASE_LOCK(?)", name).Error; err != nil {
				sqlstore.DiscardConn(conn)
			}
		}()
		return Schema.MigrateTable(conn.Session(&gorm.Session{NewDB: true}), d.table, "")
	})
}

// migrationLockName is the named lock of a database-qualified table's
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

// CheckServer refuses servers without FOR UPDATE SKIP LOCKED, which
// several publishers need to divide the work, or without JSON_TABLE, which
// the claims join their ids with (see idsTable): MySQL before 8.0.4, MariaDB
// before 10.6.
//
// It also refuses a table whose id column is MariaDB's UUID type on a
// MariaDB that stores UUIDv7 values byte-swapped (see swapsUUIDv7), and
// notes whether the server is MariaDB (see FirstWalkFrom).
func (d *dialect) CheckServer(_ context.Context, db *gorm.DB) error {
	var v string
	if err := db.Raw("SELECT VERSION()").Scan(&v).Error; err != nil {
		return fmt.Errorf("outbox: reading the server version: %w", err)
	}
	if err := CheckVersion(v); err != nil {
		return err
	}
	d.mariadb.Store(strings.Contains(strings.ToLower(v), "mariadb"))
	if !swapsUUIDv7(v) {
		return nil
	}
	isUUID, err := idIsUUID(db, d.table)
	if err != nil {
		return err
	}
	if isUUID {
		return fmt.Errorf("%w: MariaDB %s stores UUIDv7 values byte-swapped, so that %s's ids (UUID type) do not sort in the order they were enqueued "+
			"and each key's order would not hold; use MariaDB 10.10.6, 10.11.5 or later, or an id column of type char(36)", core.ErrUnsupportedServer, v, d.table)
	}
	return nil
}

// idIsUUID reports whether the id column of table (table or
// database.table) is of MariaDB's UUID type.
func idIsUUID(db *gorm.DB, table string) (bool, error) {
	schema := ""
	if i := strings.LastIndex(table, "."); i >= 0 {
		schema, table = table[:i], table[i+1:]
	}
	var types []string
	err := db.Raw("SELECT DATA_TYPE FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = COALESCE(NULLIF(?, ''), DATABASE()) AND TABLE_NAME = ? AND COLUMN_NAME = 'id'",
		schema, table).Scan(&types).Error
	if err != nil {
		return false, fmt.Errorf("outbox: reading the type of %s.id: %w", table, err)
	}
	return len(types) == 1 && strings.EqualFold(types[0], "uuid"), nil
}

// swapsUUIDv7 reports whether a MariaDB version stores UUIDs of version 6
// and later byte-swapped, as it does UUIDv1 for its index locality: from
// 10.7, where the UUID type came, to 10.10.5 and 10.11.4.
func swapsUUIDv7(v string) bool {
	m := versionNumber.FindStringSubmatch(v)
	if m == nil || !strings.Contains(strings.ToLower(v), "mariadb") {
		return false
	}
	major, _ := strconv.Atoi(m[1])
	minor, _ := strconv.Atoi(m[2])
	patch, _ := strconv.Atoi(m[3])
	return major == 10 && (minor >= 7 && minor <= 9 || minor == 10 && patch < 6 || minor == 11 && patch < 5)
}

var versionNumber = regexp.MustCompile(`^(\d+)\.(\d+)\.?(\d*)`)

// CheckVersion refuses a server version without SKIP LOCKED
// (core.ErrUnsupportedServer).
func CheckVersion(v string) error {
	if err := skipLocked(v); err != nil {
		return fmt.Errorf("%w: %w", core.ErrUnsupportedServer, err)
	}
	return nil
}

func skipLocked(v string) error {
	m := versionNumber.FindStringSubmatch(v)
	if m == nil {
		return fmt.Errorf("cannot read the server version %q", v)
	}
	major, _ := strconv.Atoi(m[1])
	minor, _ := strconv.Atoi(m[2])
	patch, _ := strconv.Atoi(m[3])
	if strings.Contains(strings.ToLower(v), "mariadb") {
		if major < 10 || major == 10 && minor < 6 {
			return fmt.Errorf("MariaDB %s has no FOR UPDATE SKIP LOCKED; the publisher needs MariaDB 10.6 or later", v)
		}
		return nil
	}
	if major < 8 || major == 8 && minor == 0 && patch < 4 {
		return fmt.Errorf("MySQL %s has no FOR UPDATE SKIP LOCKED or no JSON_TABLE; the publisher needs MySQL 8.0.4 or later", v)
	}
	return nil
}
