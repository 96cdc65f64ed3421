package sqlstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"hash/fnv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/internal/core"
)

// Config is what the store needs of the plugin's settings.
type Config struct {
	Table           string
	DeletePublished bool // MarkPublished deletes the rows
	AllowNoTx       bool // Save may run outside a transaction
}

// Store reads and writes one outbox table through GORM, with a Dialect for
// what differs between databases.
type Store struct {
	db      *gorm.DB
	cfg     Config
	dialect Dialect
	columns string // every column, quoted, in readMessages' order
	// walk is the claim's read of the pending rows (see Pick), walkKeys a
	// walk that reads no row whole, only what Pick needs; each from the
	// pending index, after its SELECT part (walkSelect, walkKeysSelect).
	walk, walkKeys             string
	walkSelect, walkKeysSelect string
	insert                     string // Save's INSERT up to VALUES
	single                     string // Save's whole INSERT of one message, the common case
	grouped                    string // Save's INSERT up to VALUES, with tx_group
	// lastWalk is how many pending rows the last claim read to find its
	// messages (see claimWindow).
	lastWalk atomic.Int64
}

// New returns the store of cfg.Table on db. Each of its writes is one
// statement, atomic by itself: GORM's default transaction around it would
// only add two round trips.
func New(db *gorm.DB, cfg Config, d Dialect) *Store {
	s := &Store{db: db.Session(&gorm.Session{NewDB: true, SkipDefaultTransaction: true}), cfg: cfg, dialect: d}
	cols := make([]string, len(Columns))
	for i, c := range Columns {
		cols[i] = s.Quote(c.Name)
	}
	s.columns = strings.Join(cols, ", ")
	// The walk reads whole rows only where they are due: of the others
	// (mostly rows in flight, at the front of the queue) it needs the key,
	// the due time and whether a claim holds them.
	keys := []string{s.Quote("id"), s.Quote("message_key"), s.Quote("next_attempt_at"), s.Quote("claim_token"),
		s.Quote("attempts"), s.Quote("created_at")}
	walk := keys
	for _, c := range walkIfDue {
		walk = append(walk, "CASE WHEN "+s.Quote("next_attempt_at")+" <= ? THEN "+s.Quote(c)+" END")
	}
	if ref := d.AddressColumn(); ref != "" {
		walk, keys = append(walk, ref), append(keys, ref)
	}
	from := " FROM " + s.QuotedTable() + d.PendingHint() + " WHERE " + s.Quote("state") + " = 'pending'"
	s.walkSelect, s.walkKeysSelect = "SELECT "+strings.Join(walk, ", "), "SELECT "+strings.Join(keys, ", ")
	s.walk, s.walkKeys = s.walkSelect+from, s.walkKeysSelect+from
	ins := make([]string, len(insertColumns))
	for i, c := range insertColumns {
		ins[i] = s.Quote(c)
	}
	s.insert = d.InsertPrefix() + "INSERT INTO " + s.QuotedTable() + " (" + strings.Join(ins, ", ") + ") VALUES "
	s.grouped = d.InsertPrefix() + "INSERT INTO " + s.QuotedTable() + " (" + strings.Join(ins, ", ") + ", " + s.Quote("tx_group") + ") VALUES "
	s.single = s.insertSQL(1, "")
	return s
}

// DB is the store's session: no default transaction, no statement of the caller's.
func (s *Store) DB() *gorm.DB { return s.db }

// GroupIndexer is a dialect whose table has no index of tx_group until
// exactly-once mode, the one that reads it, asks for it.
type GroupIndexer interface {
	EnsureGroupIndex(ctx context.Context, db *gorm.DB) error
}

// EnsureGroupIndex gives the table the index exactly-once mode's claims
// read, where its schema has none.
func (s *Store) EnsureGroupIndex(ctx context.Context) error {
	if g, ok := s.dialect.(GroupIndexer); ok {
		return g.EnsureGroupIndex(ctx, s.db.WithContext(orBackground(ctx)))
	}
	return nil
}

// Dialect is the store's database part.
func (s *Store) Dialect() Dialect { return s.dialect }

// Table is the outbox table's name, as configured.
func (s *Store) Table() string { return s.cfg.Table }

// Quote quotes an identifier for the database.
func (s *Store) Quote(name string) string { return s.db.Statement.Quote(name) }

// QuotedTable is the table's name, quoted.
func (s *Store) QuotedTable() string { return s.Quote(s.cfg.Table) }

