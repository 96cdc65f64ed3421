package outbox

import (
	"context"
	sql2 "database/sql"
	"errors"
	"fmt"
	"hash/fnv"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgtype"
	"gorm.io/gorm"
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

// GormStore is the Store for PostgreSQL, MariaDB/MySQL and SQLite, through GORM.
type GormStore struct {
	db      *gorm.DB
	cfg     config
	dialect dialect
	columns string // every column, quoted, in readMessages' order
	walk    string // the claim's read of the pending rows (see pick)
	// walkKeys is the held claim's walk: it reads no row whole, only what
	// pick needs, and the lock reads the rows it locks (see lockPicked).
	walkKeys string
	insert   string // Save's INSERT up to VALUES
	single   string // Save's whole INSERT of one message, the common case
	wakeups  *wakeups
	notify   *notifier // nil: no NOTIFY
	// lastWalk is how many pending rows the last claim read to find its
	// messages (see claimWindow).
	lastWalk atomic.Int64
	flying   inFlight      // rows locked by this process's held claims
	writer   chan struct{} // holds a token during a write turn; see writing
}

// PostgresOutboxStore is the design document's name for the store on
// PostgreSQL; it is a GormStore.
type PostgresOutboxStore = GormStore

// NewStore returns the store for db's dialect, with the same options as Plugin.
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
	if db == nil || db.Config == nil || db.Dialector == nil {
		return nil, errors.New("outbox: NewPostgresOutboxStore needs an opened *gorm.DB, got nil")
	}
	if name := db.Dialector.Name(); name != "postgres" {
		return nil, fmt.Errorf("outbox: NewPostgresOutboxStore needs a postgres database, got %q", name)
	}
	return NewStore(db, opts...)
}

