package outbox

import (
	"context"
	"database/sql"
	"errors"
	"slices"
	"time"

	"github.com/google/uuid"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/internal/core"
	"github.com/gorm-outbox/outbox/internal/sqlstore"
)

// Store persists outbox messages. GormStore is the implementation for the
// databases GORM drives; the interface is what PublishFromOutbox and
// SaveToOutbox need, so that a test or another backend can stand in. A
// Publisher given a Store of yours (WithStore) claims by lease, sends,
// records, retries and keeps each key's order through these methods alone;
// it also reports the backlog gauges if the store has GormStore's Stats
// method, and runs retention if it has its Cleanup method. Wake-ups, LISTEN
// and the held claim are the plugin's store's.
type Store interface {
	// Save writes messages on tx, the caller's transaction.
	Save(ctx context.Context, tx *gorm.DB, msgs ...*OutboxMessage) error
	// Claim takes due pending messages, oldest first, in its own short
	// transaction, and returns them with the claim's token. It never takes a
	// message whose key has an older message in flight, nor (unless
	// opts.SkipFailedKeys) one whose key has an older message waiting for a
	// retry: that is what keeps each key's messages in order.
	Claim(ctx context.Context, opts ClaimOptions) (token string, msgs []*OutboxMessage, err error)
	// MarkPublished records a successful send of messages still held by token.
	MarkPublished(ctx context.Context, token string, ids []uuid.UUID) error
	// MarkFailed records failed sends of messages still held by token.
	MarkFailed(ctx context.Context, token string, failures []Failure) error
	// Release hands messages held by token back, due now, with no attempt counted.
	Release(ctx context.Context, token string, ids []uuid.UUID) error
}

// OutboxStore is the design document's name for Store.
type OutboxStore = Store

// ClaimOptions says what Claim takes: at most Limit messages, held for
// Lease; SkipFailedKeys lets a key's later messages go ahead of an older
// one waiting for a retry (KeySkip).
type ClaimOptions = core.ClaimOptions

// Failure is the outcome of one failed send, as MarkFailed stores it; Dead
// moves the message to StateDead instead of scheduling a retry.
type Failure = core.Failure

// ListOptions filters List. The zero value lists the oldest 100 messages.
type ListOptions = core.ListOptions

// Stats is what monitoring needs to know of the table to find stuck
// messages; OldestPendingAge is the one number to alert on.
type Stats = core.Stats

// The store's errors.
var (
	// ErrNoTransaction is returned when an enqueue is not inside a
	// transaction and AllowWithoutTransaction was not given.
	ErrNoTransaction = core.ErrNoTransaction
	// ErrNotFound is returned by Get for an id that is not in the table.
	ErrNotFound = core.ErrNotFound
)

// GormStore is the Store for PostgreSQL, MariaDB/MySQL and SQLite, through
// GORM. Its SQL is the store engine's and its database's package's; this
// type adds what the plugin needs: the enqueue's validation and the
// wake-up of this process's publishers.
type GormStore struct {
	engine  *sqlstore.Store
	cfg     config
	wakeups *wakeups
	groups  txGroups
}

// PostgresOutboxStore is the design document's name for the store on
// PostgreSQL; it is a GormStore.
type PostgresOutboxStore = GormStore

// NewStore returns the store for db's database, with the same options as Plugin.
// Most applications get theirs from StoreOf after db.Use(Plugin(...)).
func NewStore(db *gorm.DB, opts ...PluginOption) (*GormStore, error) {
	cfg, err := newConfig(opts)
	if err != nil {
		return nil, err
	}
	return newStore(db, cfg)
}

// NewPostgresOutboxStore returns the store for a PostgreSQL db, and an error
// for any other database.
func NewPostgresOutboxStore(db *gorm.DB, opts ...PluginOption) (*PostgresOutboxStore, error) {
	if err := requireDatabase(db, "postgres", "NewPostgresOutboxStore"); err != nil {
		return nil, err
	}
	return NewStore(db, opts...)
}

func newStore(db *gorm.DB, cfg config) (*GormStore, error) {
	if db == nil || db.Config == nil || db.Dialector == nil {
		return nil, errors.New("outbox: the store needs an opened *gorm.DB, got nil")
	}
	d, err := databaseNamed(db.Dialector.Name())
	if err != nil {
		return nil, err
	}
	return &GormStore{engine: d.Open(db, cfg.storeConfig(), cfg.notifyInterval), cfg: cfg, wakeups: &wakeups{}}, nil
}

// StoreOf returns the store that Plugin registered on db.
func StoreOf(db *gorm.DB) (*GormStore, error) {
	p, err := pluginOf(db)
	if err != nil {
		return nil, err
	}
	return p.store, nil
}

// The publisher's capabilities of the plugin's store (see relay.go).
var (
	_ batchClaimer   = (*GormStore)(nil)
	_ statser        = (*GormStore)(nil)
	_ cleaner        = (*GormStore)(nil)
	_ wakeSource     = (*GormStore)(nil)
	_ notifyListener = (*GormStore)(nil)
	_ serverChecker  = (*GormStore)(nil)
	_ pooled         = (*GormStore)(nil)
	_ instrumented   = (*GormStore)(nil)
)

// claimBatch claims in the database's way (on PostgreSQL, held across the
// send), or through outer's own Claim where a store embeds this one.
func (s *GormStore) claimBatch(outer Store, ctx, work context.Context, opts ClaimOptions) (claimedBatch, error) {
	if outer != Store(s) {
		return leaseClaim(outer, ctx, opts)
	}
	return s.engine.ClaimBatch(ctx, work, opts)
}

