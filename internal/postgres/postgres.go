// Package postgres is the outbox store's PostgreSQL part: the claim held
// across the send (held.go), rows found by their addresses, advisory locks,
// the NOTIFY that wakes the publishers of every process, and the table's
// fillfactor.
package postgres

import (
	"context"
	"database/sql"
	"fmt"
	"hash/fnv"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgtype"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/internal/core"
	"github.com/gorm-outbox/outbox/internal/pgmark"
	"github.com/gorm-outbox/outbox/internal/sqlstore"
)

// fillfactor leaves room on each page for a lease claim's stamp
// (Store.Claim) and a retry's, so that it is written beside the row (a HOT
// update) instead of on another page with a new entry in every index. The
// publisher's held claims stamp nothing, but with pages filled to 100 their
// drains write more WAL a message and are no faster.
const fillfactor = 50

// Schema is the table on PostgreSQL. The pending index holds only pending
// rows and only their id: that is what makes the planner prefer it to the
// primary key for the claim's ORDER BY id even while its statistics still
// say that every row is pending. The published and dead indexes serve
// retention and monitoring; being partial, they take no entry when a
// message is enqueued, so an enqueue writes two indexes, not three. None
// holds the columns a claim writes, so that its stamp is a HOT update.
var Schema = sqlstore.Schema{
	Quote: '"',
	Types: map[string]string{"id": "uuid", "topic": "varchar(249)", "message_key": "varchar(255)", "payload": "bytea",
		"headers": "text", "state": "varchar(16)", "attempts": "bigint", "last_error": "text",
		"next_attempt_at": "timestamptz", "claim_token": "varchar(36)", "created_at": "timestamptz", "published_at": "timestamptz", "tx_group": "uuid"},
	Indexes: []sqlstore.Index{
		{Suffix: "pending", Columns: "id", Where: "state = 'pending'"},
		{Suffix: "published", Columns: "published_at", Where: "state = 'published'"},
		{Suffix: "dead", Columns: "created_at", Where: "state = 'dead'"},
		// The other messages of a transaction that enqueued several.
		{Suffix: "tx_group", Columns: "tx_group", Where: "tx_group IS NOT NULL"},
	},
	TableOptions: fmt.Sprintf(" WITH (fillfactor = %d)", fillfactor),
}

// DDL returns the statements that create table on PostgreSQL.
func DDL(table string) []string { return Schema.DDL(table) }

// Open returns the store of cfg.Table on a PostgreSQL db; notifyInterval
// is the least time between two NOTIFYs of this process's enqueues (zero:
// none).
func Open(db *gorm.DB, cfg sqlstore.Config, notifyInterval time.Duration) *sqlstore.Store {
	d := &dialect{table: cfg.Table}
	if notifyInterval > 0 {
		d.notifier = newNotifier(cfg.Table, notifyInterval)
	}
	d.store = sqlstore.New(db, cfg, d)
	d.held = sqlstore.NewHeldClaims(d.store, d)
	return d.store
}

type dialect struct {
	table    string
	store    *sqlstore.Store
	notifier *notifier // nil: no NOTIFY
	held     *sqlstore.HeldClaims
}

// claimLock, run first in a lease claim's transaction, serializes the
// claims. It also makes the claim's commit return before the WAL is on
// disk: the claim holds the lock every other claim waits for, and a claim
// lost in a crash only hands its rows back (sent again, never lost); it
// plans the claim's statements for their arguments (see lockPicked); and it
// leaves the walk no way to read the pending rows but along the pending
// index (see walkSetup).
const claimLock = "SELECT 1 FROM (SELECT pg_advisory_xact_lock(?), set_config('synchronous_commit', 'off', true), set_config('plan_cache_mode', 'force_custom_plan', true)," +
	" set_config('enable_seqscan', 'off', true), set_config('enable_bitmapscan', 'off', true)) l"

// durableClaimLock is claimLock for an exactly-once claim: its commit
// waits for the WAL as the server's synchronous_commit says, since a
// broker transaction is committed on the strength of it, and a claim lost
// in a crash would send that batch again. A claim transaction that waits
// on its client for 10 seconds (a process frozen mid-claim) is ended by
// the server, so that it does not hold every other claim's turn.
const durableClaimLock = "SELECT 1 FROM (SELECT pg_advisory_xact_lock(?), set_config('idle_in_transaction_session_timeout', '10s', true), set_config('plan_cache_mode', 'force_custom_plan', true)," +
	" set_config('enable_seqscan', 'off', true), set_config('enable_bitmapscan', 'off', true)) l"