// LockKey is the number that names a turn of this table (Serialized),
// the same in every process.
func (s *Store) LockKey(turn Turn) int64 {
	h := fnv.New64a()
	h.Write([]byte("gorm-outbox:" + s.cfg.Table))
	return int64(h.Sum64()) + int64(turn)
}

// SQLDB is the store's connection pool.
func (s *Store) SQLDB() (*sql.DB, error) { return s.db.DB() }

// ClaimBatch claims for a publisher: the dialect's own way if it has one,
// by lease otherwise.
func (s *Store) ClaimBatch(ctx, work context.Context, opts core.ClaimOptions) (Batch, error) {
	if c, ok := s.dialect.(BatchClaimer); ok {
		return c.ClaimBatch(ctx, work, opts)
	}
	token, msgs, err := s.Claim(ctx, opts)
	if err != nil {
		return nil, err
	}
	return &LeaseBatch{Store: s, Token: token, Msgs: msgs}, nil
}

// WholeClaimer is a dialect whose held claims can hold whole transaction
// groups (HeldClaims.ClaimWhole): exactly-once mode claims through it.
type WholeClaimer interface {
	ClaimWhole(ctx, work context.Context, opts core.ClaimOptions, excluded func([]uuid.UUID) (map[uuid.UUID]bool, error)) (*HeldClaim, error)
}

// WholeClaimer is the dialect's, if its claims are held (nil otherwise,
// and where the pool is not a *sql.DB, whose connections a held claim
// needs to set up).
func (s *Store) WholeClaimer() WholeClaimer {
	w, _ := s.dialect.(WholeClaimer)
	if _, err := s.SQLDB(); err != nil {
		return nil
	}
	return w
}

// Listens reports whether the database can tell publishers of other
// processes' enqueues.
func (s *Store) Listens() bool {
	_, ok := s.dialect.(Listener)
	return ok
}

// Listen waits for other processes' enqueues (see Listener).
func (s *Store) Listen(ctx context.Context, ready, wake func()) error {
	l, ok := s.dialect.(Listener)
	if !ok {
		return core.ErrNotListening
	}
	return l.Listen(ctx, ready, wake)
}

// CheckServer refuses a server the publisher cannot use.
func (s *Store) CheckServer(ctx context.Context) error {
	return s.dialect.CheckServer(ctx, s.db.WithContext(ctx))
}

// Migrate creates or completes the table (see Dialect.Migrate).
func (s *Store) Migrate(ctx context.Context) error {
	return s.dialect.Migrate(ctx, s.db.WithContext(ctx))
}

// leaseStore is what a lease claim records its results through.
type leaseStore interface {
	MarkPublished(ctx context.Context, token string, ids []uuid.UUID) error
	MarkFailed(ctx context.Context, token string, failures []core.Failure) error
	Release(ctx context.Context, token string, ids []uuid.UUID) error
}

// LeaseBatch is a claim stamped with a token and a lease (Claim), whose
// results go through Store's methods.
type LeaseBatch struct {
	Store leaseStore
	Token string
	Msgs  []*core.OutboxMessage
}

func (b *LeaseBatch) Messages() []*core.OutboxMessage { return b.Msgs }

func (b *LeaseBatch) Record(work context.Context, published []uuid.UUID, failures []core.Failure, released []uuid.UUID) error {
	return errors.Join(
		b.Store.MarkPublished(work, b.Token, published),
		b.Store.MarkFailed(work, b.Token, failures),
		b.Store.Release(work, b.Token, released),
	)
}

func (b *LeaseBatch) GiveBack(work context.Context) error {
	return b.Store.Release(work, b.Token, IDs(b.Msgs))
}

func (b *LeaseBatch) End() {}

// IDs are the ids of msgs, in order.
func IDs(msgs []*core.OutboxMessage) []uuid.UUID {
	out := make([]uuid.UUID, len(msgs))
	for i, m := range msgs {
		out[i] = m.ID
	}
	return out
}

// inTransaction reports whether tx runs inside a database transaction, which
// is what makes the outbox rows commit or roll back with the domain rows.
func inTransaction(tx *gorm.DB) bool {
	_, ok := tx.Statement.ConnPool.(gorm.TxCommitter)
	return ok
}

// insertColumns are written by Save; every other column takes its default.
var insertColumns = []string{"id", "topic", "message_key", "payload", "headers", "state", "next_attempt_at", "created_at"}

// maxRowsPerInsert keeps a multi-row INSERT's parameters far below
// PostgreSQL's limit of 65535 (and SQLite's of 32766).
const maxRowsPerInsert = 1000