func (s *GormStore) subscribe(w waker) func() { return s.wakeups.subscribe(w) }

func (s *GormStore) checkServer(ctx context.Context) error { return s.engine.CheckServer(ctx) }

func (s *GormStore) sqlDB() (*sql.DB, error) { return s.engine.SQLDB() }

func (s *GormStore) telemetry() *telemetry { return s.cfg.telemetry }

func (s *GormStore) listens() bool { return s.engine.Listens() }

func (s *GormStore) listenOnce(ctx context.Context, ready, wake func()) error {
	return s.engine.Listen(ctx, ready, wake)
}

// servesPool reports whether the store works on db's connections: the same
// *sql.DB, whatever session (PrepareStmt's included) db is.
func (s *GormStore) servesPool(db *gorm.DB) bool {
	mine, err1 := s.engine.SQLDB()
	theirs, err2 := db.DB()
	if err1 != nil || err2 != nil {
		return s.engine.DB().Config.ConnPool == db.Config.ConnPool
	}
	return mine == theirs
}

// TableName is the outbox table this store reads and writes.
func (s *GormStore) TableName() string { return s.cfg.table }

// CreateOutboxTable creates the table and its indexes, or adds what is missing.
// Processes that run it at once on one database take turns, each waiting
// at most a minute (or until ctx ends) for the one before it.
func (s *GormStore) CreateOutboxTable(ctx context.Context) error {
	return s.engine.Migrate(orBackground(ctx))
}

// orBackground is ctx, or context.Background() for a nil one: a nil
// context is a caller's slip that should not become a panic.
func orBackground(ctx context.Context) context.Context {
	if ctx == nil {
		return context.Background()
	}
	return ctx
}

// inTransaction reports whether tx runs inside a database transaction, which
// is what makes the outbox rows commit or roll back with the domain rows.
func inTransaction(tx *gorm.DB) bool {
	_, ok := tx.Statement.ConnPool.(gorm.TxCommitter)
	return ok
}

// Save implements Store. It writes all messages with multi-row INSERTs on
// tx's connection, in the caller's transaction; GORM's logger sees each
// statement, callbacks registered on Raw do not. In a DryRun session it
// writes nothing. It ties the messages of one transaction (TxGroup): the
// first one tx's transaction saves leads the group.
func (s *GormStore) Save(ctx context.Context, tx *gorm.DB, msgs ...*OutboxMessage) error {
	if slices.Contains(msgs, nil) {
		return s.engine.Save(ctx, tx, msgs...) // which names the nil message
	}
	s.groups.assign(tx, msgs)
	return s.engine.Save(ctx, tx, msgs...)
}

// Claim implements Store. In one short transaction it reads the front of
// the pending queue in id order, picks the due rows of keys that hold
// nothing, and stamps them with the token and the lease's end; no
// transaction stays open while the broker is called, and a claim whose
// publisher dies simply expires. Claims of one table take turns, so that
// each sees the ones before it; sending stays parallel. Messages with an
// empty key are never held back.
func (s *GormStore) Claim(ctx context.Context, opts ClaimOptions) (string, []*OutboxMessage, error) {
	return s.engine.Claim(ctx, opts)
}

// MarkPublished implements Store: the messages become published, or are
// deleted under WithDeleteOnPublish.
func (s *GormStore) MarkPublished(ctx context.Context, token string, ids []uuid.UUID) error {
	return s.engine.MarkPublished(ctx, token, ids)
}

// MarkFailed implements Store. Each failure is its own UPDATE, all in one
// transaction.
func (s *GormStore) MarkFailed(ctx context.Context, token string, failures []Failure) error {
	return s.engine.MarkFailed(ctx, token, failures)
}

// Release implements Store.
func (s *GormStore) Release(ctx context.Context, token string, ids []uuid.UUID) error {
	return s.engine.Release(ctx, token, ids)
}

// List returns messages, oldest first unless opts.NewestFirst.
func (s *GormStore) List(ctx context.Context, opts ListOptions) ([]OutboxMessage, error) {
	return s.engine.List(ctx, opts)
}

// Get returns one message, or an error wrapping ErrNotFound.
func (s *GormStore) Get(ctx context.Context, id uuid.UUID) (*OutboxMessage, error) {
	return s.engine.Get(ctx, id)
}

// CountOlder counts the messages in state that Cleanup would delete with a
// retention of age: created, and for published ones published, before it.
func (s *GormStore) CountOlder(ctx context.Context, state State, age time.Duration) (int64, error) {
	return s.engine.CountOlder(ctx, state, age)
}

// Requeue makes dead messages pending again with a fresh attempt budget,
// due now. It returns how many it requeued; ids that are not dead are left
// alone. The last error is kept for the record until the next attempt.
func (s *GormStore) Requeue(ctx context.Context, ids ...uuid.UUID) (int64, error) {
	return s.engine.Requeue(ctx, ids...)
}

// RequeueDead requeues every dead message, or those of one topic if topic is not empty.
func (s *GormStore) RequeueDead(ctx context.Context, topic string) (int64, error) {
	return s.engine.RequeueDead(ctx, topic)
}

// Stats reads the table's state; attemptBudget is the MaxAttempts to count
// OverBudget against (DefaultRetryPolicy's when zero).
func (s *GormStore) Stats(ctx context.Context, attemptBudget int) (Stats, error) {
	if attemptBudget <= 0 {
		attemptBudget = DefaultRetryPolicy.MaxAttempts
	}
	return s.engine.Stats(ctx, attemptBudget)
}

// Count returns how many messages are in each state.
func (s *GormStore) Count(ctx context.Context) (map[State]int64, error) {
	return s.engine.Count(ctx)
}