// cleanupLock returns 0 when another process is cleaning the same table.
const cleanupLock = "SELECT CAST(pg_try_advisory_xact_lock(?) AS integer)"

// walkSetup runs in a claim's transaction before its walk: it leaves the
// planner no way to read the pending rows but along the pending index, in
// id order. With statistics taken while the table was empty or nearly
// (before a backlog, which autovacuum analyzes only once a tenth of the
// table has changed), PostgreSQL chose a bitmap scan of every pending row
// and a sort, for each walk: a cost that grows with the backlog the walk
// is meant to drain. The settings last until the claim's transaction ends;
// its other statements find rows by address or by primary key.
const walkSetup = "SELECT set_config('enable_seqscan', 'off', true), set_config('enable_bitmapscan', 'off', true)"

// resultSetup runs first in a transaction around each of the lease API's
// result writes: it plans them for their id lists. pgx caches prepared
// statements, and a generic plan for "id = ANY($1)" chosen while the table
// was nearly empty scans the whole table once it is not (see lockPicked).
const resultSetup = "SELECT set_config('plan_cache_mode', 'force_custom_plan', true)"

// InIDs matches one uuid[] argument (see idsArg); NotInIDs excludes one
// (PostgreSQL 15 hashes a long list).
func (d *dialect) InIDs(col string, ids []uuid.UUID) (string, any) {
	return col + " = ANY(CAST(? AS uuid[]))", idsArg(ids)
}
func (d *dialect) NotInIDs(col string, ids []uuid.UUID) (string, any) {
	return col + " <> ALL(CAST(? AS uuid[]))", idsArg(ids)
}
func (d *dialect) NotInKeys(col string, keys map[string]bool) (string, any) {
	return col + " <> ALL(CAST(? AS text[]))", keysArg(keys)
}

func (d *dialect) InKeys(col string, keys map[string]bool) (string, any) {
	return col + " = ANY(CAST(? AS text[]))", keysArg(keys)
}

// IDArg is a pgtype.UUID. pgx encodes a uuid.UUID through its text form
// (driver.Valuer), after first failing a binary encode, which costs an
// enqueue more than the rest of its arguments together. A plain [16]byte
// would be cheaper still, but pgx's simple protocol (PgBouncer setups)
// cannot encode it.
func (d *dialect) IDArg(id uuid.UUID) any { return pgUUID(id) }

// Placeholder is $n, from a table built once: Save writes thousands of
// them a second.
func (d *dialect) Placeholder(n int) string {
	if n < len(dollars) {
		return dollars[n]
	}
	return "$" + strconv.Itoa(n)
}

// dollars are the placeholders of Save's largest INSERT (1,000 rows of 8
// columns).
var dollars = func() []string {
	out := make([]string, 8001)
	for i := range out {
		out[i] = "$" + strconv.Itoa(i)
	}
	return out
}()

// InsertPrefix marks the enqueue's INSERT, which package pgxpipeline holds
// until the transaction's next statement.
func (d *dialect) InsertPrefix() string { return pgmark.WaitMark }

func (d *dialect) PendingHint() string { return "" }

// AddressColumn: the walk reads each row's address beside it, and a claim
// locks its picked rows, and writes the results of the rows it holds, by
// their addresses (see refsArg).
func (d *dialect) AddressColumn() string { return refColumn("") }

func (d *dialect) Notifier() sqlstore.Notifier {
	if d.notifier == nil {
		return nil
	}
	return d.notifier
}

func (d *dialect) CheckServer(context.Context, *gorm.DB) error { return nil }

func (d *dialect) DeleteOld(table, id, where string) string {
	return "DELETE FROM " + table + " WHERE " + id + " IN (SELECT " + id + " FROM " + table + " WHERE " + where + " LIMIT ?)"
}

// Serialized takes the turn with an advisory lock inside the transaction,
// which its commit releases.
func (d *dialect) Serialized(_ context.Context, db *gorm.DB, turn sqlstore.Turn, key int64, fn func(tx *gorm.DB) error) error {
	lock := claimLock
	switch turn {
	case sqlstore.CleanupTurn:
		lock = cleanupLock
	case sqlstore.DurableClaimTurn:
		lock = durableClaimLock
	}
	return db.Transaction(func(tx *gorm.DB) error {
		var got sql.NullInt64
		if err := tx.Raw(lock, key).Scan(&got).Error; err != nil {
			return err
		}
		if got.Valid && got.Int64 == 0 {
			return core.ErrLockBusy
		}
		return fn(tx)
	})
}