func newStore(db *gorm.DB, cfg config) (*GormStore, error) {
	if db == nil || db.Config == nil || db.Dialector == nil {
		return nil, errors.New("outbox: the store needs an opened *gorm.DB, got nil")
	}
	d, err := dialectOf(db)
	if err != nil {
		return nil, err
	}
	// Each of the store's writes is one statement, atomic by itself: GORM's
	// default transaction around it would only add two round trips.
	s := &GormStore{db: db.Session(&gorm.Session{NewDB: true, SkipDefaultTransaction: true}), cfg: cfg, dialect: d, wakeups: &wakeups{},
		writer: make(chan struct{}, 1),
		notify: newNotifier(d, cfg.table, cfg.notifyInterval)}
	cols := []string{"id", "topic", "message_key", "payload", "headers", "state", "attempts",
		"last_error", "next_attempt_at", "claim_token", "created_at", "published_at"}
	for i, c := range cols {
		cols[i] = s.quote(c)
	}
	s.columns = strings.Join(cols, ", ")
	// The walk reads whole rows only where they are due: of the others
	// (mostly rows in flight, at the front of the queue) it needs the key,
	// the due time and whether a claim holds them.
	keys := []string{s.quote("id"), s.quote("message_key"), s.quote("next_attempt_at"), s.quote("claim_token"),
		s.quote("attempts"), s.quote("created_at")}
	walk := keys
	for _, c := range walkIfDue {
		walk = append(walk, "CASE WHEN "+s.quote("next_attempt_at")+" <= ? THEN "+s.quote(c)+" END")
	}
	if d.addresses {
		walk, keys = append(walk, refColumn("")), append(keys, refColumn(""))
	}
	from := " FROM " + s.table() + s.dialect.pendingHint + " WHERE " + s.quote("state") + " = 'pending'"
	s.walk = "SELECT " + strings.Join(walk, ", ") + from
	s.walkKeys = "SELECT " + strings.Join(keys, ", ") + from
	ins := make([]string, len(insertColumns))
	for i, c := range insertColumns {
		ins[i] = s.quote(c)
	}
	s.insert = s.dialect.waitPrefix + "INSERT INTO " + s.table() + " (" + strings.Join(ins, ", ") + ") VALUES "
	s.single = s.insertSQL(1, "")
	return s, nil
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

// claimBatch holds its claim across the send where the database allows
// (heldClaim), and takes a lease (Claim) elsewhere.
func (s *GormStore) claimBatch(outer Store, ctx, work context.Context, opts ClaimOptions) (claimedBatch, error) {
	if outer != Store(s) {
		return leaseClaim(outer, ctx, opts)
	}
	if s.dialect.holdClaims {
		c, err := s.claimHeld(ctx, work, opts)
		if err != nil {
			return nil, err
		}
		return c, nil
	}
	token, msgs, err := s.Claim(ctx, opts)
	if err != nil {
		return nil, err
	}
	return &leaseBatch{store: s, token: token, msgs: msgs}, nil
}

func (s *GormStore) subscribe(w waker) func() { return s.wakeups.subscribe(w) }

func (s *GormStore) checkServer(ctx context.Context) error {
	if s.dialect.minVersion == nil {
		return nil
	}
	return s.dialect.minVersion(s.db.WithContext(ctx))
}

func (s *GormStore) sqlDB() (*sql2.DB, error) { return s.db.DB() }

func (s *GormStore) telemetry() *telemetry { return s.cfg.telemetry }

// servesPool reports whether the store works on db's connection pool.
// servesPool reports whether the store works on db's connections: the same
// *sql.DB, whatever session (PrepareStmt's included) db is.
func (s *GormStore) servesPool(db *gorm.DB) bool {
	mine, err1 := s.db.DB()
	theirs, err2 := db.DB()
	if err1 != nil || err2 != nil {
		return s.db.Config.ConnPool == db.Config.ConnPool
	}
	return mine == theirs
}

// TableName is the outbox table this store reads and writes.
func (s *GormStore) TableName() string { return s.cfg.table }

func (s *GormStore) quote(name string) string { return s.db.Statement.Quote(name) }

func (s *GormStore) table() string { return s.quote(s.cfg.table) }

// CreateOutboxTable creates the table and its indexes, or adds what is missing.
// Processes that run it at once on one database take turns (see
// migrateAlone), each waiting at most a minute (or until ctx ends) for the
// one before it.
func (s *GormStore) CreateOutboxTable(ctx context.Context) error {
	ctx = orBackground(ctx)
	return s.migrateAlone(ctx, func(db *gorm.DB) error {
		created := !db.Migrator().HasTable(s.cfg.table)
		if err := db.Table(s.cfg.table).AutoMigrate(&OutboxMessage{}); err != nil {
			return fmt.Errorf("outbox: migrating table %s: %w", s.cfg.table, err)
		}
		if created && s.dialect.name == "postgres" {
			if err := db.Exec(fmt.Sprintf("ALTER TABLE %s SET (fillfactor = %d)", s.table(), fillfactor)).Error; err != nil {
				return fmt.Errorf("outbox: migrating table %s: %w", s.cfg.table, err)
			}
		}
		for _, i := range tableIndexes(s.dialect.name, s.cfg.table, s.quote) {
			if db.Migrator().HasIndex(s.cfg.table, i.name) {
				continue
			}
			if err := db.Exec(i.create).Error; err != nil {
				return fmt.Errorf("outbox: creating index %s on %s: %w", i.name, s.cfg.table, err)
			}
		}
		return nil
	})
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

// ErrNoTransaction is returned when an enqueue is not inside a transaction
// and AllowWithoutTransaction was not given.
var ErrNoTransaction = errors.New("outbox: enqueue needs a transaction so that events commit with the domain rows " +
	"(use db.Transaction, or do not use SkipDefaultTransaction; AllowWithoutTransaction permits it)")

// insertColumns are written by Save; every other column takes its default.
var insertColumns = []string{"id", "topic", "message_key", "payload", "headers", "state", "next_attempt_at", "created_at"}

// maxRowsPerInsert keeps a multi-row INSERT's parameters far below
// PostgreSQL's limit of 65535 (and SQLite's of 32766).
const maxRowsPerInsert = 1000

// Save implements Store. It writes all messages with multi-row INSERTs on
// tx's connection, in the caller's transaction. The statement does not go
// through GORM's Exec, which built it again for every event (a new session,
// its clauses, its placeholders); GORM's logger still sees it, callbacks
// registered on Raw do not. In a DryRun session it writes nothing.
func (s *GormStore) Save(ctx context.Context, tx *gorm.DB, msgs ...*OutboxMessage) error {
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
	if !s.cfg.allowNoTx && !inTransaction(tx) {
		return ErrNoTransaction
	}
	if tx.Error != nil { // what GORM's Exec would return instead of running
		return fmt.Errorf("outbox: writing %d messages to %s: %w", len(msgs), s.cfg.table, tx.Error)
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
	notify := s.notify.due() // sent with the first one-row INSERT, or after the INSERTs
	for start := 0; start < len(msgs); start += maxRowsPerInsert {
		chunk := msgs[start:min(start+maxRowsPerInsert, len(msgs))]
		args := make([]any, 0, len(chunk)*len(insertColumns))
		for _, m := range chunk {
			var id any = m.ID
			if s.dialect.binaryIDs {
				id = pgtype.UUID{Bytes: m.ID, Valid: true}
			}
			args = append(args, id, m.Topic, m.Key, m.Payload, m.Headers, m.State, m.NextAttemptAt.UTC(), m.CreatedAt.UTC())
		}
		query := s.single
		switch {
		case len(chunk) > 1:
			query = s.insertSQL(len(chunk), "")
		case notify:
			query, notify = s.insertSQL(1, s.notify.returning), false
		}
		if err := execOn(ctx, tx, query, args); err != nil {
			return fmt.Errorf("outbox: writing %d messages to %s: %w", len(chunk), s.cfg.table, err)
		}
	}
	if notify {
		if err := execOn(ctx, tx, s.notify.statement, nil); err != nil {
			return fmt.Errorf("outbox: notifying the publishers of %s: %w", s.cfg.table, err)
		}
	}
	return nil
}

// insertSQL is Save's INSERT of n messages with the dialect's
// placeholders, followed by returning.
func (s *GormStore) insertSQL(n int, returning string) string {
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
			if s.dialect.numberedArgs {
				b.WriteByte('$')
				b.WriteString(strconv.Itoa(arg))
			} else {
				b.WriteByte('?')
			}
		}
		b.WriteByte(')')
	}
	b.WriteString(returning)
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

// Claim implements Store. In one short transaction it reads the front of
// the pending queue, picks the rows to send, and stamps them with the token
// and the lease's end; no transaction stays open while the broker is
// called. A claim whose publisher dies simply expires and its rows are due
// again.
//
// Per-key order: a claim takes due rows in id order, so what it takes of a
// key is always the front of that key's pending queue, and what a key has
// held (claimed, or waiting for a retry) is always a front too. So walking
// the pending rows in id order, a key is busy from its first held row on,
// and every later row of it is skipped. The walk reads the pending rows
// through the pending index, whole but for the payload of those not due,
// and decides in Go, the same on every database: the rows it picks need no
// second read. The stamp changes no indexed column, so PostgreSQL can
// write it as a HOT update (see the table's fillfactor). Claims are
// serialized (an advisory lock on PostgreSQL, a named lock on MySQL, the
// single writer on SQLite) so that each sees the claims committed before
// it; sending stays parallel. Messages with an empty key are never held
// back. On PostgreSQL the claim also locks the rows it picks, and leaves
// those it cannot lock: they are in a publisher's held claim, which does
// not stamp them (see heldClaim).
func (s *GormStore) Claim(ctx context.Context, opts ClaimOptions) (string, []*OutboxMessage, error) {
	ctx = orBackground(ctx)
	if opts.Limit <= 0 {
		return "", nil, fmt.Errorf("outbox: claim limit must be positive, got %d", opts.Limit)
	}
	if opts.Lease <= 0 {
		return "", nil, fmt.Errorf("outbox: claim lease must be positive, got %v", opts.Lease)
	}
	token := uuid.NewString()
	var msgs []*OutboxMessage
	err := s.serialized(ctx, s.dialect.claimLock, s.dialect.claimUnlock, s.lockKey(), func(tx *gorm.DB) error {
		var err error
		msgs, err = s.claim(tx, token, opts)
		return err
	}, s.dialect.claimTx)
	if err != nil {
		return "", nil, fmt.Errorf("outbox: claiming messages from %s: %w", s.cfg.table, err)
	}
	return token, msgs, nil
}

// claimWindow is how many pending rows the walk's first read takes: a
// quarter more than the last walk needed, so that a walk whose front is
// full of rows in flight (another worker's claim) still reads once, and
// one whose front is free reads little more than it takes. Each further
// read of a walk takes twice as many.
func (s *GormStore) claimWindow(limit int) int {
	last := int(s.lastWalk.Load())
	return max(last+last/4, limit+limit/8, 64)
}

// claim stamps the rows it picks with the token and returns them, in id order.
func (s *GormStore) claim(tx *gorm.DB, token string, opts ClaimOptions) ([]*OutboxMessage, error) {
	// In milliseconds, which every database stores exactly, so that the
	// walk's SQL and Go agree on which rows are due (and carry a payload);
	// rounded up, so that a message committed a moment ago is due now, not
	// at the next poll.
	now := time.Now().UTC().Truncate(time.Millisecond).Add(time.Millisecond)
	picked, err := s.pick(s.gormWalk(tx, now, true), true, now, opts, nil, nil)
	if err == nil && s.dialect.holdClaims {
		// Rows in a publisher's held claim look due: lock what was picked,
		// and leave what cannot be locked (see heldClaim).
		picked, err = s.lockPicked(tx, nil, now, picked, 0, false)
	}
	if err != nil || len(picked) == 0 {
		return nil, err
	}
	q := s.quote
	ids := make([]uuid.UUID, len(picked))
	for i, m := range picked {
		ids[i] = m.ID
	}
	// The state and due time are checked again: a row picked by the plain
	// read may have been published since by a claim that had expired.
	leaseEnd := now.Add(opts.Lease)
	res := tx.Exec("UPDATE "+s.table()+" SET "+q("claim_token")+" = ?, "+q("next_attempt_at")+" = ?"+
		" WHERE "+q("id")+" "+s.dialect.inIDs+" AND "+q("state")+" = 'pending' AND "+q("next_attempt_at")+" <= ?",
		token, leaseEnd, s.idsArg(ids), now)
	if res.Error != nil {
		return nil, res.Error
	}
	if res.RowsAffected != int64(len(picked)) {
		// Rare: some rows changed between the walk and the stamp. Read
		// back what this claim holds.
		msgs, err := s.readMessages(tx, "SELECT "+s.columns+" FROM "+s.table()+
			" WHERE "+q("id")+" "+s.dialect.inIDs+" AND "+q("claim_token")+" = ?", s.idsArg(ids), token)
		sort.Slice(msgs, func(i, j int) bool { return lessID(msgs[i].ID, msgs[j].ID) })
		return msgs, err
	}
	for _, m := range picked {
		m.ClaimToken, m.NextAttemptAt = &token, leaseEnd
	}
	return picked, nil
}

// readMessages reads whole messages in s.columns' order. It scans by hand:
// at thousands of rows a second, GORM's reflection would cost more than
// the query.
func (s *GormStore) readMessages(tx *gorm.DB, sql string, args ...any) ([]*OutboxMessage, error) {
	rows, err := tx.Raw(sql, args...).Rows()
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*OutboxMessage
	for rows.Next() {
		m := &OutboxMessage{}
		var state string
		var token sql2.NullString
		var published sql2.NullTime
		err := rows.Scan(&m.ID, &m.Topic, &m.Key, &m.Payload, &m.Headers, &state, &m.Attempts,
			&m.LastError, &m.NextAttemptAt, &token, &m.CreatedAt, &published)
		if err != nil {
			return nil, err
		}
		m.State = State(state)
		if token.Valid {
			m.ClaimToken = &token.String
		}
		if published.Valid {
			m.PublishedAt = &published.Time
		}
		out = append(out, m)
	}
	return out, rows.Err()
}

// walkIfDue are the columns s.walk reads only of due rows (see walkRow.queued).
var walkIfDue = []string{"topic", "payload", "headers", "last_error"}

// queued is one row as the walk reads it: msg is nil unless it is due.
type queued struct {
	id   uuid.UUID
	key  string
	held bool // not due and claimed (not in a retry's backoff), or read without its payload
	msg  *OutboxMessage
}

// walkReader runs one read of the walk (sql, args, then the window as the
// LIMIT) and returns its rows; due rows are messages, whole if sql is
// s.walk's.
type walkReader func(window int, sql string, args []any) ([]queued, error)

// walkRow is one row of a walk's read, as scanned.
type walkRow struct {
	id                 uuid.UUID
	key                string
	next, created      time.Time
	token, topic       *string // nil where NULL
	attempts           int
	payload            []byte
	headers, lastError string
	ref                string
}

// optional is a nullable column's value: nil where it was NULL.
func optional(s string, valid bool) *string {
	if !valid {
		return nil
	}
	return &s
}

// queued returns what the walk makes of the row at now. A row Go finds due
// but the SQL did not (which the millisecond clock should rule out) was
// read without its payload: it waits for the next claim, holding its key.
//
// whole: the row was read by s.walk; otherwise by s.walkKeys, and its
// message has only what the walk read.
func (w *walkRow) queued(now time.Time, whole bool) (queued, error) {
	r := queued{id: w.id, key: w.key}
	if w.next.After(now) || (whole && w.topic == nil) {
		r.held = w.token != nil || !w.next.After(now)
		return r, nil
	}
	m := &OutboxMessage{ID: w.id, Key: w.key, State: StatePending,
		Attempts: w.attempts, NextAttemptAt: w.next, CreatedAt: w.created, ClaimToken: w.token, ref: w.ref}
	if whole {
		m.Topic, m.Payload, m.LastError = *w.topic, w.payload, w.lastError
		if err := m.Headers.Scan(w.headers); err != nil {
			return r, err
		}
	}
	r.msg = m
	return r, nil
}

// gormWalk reads the walk through tx: s.walk if whole, else s.walkKeys.
func (s *GormStore) gormWalk(tx *gorm.DB, now time.Time, whole bool) walkReader {
	return func(window int, sql string, args []any) ([]queued, error) {
		rows, err := tx.Raw(sql, append(args, window)...).Rows()
		if err != nil {
			return nil, err
		}
		defer rows.Close()
		out := make([]queued, 0, min(window, 4096))
		for rows.Next() {
			var (
				w                         walkRow
				token, topic, hdrs, lastE sql2.NullString
			)
			dest := []any{&w.id, &w.key, &w.next, &token, &w.attempts, &w.created}
			if whole {
				dest = append(dest, &topic, &w.payload, &hdrs, &lastE)
			}
			if s.dialect.addresses {
				dest = append(dest, &w.ref)
			}
			if err := rows.Scan(dest...); err != nil {
				return nil, err
			}
			w.token, w.topic = optional(token.String, token.Valid), optional(topic.String, topic.Valid)
			w.headers, w.lastError = hdrs.String, lastE.String
			r, err := w.queued(now, whole)
			if err != nil {
				return nil, err
			}
			out = append(out, r)
		}
		return out, rows.Err()
	}
}

// pick walks the pending rows in id order and returns those to claim: due
// rows of keys that hold nothing. The state is a SQL literal so that the
// partial pending index serves the read whatever the statement cache.
// The rows of inFlight are left out; busy has their keys, and pick adds
// to it the keys it finds busy. Each picked message has the address the
// walk read (dialect.addresses). whole reads the picked rows whole
// (s.walk); otherwise (s.walkKeys) their messages have no topic, payload,
// headers or last error yet.
func (s *GormStore) pick(read walkReader, whole bool, now time.Time, opts ClaimOptions, inFlight []uuid.UUID, busy map[string]bool) ([]*OutboxMessage, error) {
	q := s.quote
	if busy == nil {
		busy = map[string]bool{}
	}
	var picked []*OutboxMessage
	var after *uuid.UUID
	walked := 0
	defer func() { s.lastWalk.Store(int64(walked)) }()
	for window := s.claimWindow(opts.Limit); ; window *= 2 {
		sql, args := s.walkKeys, make([]any, 0, len(walkIfDue)+2)
		if whole {
			sql = s.walk
			for range walkIfDue {
				args = append(args, now)
			}
		}
		if len(inFlight) > 0 {
			sql += " AND " + q("id") + " " + s.dialect.notInIDs
			args = append(args, s.idsArg(inFlight))
		}
		if after != nil {
			sql += " AND " + q("id") + " > ?"
			args = append(args, *after)
			// A busy key's later rows are never picked, so the database
			// can skip them: with few keys, all held (a poison message in
			// backoff on each), the walk otherwise reads the whole backlog.
			if len(busy) > 0 && len(busy) <= maxSkippedKeys {
				sql += " AND " + q("message_key") + " " + s.dialect.notInKeys
				args = append(args, s.keysArg(busy))
			}
		}
		rows, err := read(window, sql+" ORDER BY "+q("id")+" LIMIT ?", args)
		if err != nil {
			return nil, err
		}
		for _, r := range rows {
			walked++
			if r.msg != nil {
				if r.key == "" || !busy[r.key] {
					picked = append(picked, r.msg)
					if len(picked) == opts.Limit {
						return picked, nil
					}
				}
				continue
			}
			// Not due: in flight (claimed), or waiting for a retry, which
			// holds the key too unless SkipFailedKeys.
			if r.key != "" && (!opts.SkipFailedKeys || r.held) {
				busy[r.key] = true
			}
		}
		if len(rows) < window {
			return picked, nil
		}
		after = &rows[len(rows)-1].id
	}
}

// maxSkippedKeys bounds the list of busy keys a walk's later reads leave
// out in SQL; past it, they are read and skipped in Go.
const maxSkippedKeys = 1000

// keysArg is the argument of dialect.notInKeys: on PostgreSQL one text[]
// literal (see idsArg), each key quoted, so that any character is safe.
func (s *GormStore) keysArg(keys map[string]bool) any {
	if s.dialect.name != "postgres" {
		out := make([]string, 0, len(keys))
		for k := range keys {
			out = append(out, k)
		}
		return out
	}
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

// writing waits for this store's turn to write where the database has one
// writer (dialect.oneWriter), and returns what ends the turn; or ctx's
// error if it ends first (a stopping publisher does not wait its turn).
func (s *GormStore) writing(ctx context.Context) (func(), error) {
	if !s.dialect.oneWriter {
		return func() {}, nil
	}
	select {
	case s.writer <- struct{}{}:
		return func() { <-s.writer }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// errLockBusy is what lock returns when a try-lock (timeout 0) is taken.
var errLockBusy = errors.New("outbox: lock held by another process")

// serialized runs fn in a transaction that holds the lock serializing the
// claims (or the cleanups) of this table. PostgreSQL's advisory lock is
// taken inside the transaction and released by its commit. MySQL's named
// lock belongs to a connection: it is taken on one connection before the
// transaction and released after the commit, so that the next holder sees
// what this one committed.
func (s *GormStore) serialized(ctx context.Context, lock, unlock string, key int64, fn func(tx *gorm.DB) error, txOpts *sql2.TxOptions) error {
	done, err := s.writing(ctx)
	if err != nil {
		return err
	}
	defer done()
	db := s.db.WithContext(ctx)
	if lock == "" {
		return db.Transaction(fn, txOpts)
	}
	if unlock == "" {
		return db.Transaction(func(tx *gorm.DB) error {
			if err := s.lock(tx, lock, key); err != nil {
				return err
			}
			return fn(tx)
		}, txOpts)
	}
	return db.Connection(func(conn *gorm.DB) error {
		if err := s.lock(conn, lock, key); err != nil {
			return err
		}
		// Released even when ctx has ended: a pooled connection that kept
		// the lock would stall every other claim for GET_LOCK's timeout.
		defer conn.WithContext(context.WithoutCancel(ctx)).Exec(unlock, s.lockName(key))
		return conn.Transaction(fn, txOpts)
	})
}

// lock takes a lock that serializes work on this table. A lock that
// returns false or 0 (a try-lock that someone holds, or a wait that timed
// out) is errLockBusy.
func (s *GormStore) lock(db *gorm.DB, sql string, key int64) error {
	var got sql2.NullInt64
	if err := db.Raw(sql, s.lockArg(key)).Scan(&got).Error; err != nil {
		return err
	}
	if got.Valid && got.Int64 == 0 {
		return errLockBusy
	}
	return nil
}

func (s *GormStore) lockArg(key int64) any {
	if s.dialect.name == "mysql" {
		return s.lockName(key)
	}
	return key
}

// lockName is a MySQL lock's name: named locks are server-wide, so it
// carries the database's name as well as the table's.
func (s *GormStore) lockName(key int64) string {
	return fmt.Sprintf("outbox:%s:%x", s.db.Migrator().CurrentDatabase(), key)
}

// lockKey is the advisory lock that serializes the claims of one table.
func (s *GormStore) lockKey() int64 {
	h := fnv.New64a()
	h.Write([]byte("gorm-outbox:" + s.cfg.table))
	return int64(h.Sum64())
}

// idsArg is the argument of dialect.inIDs: on PostgreSQL one array literal,
// because pgx encodes each of hundreds of uuid parameters at a cost that
// outweighed the statement itself.
func (s *GormStore) idsArg(ids []uuid.UUID) any {
	if s.dialect.name != "postgres" {
		return ids
	}
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

func lessID(a, b uuid.UUID) bool { return string(a[:]) < string(b[:]) }

// MarkPublished implements Store: the messages become published, or are
// deleted under WithDeleteOnPublish.
func (s *GormStore) MarkPublished(ctx context.Context, token string, ids []uuid.UUID) error {
	ctx = orBackground(ctx)
	return s.recording(ctx, false, func(db *gorm.DB) error { return s.markPublished(db, &token, ids, nil) })
}

// heldBy is the condition that a row is still held by the claim of token;
// nil is a held claim, whose rows are locked by the transaction itself.
func (s *GormStore) heldBy(token *string) (string, []any) {
	if token == nil {
		return "", nil
	}
	return " AND " + s.quote("claim_token") + " = ?", []any{*token}
}

// markPublished writes the result of the rows ids; held, if not nil, are
// the messages of a held claim, whose rows db's transaction has locked at
// their addresses, ids among them in the same order.
func (s *GormStore) markPublished(db *gorm.DB, token *string, ids []uuid.UUID, held []*OutboxMessage) error {
	if len(ids) == 0 {
		return nil
	}
	var (
		where string
		args  []any
	)
	if arg, ok := refsArg(ids, held); ok {
		where, args = refsMatch(""), []any{arg}
	} else {
		heldBy, heldArgs := s.heldBy(token)
		where = s.quote("id") + " " + s.dialect.inIDs + heldBy
		args = append([]any{s.idsArg(ids)}, heldArgs...)
	}
	var err error
	if s.cfg.deletePublished {
		err = db.Exec("DELETE FROM "+s.table()+" WHERE "+where, args...).Error
	} else {
		err = db.Table(s.cfg.table).Where(where, args...).
			Updates(map[string]any{"state": StatePublished, "published_at": time.Now().UTC(), "claim_token": nil}).Error
	}
	if err != nil {
		return fmt.Errorf("outbox: marking %d messages published in %s: %w", len(ids), s.cfg.table, err)
	}
	return nil
}

// recording runs fn, which records results of a claim, in a transaction if
// inTx, on MySQL always in a READ COMMITTED one (dialect.resultTx), and on
// PostgreSQL always after dialect.resultSetup.
func (s *GormStore) recording(ctx context.Context, inTx bool, fn func(db *gorm.DB) error) error {
	done, err := s.writing(ctx)
	if err != nil {
		return err
	}
	defer done()
	db := s.db.WithContext(ctx)
	setup := s.dialect.resultSetup
	if !inTx && s.dialect.resultTx == nil && setup == "" {
		return fn(db)
	}
	return db.Transaction(func(tx *gorm.DB) error {
		if setup != "" {
			if err := tx.Exec(setup).Error; err != nil {
				return err
			}
		}
		return fn(tx)
	}, s.dialect.resultTx)
}

// MarkFailed implements Store. Failures are rare, so each is its own UPDATE,
// all in one transaction.
func (s *GormStore) MarkFailed(ctx context.Context, token string, failures []Failure) error {
	ctx = orBackground(ctx)
	if len(failures) == 0 {
		return nil
	}
	return s.recording(ctx, true, func(tx *gorm.DB) error { return s.markFailed(tx, &token, failures) })
}

func (s *GormStore) markFailed(tx *gorm.DB, token *string, failures []Failure) error {
	held, args := s.heldBy(token)
	for _, f := range failures {
		state := StatePending
		if f.Dead {
			state = StateDead
		}
		err := tx.Table(s.cfg.table).Where(s.quote("id")+" = ?"+held, append([]any{f.ID}, args...)...).
			Updates(map[string]any{
				"state":           state,
				"attempts":        gorm.Expr(s.quote("attempts") + " + 1"),
				"last_error":      f.Err,
				"next_attempt_at": f.NextAttemptAt.UTC(),
				"claim_token":     nil,
			}).Error
		if err != nil {
			return fmt.Errorf("outbox: recording %d failed sends in %s: %w", len(failures), s.cfg.table, err)
		}
	}
	return nil
}

// Release implements Store.
func (s *GormStore) Release(ctx context.Context, token string, ids []uuid.UUID) error {
	ctx = orBackground(ctx)
	if len(ids) == 0 {
		return nil
	}
	err := s.recording(ctx, false, func(db *gorm.DB) error {
		return db.Table(s.cfg.table).Where("id "+s.dialect.inIDs+" AND claim_token = ?", s.idsArg(ids), token).
			Updates(map[string]any{"next_attempt_at": time.Now().UTC(), "claim_token": nil}).Error
	})
	if err != nil {
		return fmt.Errorf("outbox: releasing %d claimed messages in %s: %w", len(ids), s.cfg.table, err)
	}
	return nil
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

// List returns messages, oldest first unless opts.NewestFirst.
func (s *GormStore) List(ctx context.Context, opts ListOptions) ([]OutboxMessage, error) {
	ctx = orBackground(ctx)
	q := s.db.WithContext(ctx).Table(s.cfg.table)
	if opts.State != "" {
		q = q.Where("state = ?", opts.State)
	}
	if opts.Topic != "" {
		q = q.Where("topic = ?", opts.Topic)
	}
	if opts.Key != "" {
		q = q.Where("message_key = ?", opts.Key)
	}
	if !opts.CreatedBefore.IsZero() {
		q = q.Where("created_at < ?", opts.CreatedBefore.UTC())
	}
	if opts.Limit <= 0 {
		opts.Limit = 100
	}
	order := "id"
	if opts.NewestFirst {
		order = "id DESC"
	}
	var out []OutboxMessage
	if err := q.Order(order).Limit(opts.Limit).Offset(opts.Offset).Find(&out).Error; err != nil {
		return nil, fmt.Errorf("outbox: listing %s: %w", s.cfg.table, err)
	}
	return out, nil
}

// ErrNotFound is returned by Get for an id that is not in the table.
var ErrNotFound = errors.New("outbox: no such message")

// Get returns one message.
func (s *GormStore) Get(ctx context.Context, id uuid.UUID) (*OutboxMessage, error) {
	ctx = orBackground(ctx)
	var out []OutboxMessage
	if err := s.db.WithContext(ctx).Table(s.cfg.table).Where("id = ?", id).Limit(1).Find(&out).Error; err != nil {
		return nil, fmt.Errorf("outbox: reading message %s from %s: %w", id, s.cfg.table, err)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%w with id %s in %s", ErrNotFound, id, s.cfg.table)
	}
	return &out[0], nil
}

// CountOlder counts the messages in state that Cleanup would delete with a
// retention of age: created, and for published ones published, before it.
func (s *GormStore) CountOlder(ctx context.Context, state State, age time.Duration) (int64, error) {
	ctx = orBackground(ctx)
	cutoff := time.Now().UTC().Add(-age)
	q := s.db.WithContext(ctx).Table(s.cfg.table).Where("state = ? AND created_at < ?", state, cutoff)
	if state == StatePublished {
		q = q.Where("published_at < ?", cutoff)
	}
	var n int64
	if err := q.Count(&n).Error; err != nil {
		return 0, fmt.Errorf("outbox: counting %s: %w", s.cfg.table, err)
	}
	return n, nil
}

// Requeue makes dead messages pending again with a fresh attempt budget,
// due now. It returns how many it requeued; ids that are not dead are left
// alone. The last error is kept for the record until the next attempt.
func (s *GormStore) Requeue(ctx context.Context, ids ...uuid.UUID) (int64, error) {
	ctx = orBackground(ctx)
	if len(ids) == 0 {
		return 0, nil
	}
	return s.requeue(ctx, s.db.WithContext(ctx).Table(s.cfg.table).Where("id IN ?", ids))
}

// RequeueDead requeues every dead message, or those of one topic if topic is not empty.
func (s *GormStore) RequeueDead(ctx context.Context, topic string) (int64, error) {
	ctx = orBackground(ctx)
	q := s.db.WithContext(ctx).Table(s.cfg.table)
	if topic != "" {
		q = q.Where("topic = ?", topic)
	}
	return s.requeue(ctx, q)
}

func (s *GormStore) requeue(_ context.Context, q *gorm.DB) (int64, error) {
	res := q.Where("state = ?", StateDead).Updates(map[string]any{
		"state": StatePending, "attempts": 0, "next_attempt_at": time.Now().UTC(), "claim_token": nil,
	})
	if res.Error != nil {
		return 0, fmt.Errorf("outbox: requeueing dead messages in %s: %w", s.cfg.table, res.Error)
	}
	return res.RowsAffected, nil
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

// Stats reads the table's state; attemptBudget is the MaxAttempts to count
// OverBudget against (DefaultRetryPolicy's when zero).
func (s *GormStore) Stats(ctx context.Context, attemptBudget int) (Stats, error) {
	ctx = orBackground(ctx)
	if attemptBudget <= 0 {
		attemptBudget = DefaultRetryPolicy.MaxAttempts
	}
	st := Stats{}
	counts, err := s.Count(ctx)
	if err != nil {
		return st, err
	}
	st.Counts = counts
	now := time.Now().UTC()
	var agg struct {
		Retrying      int64
		ExpiredClaims int64
	}
	q, pending := s.quote, "'"+string(StatePending)+"'"
	// The oldest by id is the oldest by creation (UUIDv7), found on the
	// pending index; a real column keeps its type on every driver.
	var oldest []time.Time
	err = s.db.WithContext(ctx).Table(s.table()+s.dialect.pendingHint).Where(q("state")+" = "+pending).
		Order(q("id")).Limit(1).Pluck("created_at", &oldest).Error
	if err != nil {
		return st, fmt.Errorf("outbox: reading stats of %s: %w", s.cfg.table, err)
	}
	if len(oldest) == 1 {
		st.OldestPendingAge = max(now.Sub(oldest[0]), 0)
	}
	err = s.db.WithContext(ctx).Table(s.cfg.table).
		Select("COALESCE(SUM(CASE WHEN "+q("attempts")+" > 0 THEN 1 ELSE 0 END), 0) AS retrying, "+
			"COALESCE(SUM(CASE WHEN "+q("claim_token")+" IS NOT NULL AND "+q("next_attempt_at")+" < ? THEN 1 ELSE 0 END), 0) AS expired_claims", now).
		Where(q("state") + " = " + pending).Scan(&agg).Error
	if err != nil {
		return st, fmt.Errorf("outbox: reading stats of %s: %w", s.cfg.table, err)
	}
	st.Retrying, st.ExpiredClaims = agg.Retrying, agg.ExpiredClaims
	err = s.db.WithContext(ctx).Table(s.cfg.table).Where("state <> ? AND attempts >= ?", StatePublished, attemptBudget).Count(&st.OverBudget).Error
	if err != nil {
		return st, fmt.Errorf("outbox: reading stats of %s: %w", s.cfg.table, err)
	}
	return st, nil
}

// Count returns how many messages are in each state.
func (s *GormStore) Count(ctx context.Context) (map[State]int64, error) {
	ctx = orBackground(ctx)
	var rows []struct {
		State State
		N     int64
	}
	err := s.db.WithContext(ctx).Table(s.cfg.table).Select("state, count(*) AS n").Group("state").Scan(&rows).Error
	if err != nil {
		return nil, fmt.Errorf("outbox: counting %s: %w", s.cfg.table, err)
	}
	out := map[State]int64{}
	for _, r := range rows {
		out[r.State] = r.N
	}
	return out, nil
}
