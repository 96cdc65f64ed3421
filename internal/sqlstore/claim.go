package sqlstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/google/uuid"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/internal/core"
)

// Claim takes due pending messages in one short transaction: it reads the
// front of the pending queue, picks the rows to send, and stamps them with
// the token and the lease's end; no transaction stays open while the
// broker is called. A claim whose publisher dies simply expires and its
// rows are due again.
//
// Per-key order: a claim takes due rows in id order, so what it takes of a
// key is always the front of that key's pending queue, and what a key has
// held (claimed, or waiting for a retry) is always a front too. So walking
// the pending rows in id order, a key is busy from its first held row on,
// and every later row of it is skipped. The walk reads the pending rows
// through the pending index, whole but for the payload of those not due,
// and decides in Go, the same on every database: the rows it picks need no
// second read. Claims take turns (Dialect.Serialized) so that each sees
// the claims committed before it; sending stays parallel. Messages with an
// empty key are never held back.
func (s *Store) Claim(ctx context.Context, opts core.ClaimOptions) (string, []*core.OutboxMessage, error) {
	ctx = orBackground(ctx)
	if opts.Limit <= 0 {
		return "", nil, fmt.Errorf("outbox: claim limit must be positive, got %d", opts.Limit)
	}
	if opts.Lease <= 0 {
		return "", nil, fmt.Errorf("outbox: claim lease must be positive, got %v", opts.Lease)
	}
	token := uuid.NewString()
	msgs, err := s.ClaimGuarded(ctx, token, opts, nil)
	return token, msgs, err
}

// ErrClaimRace says a guarded claim found some of its rows changed between
// its walk and its stamp, and claimed nothing.
var ErrClaimRace = errors.New("outbox: the claim's rows changed under it; nothing was claimed")

