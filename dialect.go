package outbox

import (
	"database/sql"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/internal/pgmark"
)

// dialect holds what differs between databases. Adding a database means
// adding one value here (and its DDL), not touching the store's logic.
type dialect struct {
	name string
	// claimLock, run first in the claim's transaction, serializes claims
	// (see GormStore.Claim). Empty where the database serializes writers.
	// On PostgreSQL it also makes the claim's commit return before the WAL
	// is on disk: the claim holds the lock every other claim waits for, and
	// a claim lost in a crash only hands its rows back (sent again, never
	// lost); and it plans the claim's statements for their arguments (see
	// GormStore.lockPicked).
	claimLock   string
	claimUnlock string
	// cleanupLock, run first in each cleanup batch's transaction, returns
	// false when another process is cleaning the same table.
	cleanupLock   string
	cleanupUnlock string
	// claimTx are the claim transaction's options: MySQL's default
	// REPEATABLE READ would read the busy keys from an older snapshot.
	claimTx *sql.TxOptions
	// resultTx are the options of the transaction that records a claim's
	// results. MySQL's REPEATABLE READ makes InnoDB lock the record after
	// each id an UPDATE looks up; when that is a row an open transaction
	// has just inserted, the UPDATE waits for that transaction's end, and
	// a long one outlasts the lease, so the batch is sent twice. nil: the
	// single statements run alone.
	resultTx *sql.TxOptions
	// resultSetup, where set, runs first in a transaction around each of
	// the lease API's result writes (MarkPublished, MarkFailed, Release).
	// On PostgreSQL it plans them for their id lists: pgx caches prepared
	// statements, and a generic plan for "id = ANY($1)" chosen while the
	// table was nearly empty scans the whole table once it is not (see
	// lockPicked).
	resultSetup string
	// deleteLimit: DELETE ... LIMIT, for a database that cannot select from
	// the table it deletes from.
	deleteLimit bool
	// pendingHint follows the table's name in every read of the pending
	// rows in id order (the claim's walk, Stats' oldest). MariaDB's
	// optimizer reads "state = 'pending' ORDER BY id LIMIT n" along the
	// primary key, through every published row, instead of along the
	// pending index, so a claim slows down with every row retention
	// keeps; a hint that names no index of ours cannot fail on a table
	// created by hand.
	pendingHint string
	// walkSetup, where set, runs in a claim's transaction before its walk:
	// it leaves the planner no way to read the pending rows but along the
	// pending index, in id order. With statistics taken while the table
	// was empty or nearly (before a backlog, which autovacuum analyzes
	// only once a tenth of the table has changed), PostgreSQL chose a
	// bitmap scan of every pending row and a sort, for each walk: a cost
	// that grows with the backlog the walk is meant to drain.
	// The settings last until the claim's transaction ends; its other
	// statements find rows by address or by primary key.
	walkSetup string
	// inIDs matches a list of ids given as one argument (GormStore.idsArg),
	// notInIDs excludes one (PostgreSQL 15 hashes a long list).
	inIDs, notInIDs string
	// notInKeys excludes a list of keys given as one argument (GormStore.keysArg).
	notInKeys string
	// binaryIDs: Save passes ids as pgtype.UUID. pgx encodes a uuid.UUID
	// through its text form (driver.Valuer), after first failing a binary
	// encode, which costs an enqueue more than the rest of its arguments
	// together. A plain [16]byte would be cheaper still, but pgx's simple
	// protocol (PgBouncer setups) cannot encode it.
	binaryIDs bool
	// waitPrefix starts the enqueue's statements, which package
	// pgxpipeline holds until the transaction's next statement.
	waitPrefix string
	// numberedArgs: placeholders are $1, $2... instead of ?, in the
	// statements the store writes out itself (Save's INSERT).
	numberedArgs bool
	// holdClaims: the publisher claims with a transaction held across the
	// send (heldClaim), and Claim locks the rows it picks so that it never
	// takes one of them.
	holdClaims bool
	// oneWriter: the store's own write transactions (claims, results,
	// cleanups) take turns in the process. SQLite has one writer, and one
	// that finds it taken sleeps in steps of up to 100 ms (busy_timeout),
	// so that several workers would spend most of their time asleep.
	oneWriter bool
	// addresses: the walk reads each row's address in the table beside it,
	// and a claim locks its picked rows, and writes the results of the rows
	// it holds, by their addresses (see refsArg).
	addresses bool
	// minVersion checks the server when a publisher starts.
	minVersion func(db *gorm.DB) error
	// listens: enqueues send a NOTIFY that publishers LISTEN for.
	listens bool
}

