package core

import (
	"errors"
	"time"

	"github.com/google/uuid"
)

// ClaimOptions says what Claim takes.
type ClaimOptions struct {
	Limit int           // at most this many messages
	Lease time.Duration // held for this long; then due again
	// SkipFailedKeys lets a key's later messages go ahead of an older one
	// that is waiting for a retry (KeySkip). Messages in flight always
	// hold their key back.
	SkipFailedKeys bool
}

// Failure is the outcome of one failed send, as MarkFailed stores it.
type Failure struct {
	ID            uuid.UUID
	Err           string
	NextAttemptAt time.Time
	// Dead moves the message to StateDead instead of scheduling a retry.
	Dead bool
}

// ListOptions filters List. The zero value lists the oldest 100 messages.
type ListOptions struct {
	State         State     // "" for every state
	Topic         string    // "" for every topic
	Key           string    // "" for every key
	CreatedBefore time.Time // zero for any age
	NewestFirst   bool      // newest first instead of oldest first
	Limit         int       // 100 when zero
	Offset        int       // messages to skip, for paging
}

// Stats is what monitoring needs to know of the table to find stuck messages.
type Stats struct {
	Counts map[State]int64 // messages in each state
	// OldestPendingAge is how long the oldest pending message has waited
	// (zero when none is pending): the one number to alert on.
	OldestPendingAge time.Duration
	Retrying         int64 // pending messages that have failed at least once
	// OverBudget counts messages, pending or dead, that have used at least
	// the attempt budget given to Stats.
	OverBudget int64
	// ExpiredClaims are claims whose lease ran out without a result: their
	// publisher died or stalled. They are due again and will be re-sent.
	ExpiredClaims int64
}

// RetentionPolicy says how long finished messages stay in the table. Pending
// messages are never deleted, whatever their age.
type RetentionPolicy struct {
	// Published messages are deleted this long after they were published
	// (default 7 days).
	Published time.Duration
	// Dead messages are deleted this long after they were enqueued; zero
	// (the default) keeps them until they are requeued or purged by hand.
	Dead time.Duration
	// BatchSize is how many rows one DELETE removes (default 1000): small
	// batches hold short locks and leave room for the publisher's writes.
	BatchSize int
}

// The errors that the store and the database packages return and package
// outbox re-exports.
var (
	// ErrNoTransaction: an enqueue outside a transaction, without
	// AllowWithoutTransaction.
	ErrNoTransaction = errors.New("outbox: enqueue needs a transaction so that events commit with the domain rows " +
		"(use db.Transaction, or do not use SkipDefaultTransaction; AllowWithoutTransaction permits it)")
	// ErrNotFound: Get of an id that is not in the table.
	ErrNotFound = errors.New("outbox: no such message")
	// ErrCleanupRunning: another process is cleaning the same table.
	ErrCleanupRunning = errors.New("outbox: another cleanup of this table is running")
	// ErrUnsupportedServer marks a database server the publisher cannot
	// use, which no wait mends.
	ErrUnsupportedServer = errors.New("outbox: unsupported database server")
	// ErrNotListening says the store cannot LISTEN for notifications at all.
	ErrNotListening = errors.New("outbox: LISTEN needs the pgx driver")
	// ErrLockBusy is what a try-lock (a cleanup's) returns when another
	// process holds it.
	ErrLockBusy = errors.New("outbox: lock held by another process")
)