// Recording runs in a transaction that first plans the statements for
// their arguments (resultSetup).
func (d *dialect) Recording(_ context.Context, db *gorm.DB, _ bool, fn func(db *gorm.DB) error) error {
	return db.Transaction(func(tx *gorm.DB) error {
		if err := tx.Exec(resultSetup).Error; err != nil {
			return err
		}
		return fn(tx)
	})
}

// LockPicked: rows in a publisher's held claim look due to a lease claim's
// walk: it locks what it picked, and leaves what it cannot lock (see
// heldClaim).
func (d *dialect) LockPicked(tx *gorm.DB, now time.Time, picked []sqlstore.Picked) ([]sqlstore.Picked, error) {
	return d.lockPicked(tx, nil, now, picked, 0, false)
}

// Migrate runs the migration in one transaction that first takes an
// advisory lock, which its end releases: PostgreSQL's DDL is transactional,
// so a failed migration leaves nothing half made, and a transaction's lock
// also holds behind PgBouncer's transaction pooling. It reads committed
// data whatever default_transaction_isolation says: a snapshot taken before
// the lock would miss the table its holder made.
func (d *dialect) Migrate(ctx context.Context, db *gorm.DB) error {
	wait := sqlstore.MigrationWait(ctx)
	return db.Transaction(func(tx *gorm.DB) error {
		var schema, lockTimeout string
		if err := tx.Raw("SELECT COALESCE(current_schema(), ''), current_setting('lock_timeout')").Row().Scan(&schema, &lockTimeout); err != nil {
			return fmt.Errorf("outbox: migrating table %s: reading the schema: %w", d.table, err)
		}
		table := d.table
		if !strings.Contains(table, ".") {
			table = schema + "." + table
		}
		// lock_timeout bounds the advisory lock's wait too; the migration's
		// own statements then wait as the session says.
		if err := tx.Exec("SELECT set_config('lock_timeout', ?, true)", fmt.Sprintf("%dms", wait.Milliseconds())).Error; err != nil {
			return fmt.Errorf("outbox: migrating table %s: setting lock_timeout: %w", d.table, err)
		}
		if err := tx.Exec("SELECT pg_advisory_xact_lock(?)", migrationKey(table)).Error; err != nil {
			return sqlstore.MigrationLockError(d.table, wait, err)
		}
		if err := tx.Exec("SELECT set_config('lock_timeout', ?, true)", lockTimeout).Error; err != nil {
			return fmt.Errorf("outbox: migrating table %s: setting lock_timeout: %w", d.table, err)
		}
		return Schema.MigrateTable(tx.Session(&gorm.Session{NewDB: true}), d.table,
			fmt.Sprintf("ALTER TABLE %s SET (fillfactor = %d)", tx.Statement.Quote(d.table), fillfactor))
	}, readCommitted) // each statement sees what the lock's last holder committed
}

var readCommitted = &sql.TxOptions{Isolation: sql.LevelReadCommitted}

// pgUUID is id as pgx encodes it in binary.
func pgUUID(id uuid.UUID) pgtype.UUID { return pgtype.UUID{Bytes: id, Valid: true} }

// migrationKey is the advisory lock of a schema-qualified table's
// migration; advisory locks are per database.
func migrationKey(table string) int64 {
	h := fnv.New64a()
	h.Write([]byte("gorm-outbox-migrate:" + table))
	return int64(h.Sum64())
}

// idsArg is one array literal of ids: pgx encodes each of hundreds of uuid
// parameters at a cost that outweighed the statement itself.
func idsArg(ids []uuid.UUID) string {
	var b strings.Builder
	b.Grow(len(ids)*37 + 2)
	b.WriteByte('{')
	for i, id := range ids {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(id.String())
	}
	b.WriteByte('}')
	return b.String()
}

// keysArg is one text[] literal (see idsArg), each key quoted, so that any
// character is safe.
func keysArg(keys map[string]bool) string {
	var b strings.Builder
	b.WriteByte('{')
	first := true
	for k := range keys {
		if !first {
			b.WriteByte(',')
		}
		first = false
		b.WriteByte('"')
		for _, r := range k {
			if r == '"' || r == '\\' {
				b.WriteByte('\\')
			}
			b.WriteRune(r)
		}
		b.WriteByte('"')
	}
	b.WriteByte('}')
	return b.String()
}