var dialects = map[string]dialect{
	// MySQL and MariaDB: the claim picks its rows with a plain read. A
	// locking read would either wait for every open enqueuing transaction
	// (FOR UPDATE blocks on their uncommitted rows) or, with SKIP LOCKED,
	// skip rows InnoDB locked for other reasons, among them a key's oldest
	// message, and take the next one. Claims are serialized by the named
	// lock and only a claim stamps a due row, so the plain read is safe.
	"mysql": {name: "mysql",
		claimLock: "SELECT GET_LOCK(?, 30)", claimUnlock: "SELECT RELEASE_LOCK(?)",
		cleanupLock: "SELECT GET_LOCK(?, 0)", cleanupUnlock: "SELECT RELEASE_LOCK(?)",
		claimTx:     &sql.TxOptions{Isolation: sql.LevelReadCommitted},
		resultTx:    &sql.TxOptions{Isolation: sql.LevelReadCommitted},
		deleteLimit: true, minVersion: mysqlSkipLocked, inIDs: "IN ?", notInIDs: "NOT IN ?", notInKeys: "NOT IN ?",
		pendingHint: " IGNORE INDEX (PRIMARY)"},
	"postgres": {name: "postgres", claimLock: "SELECT 1 FROM (SELECT pg_advisory_xact_lock(?), set_config('synchronous_commit', 'off', true), set_config('plan_cache_mode', 'force_custom_plan', true)," +
		" set_config('enable_seqscan', 'off', true), set_config('enable_bitmapscan', 'off', true)) l",
		walkSetup:   "SELECT set_config('enable_seqscan', 'off', true), set_config('enable_bitmapscan', 'off', true)",
		cleanupLock: "SELECT CAST(pg_try_advisory_xact_lock(?) AS integer)", inIDs: "= ANY(CAST(? AS uuid[]))", notInIDs: "<> ALL(CAST(? AS uuid[]))",
		notInKeys: "<> ALL(CAST(? AS text[]))", binaryIDs: true, numberedArgs: true, holdClaims: true, listens: true, waitPrefix: pgmark.WaitMark,
		resultSetup: "SELECT set_config('plan_cache_mode', 'force_custom_plan', true)", addresses: true},
	"sqlite": {name: "sqlite", inIDs: "IN ?", notInIDs: "NOT IN ?", notInKeys: "NOT IN ?", oneWriter: true},
}

func dialectOf(db *gorm.DB) (dialect, error) {
	name := db.Dialector.Name()
	d, ok := dialects[name]
	if !ok {
		return dialect{}, fmt.Errorf("outbox: database %q is not supported (supported: postgres, sqlite, mysql and mariadb)", name)
	}
	return d, nil
}

var versionNumber = regexp.MustCompile(`^(\d+)\.(\d+)\.?(\d*)`)

// mysqlSkipLocked refuses servers without FOR UPDATE SKIP LOCKED, which
// several publishers need to divide the work: MySQL before 8.0.1, MariaDB
// before 10.6.
func mysqlSkipLocked(db *gorm.DB) error {
	var v string
	if err := db.Raw("SELECT VERSION()").Scan(&v).Error; err != nil {
		return fmt.Errorf("outbox: reading the server version: %w", err)
	}
	return checkSkipLocked(v)
}

// errUnsupportedServer marks a server the publisher cannot use, which no
// wait mends.
var errUnsupportedServer = errors.New("outbox: unsupported database server")

func checkSkipLocked(v string) error {
	if err := skipLocked(v); err != nil {
		return fmt.Errorf("%w: %w", errUnsupportedServer, err)
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
	if major < 8 || major == 8 && minor == 0 && patch < 1 {
		return fmt.Errorf("MySQL %s has no FOR UPDATE SKIP LOCKED; the publisher needs MySQL 8.0.1 or later", v)
	}
	return nil
}