// Save writes msgs with multi-row INSERTs on tx's connection, in the
// caller's transaction. The statement does not go through GORM's Exec,
// which built it again for every event (a new session, its clauses, its
// placeholders); GORM's logger still sees it, callbacks registered on Raw
// do not. In a DryRun session it writes nothing.
func (s *Store) Save(ctx context.Context, tx *gorm.DB, msgs ...*core.OutboxMessage) error {
	if len(msgs) == 0 {
		return nil
	}
	if tx == nil || tx.Config == nil || tx.Statement == nil {
		return fmt.Errorf("outbox: Save needs the caller's *gorm.DB transaction, got nil")
	}
	for i, m := range msgs {
		if m == nil {
			return fmt.Errorf("outbox: message %d of %d given to Save is nil", i+1, len(msgs))
		}
	}
	if !s.cfg.AllowNoTx && !inTransaction(tx) {
		return core.ErrNoTransaction
	}
	if tx.Error != nil { // what GORM's Exec would return instead of running
		return fmt.Errorf("outbox: writing %d messages to %s: %w", len(msgs), s.cfg.Table, tx.Error)
	}
	if tx.DryRun {
		return nil
	}
	if ctx == nil { // as before Save ran its own statement: the caller's
		ctx = tx.Statement.Context
	}
	if ctx == nil {
		ctx = context.Background()
	}
	notifier := s.dialect.Notifier()
	notify := notifier != nil && notifier.Due() // sent with the first one-row INSERT, or after the INSERTs
	for start := 0; start < len(msgs); start += maxRowsPerInsert {
		chunk := msgs[start:min(start+maxRowsPerInsert, len(msgs))]
		grouped := false
		for _, m := range chunk {
			grouped = grouped || m.TxGroup != nil
		}
		args := make([]any, 0, len(chunk)*(len(insertColumns)+1))
		for _, m := range chunk {
			args = append(args, s.dialect.IDArg(m.ID), m.Topic, m.Key, m.Payload, m.Headers, m.State, m.NextAttemptAt.UTC(), m.CreatedAt.UTC())
			if grouped {
				var g any
				if m.TxGroup != nil {
					g = s.dialect.IDArg(*m.TxGroup)
				}
				args = append(args, g)
			}
		}
		query := s.single
		switch {
		case grouped:
			query = s.groupedSQL(len(chunk))
		case len(chunk) > 1:
			query = s.insertSQL(len(chunk), "")
		case notify:
			query, notify = s.insertSQL(1, notifier.Returning()), false
		}
		if err := execOn(ctx, tx, query, args); err != nil {
			return fmt.Errorf("outbox: writing %d messages to %s: %w", len(chunk), s.cfg.Table, err)
		}
	}
	if notify {
		if err := execOn(ctx, tx, notifier.Statement(), nil); err != nil {
			return fmt.Errorf("outbox: notifying the publishers of %s: %w", s.cfg.Table, err)
		}
	}
	return nil
}

// insertSQL is Save's INSERT of n messages, followed by returning.
func (s *Store) insertSQL(n int, returning string) string {
	var b strings.Builder
	b.Grow(len(s.insert) + n*len(insertColumns)*6 + len(returning))
	b.WriteString(s.insert)
	arg := 0
	for i := range n {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteByte('(')
		for j := range insertColumns {
			if j > 0 {
				b.WriteString(", ")
			}
			arg++
			b.WriteString(s.dialect.Placeholder(arg))
		}
		b.WriteByte(')')
	}
	b.WriteString(returning)
	return b.String()
}

// groupedSQL is Save's INSERT of n messages with their tx_group.
func (s *Store) groupedSQL(n int) string {
	var b strings.Builder
	b.WriteString(s.grouped)
	arg := 0
	for i := range n {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteByte('(')
		for j := range len(insertColumns) + 1 {
			if j > 0 {
				b.WriteString(", ")
			}
			arg++
			b.WriteString(s.dialect.Placeholder(arg))
		}
		b.WriteByte(')')
	}
	return b.String()
}

// execOn runs query on tx's connection, as GORM's Exec would, and reports
// it to tx's logger.
func execOn(ctx context.Context, tx *gorm.DB, query string, args []any) error {
	begin := time.Now()
	res, err := tx.Statement.ConnPool.ExecContext(ctx, query, args...)
	tx.Logger.Trace(ctx, begin, func() (string, int64) {
		rows := int64(-1)
		if res != nil {
			rows, _ = res.RowsAffected()
		}
		return tx.Dialector.Explain(query, args...), rows
	}, err)
	return err
}