// ClaimGuarded is Claim with the caller's token, and a guard that runs in
// the claim's transaction once rows were picked and before they are
// stamped: an error of the guard rolls the claim back whole, so that the
// stamp and what the guard wrote commit together or not at all. A guarded
// claim holds whole transaction groups (see completeGroups), possibly more
// than opts.Limit messages, and its commit is durable (DurableClaimTurn).
func (s *Store) ClaimGuarded(ctx context.Context, token string, opts core.ClaimOptions, guard func(tx *gorm.DB) error) ([]*core.OutboxMessage, error) {
	ctx = orBackground(ctx)
	if opts.Limit <= 0 {
		return nil, fmt.Errorf("outbox: claim limit must be positive, got %d", opts.Limit)
	}
	if opts.Lease <= 0 {
		return nil, fmt.Errorf("outbox: claim lease must be positive, got %v", opts.Lease)
	}
	var msgs []*core.OutboxMessage
	turn := ClaimTurn
	if guard != nil {
		turn = DurableClaimTurn
	}
	err := s.dialect.Serialized(ctx, s.db.WithContext(ctx), turn, s.LockKey(ClaimTurn), func(tx *gorm.DB) error {
		var err error
		msgs, err = s.claim(tx, token, opts, guard)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("outbox: claiming messages from %s: %w", s.cfg.Table, err)
	}
	return msgs, nil
}

// Now is a claim's clock: in milliseconds, which every database stores
// exactly, so that the walk's SQL and Go agree on which rows are due (and
// carry a payload); rounded up, so that a message committed a moment ago
// is due now, not at the next poll.
func Now() time.Time {
	return time.Now().UTC().Truncate(time.Millisecond).Add(time.Millisecond)
}

// claimWindow is how many pending rows the walk's first read takes: a
// quarter more than the last walk needed, so that a walk whose front is
// full of rows in flight (another worker's claim) still reads once, and
// one whose front is free reads little more than it takes. Each further
// read of a walk takes twice as many.
func (s *Store) claimWindow(limit int) int {
	last := int(s.lastWalk.Load())
	return max(last+last/4, limit+limit/8, 64)
}

// claim stamps the rows it picks with the token and returns them, in id order.
func (s *Store) claim(tx *gorm.DB, token string, opts core.ClaimOptions, guard func(tx *gorm.DB) error) ([]*core.OutboxMessage, error) {
	now := Now()
	picked, err := s.Pick(s.GormWalk(tx, now, true), true, now, opts, nil, nil)
	if err == nil {
		picked, err = s.dialect.LockPicked(tx, now, picked)
	}
	if err != nil || len(picked) == 0 {
		return nil, err
	}
	if guard != nil {
		if picked, err = s.completeGroups(tx, now, picked, nil, nil); err != nil || len(picked) == 0 {
			return nil, err
		}
		if err := guard(tx); err != nil {
			return nil, err
		}
	}
	q := s.Quote
	ids := make([]uuid.UUID, len(picked))
	for i, m := range picked {
		ids[i] = m.ID
	}
	// The state and due time are checked again: a row picked by the plain
	// read may have been published since by a claim that had expired.
	leaseEnd := now.Add(opts.Lease)
	in, arg := s.dialect.InIDs(q("id"), ids)
	res := tx.Exec("UPDATE "+s.QuotedTable()+" SET "+q("claim_token")+" = ?, "+q("next_attempt_at")+" = ?"+
		" WHERE "+in+" AND "+q("state")+" = 'pending' AND "+q("next_attempt_at")+" <= ?",
		token, leaseEnd, arg, now)
	if res.Error != nil {
		return nil, res.Error
	}
	if res.RowsAffected != int64(len(picked)) {
		if guard != nil {
			// A guarded claim holds whole groups or nothing: it is rolled
			// back and tried again.
			return nil, ErrClaimRace
		}
		// Rare: some rows changed between the walk and the stamp. Read
		// back what this claim holds.
		msgs, err := s.readMessages(tx, "SELECT "+s.columns+" FROM "+s.QuotedTable()+
			" WHERE "+in+" AND "+q("claim_token")+" = ?", arg, token)
		sort.Slice(msgs, func(i, j int) bool { return lessID(msgs[i].ID, msgs[j].ID) })
		return msgs, err
	}
	out := make([]*core.OutboxMessage, len(picked))
	for i, m := range picked {
		m.ClaimToken, m.NextAttemptAt = &token, leaseEnd
		out[i] = m.OutboxMessage
	}
	return out, nil
}

func lessID(a, b uuid.UUID) bool { return string(a[:]) < string(b[:]) }

// readMessages reads whole messages in s.columns' order. It scans by hand:
// at thousands of rows a second, GORM's reflection would cost more than
// the query.
func (s *Store) readMessages(tx *gorm.DB, query string, args ...any) ([]*core.OutboxMessage, error) {
	rows, err := tx.Raw(query, args...).Rows()
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*core.OutboxMessage
	for rows.Next() {
		m := &core.OutboxMessage{}
		var state string
		var token sql.NullString
		var published sql.NullTime
		var group uuid.NullUUID
		err := rows.Scan(&m.ID, &m.Topic, &m.Key, &m.Payload, &m.Headers, &state, &m.Attempts,
			&m.LastError, &m.NextAttemptAt, &token, &m.CreatedAt, &published, &group)
		if err != nil {
			return nil, err
		}
		if group.Valid {
			m.TxGroup = &group.UUID
		}
		m.State = core.State(state)
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

// walkIfDue are the columns s.walk reads only of due rows (see WalkRow.Queued).
var walkIfDue = []string{"topic", "payload", "headers", "last_error"}

// Queued is one row as the walk reads it: Msg is nil unless it is due.
type Queued struct {
	ID   uuid.UUID
	Key  string
	Held bool // not due and claimed (not in a retry's backoff), or read without its payload
	Msg  Picked
}

// WalkReader runs one read of the walk (query, args, then the window as
// the LIMIT) and returns its rows; due rows are messages, whole if query
// is a whole walk's.
type WalkReader func(window int, query string, args []any) ([]Queued, error)

// WalkRow is one row of a walk's read, as scanned.
type WalkRow struct {
	ID                 uuid.UUID
	Key                string
	Next, Created      time.Time
	Token, Topic       *string // nil where NULL
	Attempts           int
	Payload            []byte
	Headers, LastError string
	Ref                string
}

// Optional is a nullable column's value: nil where it was NULL.
func Optional(s string, valid bool) *string {
	if !valid {
		return nil
	}
	return &s
}

// Queued returns what the walk makes of the row at now. A row Go finds due
// but the SQL did not (which the millisecond clock should rule out) was
// read without its payload: it waits for the next claim, holding its key.
//
// whole: the row was read by a whole walk; otherwise by a walk of keys,
// and its message has only what the walk read.
func (w *WalkRow) Queued(now time.Time, whole bool) (Queued, error) {
	r := Queued{ID: w.ID, Key: w.Key}
	if w.Next.After(now) || (whole && w.Topic == nil) {
		r.Held = w.Token != nil || !w.Next.After(now)
		return r, nil
	}
	m := &core.OutboxMessage{ID: w.ID, Key: w.Key, State: core.StatePending,
		Attempts: w.Attempts, NextAttemptAt: w.Next, CreatedAt: w.Created, ClaimToken: w.Token}
	if whole {
		m.Topic, m.Payload, m.LastError = *w.Topic, w.Payload, w.LastError
		if err := m.Headers.Scan(w.Headers); err != nil {
			return r, err
		}
	}
	r.Msg = Picked{OutboxMessage: m, Ref: w.Ref}
	return r, nil
}

// GormWalk reads the walk through tx: a whole walk if whole, else a walk
// of keys.
func (s *Store) GormWalk(tx *gorm.DB, now time.Time, whole bool) WalkReader {
	addressed := s.dialect.AddressColumn() != ""
	return func(window int, query string, args []any) ([]Queued, error) {
		rows, err := tx.Raw(query, append(args, window)...).Rows()
		if err != nil {
			return nil, err
		}
		defer rows.Close()
		out := make([]Queued, 0, min(window, 4096))
		for rows.Next() {
			var (
				w                         WalkRow
				token, topic, hdrs, lastE sql.NullString
			)
			dest := []any{&w.ID, &w.Key, &w.Next, &token, &w.Attempts, &w.Created}
			if whole {
				dest = append(dest, &topic, &w.Payload, &hdrs, &lastE)
			}
			if addressed {
				dest = append(dest, &w.Ref)
			}
			if err := rows.Scan(dest...); err != nil {
				return nil, err
			}
			w.Token, w.Topic = Optional(token.String, token.Valid), Optional(topic.String, topic.Valid)
			w.Headers, w.LastError = hdrs.String, lastE.String
			r, err := w.Queued(now, whole)
			if err != nil {
				return nil, err
			}
			out = append(out, r)
		}
		return out, rows.Err()
	}
}

// Pick walks the pending rows in id order and returns those to claim: due
// rows of keys that hold nothing. The state is a SQL literal so that the
// partial pending index serves the read whatever the statement cache.
// The rows of inFlight are left out; busy has their keys, and Pick adds
// to it the keys it finds busy. Each picked message has the address the
// walk read (Dialect.AddressColumn). whole reads the picked rows whole;
// otherwise their messages have no topic, payload, headers or last error
// yet.
func (s *Store) Pick(read WalkReader, whole bool, now time.Time, opts core.ClaimOptions, inFlight []uuid.UUID, busy map[string]bool) ([]Picked, error) {
	q := s.Quote
	if busy == nil {
		busy = map[string]bool{}
	}
	var picked []Picked
	var after *uuid.UUID
	var skip map[uuid.UUID]bool // rows in flight that the SQL does not leave out
	walked := 0
	defer func() { s.lastWalk.Store(int64(walked)) }()
	first := s.firstWalk(whole)
	for window := s.claimWindow(opts.Limit); ; window *= 2 {
		query, args := s.walkKeys, make([]any, 0, len(walkIfDue)+2)
		if whole {
			query = s.walk
			for range walkIfDue {
				args = append(args, now)
			}
		}
		if after == nil && first != "" {
			query = first
		}
		if len(inFlight) > 0 && skip == nil {
			if notIn, arg := s.dialect.NotInIDs(q("id"), inFlight); notIn != "" {
				query += " AND " + notIn
				args = append(args, arg)
			} else {
				skip = make(map[uuid.UUID]bool, len(inFlight))
				for _, id := range inFlight {
					skip[id] = true
				}
			}
		}
		if after != nil {
			query += " AND " + q("id") + " > ?"
			args = append(args, *after)
			// A busy key's later rows are never picked, so the database
			// can skip them: with few keys, all held (a poison message in
			// backoff on each), the walk otherwise reads the whole backlog.
			if len(busy) > 0 && len(busy) <= maxSkippedKeys {
				notIn, arg := s.dialect.NotInKeys(q("message_key"), busy)
				query += " AND " + notIn
				args = append(args, arg)
			}
		}
		rows, err := read(window, query+" ORDER BY "+q("id")+" LIMIT ?", args)
		if err != nil {
			return nil, err
		}
		for _, r := range rows {
			walked++
			if skip[r.ID] {
				continue // in flight: its key is busy already
			}
			if r.Msg.OutboxMessage != nil {
				if r.Key == "" || !busy[r.Key] {
					picked = append(picked, r.Msg)
					if len(picked) == opts.Limit {
						return picked, nil
					}
				}
				continue
			}
			// Not due: in flight (claimed), or waiting for a retry, which
			// holds the key too unless SkipFailedKeys.
			if r.Key != "" && (!opts.SkipFailedKeys || r.Held) {
				busy[r.Key] = true
			}
		}
		if len(rows) < window {
			return picked, nil
		}
		after = &rows[len(rows)-1].ID
	}
}

// maxSkippedKeys bounds the list of busy keys a walk's later reads leave
// out in SQL; past it, they are read and skipped in Go.
const maxSkippedKeys = 1000

// firstWalk is the walk's first read where the dialect has one of its own
// (PendingWalker), or "". The reads after it, which can leave busy keys
// out in SQL (see Pick), stay on the pending index.
func (s *Store) firstWalk(whole bool) string {
	w, ok := s.dialect.(PendingWalker)
	if !ok {
		return ""
	}
	from := w.FirstWalkFrom(s.QuotedTable(), s.cfg.DeletePublished)
	switch {
	case from == "":
		return ""
	case whole:
		return s.walkSelect + from
	default:
		return s.walkKeysSelect + from
	}
}

// WalkSQL is the walk's first read of up to limit rows, as a claim runs
// it: whole, or of keys only.
func (s *Store) WalkSQL(whole bool, limit int) (string, []any) {
	query, args := s.walkKeys, []any{}
	if whole {
		query = s.walk
		now := Now()
		for range walkIfDue {
			args = append(args, now)
		}
	}
	if first := s.firstWalk(whole); first != "" {
		query = first
	}
	return query + " ORDER BY " + s.Quote("id") + " LIMIT ?", append(args, limit)
}

// orBackground is ctx, or context.Background() for a nil one: a nil
// context is a caller's slip that should not become a panic.
func orBackground(ctx context.Context) context.Context {
	if ctx == nil {
		return context.Background()
	}
	return ctx
}
