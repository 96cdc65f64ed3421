// Package sqlstore is the outbox store's engine: the SQL that every database
// shares (the enqueue's INSERT, the claim's walk in id order, the results,
// the admin reads and writes, retention), written once. What differs between
// databases is a Dialect, which each database's package (internal/postgres,
// internal/mysql, internal/sqlite) implements; nothing here knows a
// database by its name.
package sqlstore

import (
	"context"
	"time"

	"github.com/google/uuid"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/internal/core"
)

// Dialect is one database's part of the store: its SQL fragments, how it
// takes turns, its transactions, its schema and its server check. A
// database package may also implement PendingWalker, BatchClaimer and
// Listener.
type Dialect interface {
	// InIDs matches col against ids passed as one argument; NotInIDs
	// excludes them, or returns "" where the walk is better to read them
	// and skip them itself; NotInKeys excludes a set of message keys.
	InIDs(col string, ids []uuid.UUID) (sql string, arg any)
	NotInIDs(col string, ids []uuid.UUID) (sql string, arg any)
	NotInKeys(col string, keys map[string]bool) (sql string, arg any)
	// InKeys matches col against a set of message keys.
	InKeys(col string, keys map[string]bool) (sql string, arg any)
	// IDArg is how Save passes a message's id.
	IDArg(id uuid.UUID) any
	// Placeholder is the n-th (from 1) placeholder of Save's INSERT, which
	// the store writes out itself.
	Placeholder(n int) string
	// InsertPrefix starts Save's INSERT.
	InsertPrefix() string
	// PendingHint follows the table's name in every read of the pending
	// rows in id order (the claim's walk, unless PendingWalker says
	// otherwise, and Stats' oldest).
	PendingHint() string
	// AddressColumn, if not empty, is read beside each row by the walk: the
	// row's physical address (Picked.Ref).
	AddressColumn() string

	// Serialized runs fn in a transaction that holds the table's turn:
	// each claim (or cleanup) sees what the ones before it committed. key
	// identifies the turn; a cleanup's turn that another process holds is
	// core.ErrLockBusy, never a wait.
	Serialized(ctx context.Context, db *gorm.DB, turn Turn, key int64, fn func(tx *gorm.DB) error) error
	// Recording runs fn, which writes a claim's results: in a transaction
	// if inTx, or if the database needs one for them anyway.
	Recording(ctx context.Context, db *gorm.DB, inTx bool, fn func(db *gorm.DB) error) error
	// LockPicked runs in a lease claim's transaction after the walk: it
	// returns the picked rows the claim may stamp.
	LockPicked(tx *gorm.DB, now time.Time, picked []Picked) ([]Picked, error)
	// DeleteOld is one retention batch's DELETE of the rows of table that
	// match where, at most the statement's last argument.
	DeleteOld(table, id, where string) string
	// Notifier is what tells other processes of an enqueue; nil for none.
	Notifier() Notifier

	// Migrate creates the table and its indexes, or adds what is missing,
	// one process at a time.
	Migrate(ctx context.Context, db *gorm.DB) error
	// CheckServer refuses a server the publisher cannot use
	// (core.ErrUnsupportedServer), or says that it cannot be reached.
	CheckServer(ctx context.Context, db *gorm.DB) error
}

// Turn is what a Serialized transaction takes its turn for.
type Turn int

const (
	ClaimTurn   Turn = iota // a lease claim: waits for the claim before it
	CleanupTurn             // a retention batch: gives up if another runs
	// DurableClaimTurn is a lease claim that takes ClaimTurn's turn and
	// whose commit must be on disk before it returns: an exactly-once
	// claim, which a broker transaction may commit on the strength of.
	DurableClaimTurn
	// WholeClaimTurn is the turn of exactly-once held claims (WholeTurn).
	WholeClaimTurn
)

// Notifier tells the publishers of other processes that an enqueue has
// committed.
type Notifier interface {
	// Due reports whether the enqueue about to be written notifies.
	Due() bool
	// Returning, appended to a one-row INSERT, notifies in the same
	// statement; Statement notifies on its own.
	Returning() string
	Statement() string
}

// Picked is a message the walk picked, with its row's address where the
// dialect reads one (AddressColumn).
type Picked struct {
	*core.OutboxMessage
	Ref string
	// Group is the message's transaction group (its tx_group, or its own
	// id where that is NULL), where the lock read it; zero where not.
	Group uuid.UUID
}

// Batch is a claim's messages and how their results are recorded.
type Batch interface {
	Messages() []*core.OutboxMessage
	// Record records the results; the messages in released, and any not
	// named at all, are handed back due with no attempt counted.
	Record(work context.Context, published []uuid.UUID, failures []core.Failure, released []uuid.UUID) error
	// GiveBack hands every message back unsent.
	GiveBack(work context.Context) error
	// End frees what the claim holds once nothing more is recorded.
	End()
}

// PendingWalker is a Dialect whose walks may begin another way than along
// the pending index: FirstWalkFrom returns the FROM and WHERE of a walk's
// first read of the pending rows of table (quoted), for a store that
// deletes its published rows if deletesPublished, or "" for the pending
// index. Pick adds its conditions after it and orders by id.
type PendingWalker interface {
	FirstWalkFrom(table string, deletesPublished bool) string
}

// BatchClaimer is a dialect whose publishers claim in a way of their own
// instead of by lease (Store.Claim).
type BatchClaimer interface {
	ClaimBatch(ctx, work context.Context, opts core.ClaimOptions) (Batch, error)
}

// Listener is a dialect that can wait for other processes' enqueues:
// Listen calls ready once it listens and wake on each notification, and
// returns when ctx ends or the connection fails (core.ErrNotListening: it
// never can).
type Listener interface {
	Listen(ctx context.Context, ready, wake func()) error
}

// ListArgs is the part of a Dialect for a database whose driver takes ?
// placeholders, and a list as one argument that GORM expands (MySQL,
// SQLite): a database package embeds it and writes the rest.
type ListArgs struct{}

func (ListArgs) InIDs(col string, ids []uuid.UUID) (string, any)    { return col + " IN ?", ids }
func (ListArgs) NotInIDs(col string, ids []uuid.UUID) (string, any) { return col + " NOT IN ?", ids }
func (ListArgs) NotInKeys(col string, keys map[string]bool) (string, any) {
	out := make([]string, 0, len(keys))
	for k := range keys {
		out = append(out, k)
	}
	return col + " NOT IN ?", out
}
func (ListArgs) InKeys(col string, keys map[string]bool) (string, any) {
	out := make([]string, 0, len(keys))
	for k := range keys {
		out = append(out, k)
	}
	return col + " IN ?", out
}
func (ListArgs) IDArg(id uuid.UUID) any { return id }
func (ListArgs) Placeholder(int) string { return "?" }
func (ListArgs) InsertPrefix() string   { return "" }
func (ListArgs) AddressColumn() string  { return "" }
func (ListArgs) Notifier() Notifier     { return nil }
