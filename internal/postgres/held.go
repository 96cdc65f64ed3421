package postgres

import (
	"context"
	"database/sql"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/internal/core"
	"github.com/gorm-outbox/outbox/internal/sqlstore"
)

// heldClaim is how the publisher claims on PostgreSQL: the rows it picks
// stay locked (FOR UPDATE) in a transaction that stays open across the send
// and records the results before it commits. Against a lease (Claim), it
// writes each row once instead of twice (no stamp before the send), and
// needs no lock serializing the claims: another publisher's locked rows
// are in flight, and their keys busy, for as long as they are locked. A
// publisher that dies frees its rows at once, when its connection drops;
// one that stops answering frees them after the lease, when PostgreSQL
// ends its idle transaction (idle_in_transaction_session_timeout).
type heldClaim struct {
	d    *dialect
	conn *sql.Conn // the pool connection tx runs on; nil if the pool is not a *sql.DB
	tx   *gorm.DB
	msgs []sqlstore.Picked // with the addresses where the lock found them
	done bool
}

// inFlight is the set of rows this process's held claims have locked, with
// their keys. They are not stamped, so a walk would read them as due rows
// at the front of the queue, with their payloads, only to skip them: the
// walk leaves them out in SQL instead, and starts with their keys busy.
type inFlight struct {
	mu   sync.Mutex
	pick sync.Mutex // one walk at a time in this process: no two pick the same rows
	ids  map[uuid.UUID]string

	// A walk's fixed cost (a read that starts at the queue's front, past
	// the rows in flight and the entries of rows deleted too recently for
	// PostgreSQL to drop them: see lockPicked) is most of it, and walks
	// take turns: so while other claims are open (other workers sending,
	// soon back for more), a walk picks the next two batches of each, up
	// to maxWalkBatches, and leaves them here, in flight, for the next
	// claims to take instead of walking. A spare may have changed since
	// the walk read it: the lock checks each row again.
	claims    atomic.Int32 // held claims open, from their start to their end
	spares    [][]sqlstore.Picked
	spareOpts core.ClaimOptions
	spareAt   time.Time
}

// maxWalkBatches bounds the batches one walk picks: 4,000 rows in flight
// at the default batch size, read without their payloads.
const maxWalkBatches = 8

// spareFresh is how long a spare batch waits for its claim before it is
// dropped: it is meant for a claim already waiting, and what a walk read
// should not be sent much later.
const spareFresh = 50 * time.Millisecond

// snapshot returns the rows in flight and their keys. A row that lands
// after it is not in it; one that leaves after it is skipped once more.
func (f *inFlight) snapshot() (ids []uuid.UUID, keys map[string]bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	keys = make(map[string]bool, len(f.ids))
	for id, key := range f.ids {
		ids = append(ids, id)
		if key != "" {
			keys[key] = true
		}
	}
	return ids, keys
}

// add puts msgs in flight.
func (f *inFlight) add(msgs []sqlstore.Picked) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.ids == nil {
		f.ids = map[uuid.UUID]string{}
	}
	for _, m := range msgs {
		f.ids[m.ID] = m.Key
	}
}

func (f *inFlight) remove(msgs []sqlstore.Picked) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, m := range msgs {
		delete(f.ids, m.ID)
	}
}

// ClaimBatch is the publisher's claim on PostgreSQL: held across the send.
func (d *dialect) ClaimBatch(ctx, work context.Context, opts core.ClaimOptions) (sqlstore.Batch, error) {
	c, err := d.claimHeld(ctx, work, opts)
	if err != nil {
		return nil, err
	}
	return c, nil
}

// claimHeld picks and locks due messages like Claim, and returns them with
// the transaction that holds them. ctx ends the picking; work is the
// transaction's context, whose end rolls it back (the rows are free again).
// A claim of no message holds nothing.
func (d *dialect) claimHeld(ctx, work context.Context, opts core.ClaimOptions) (*heldClaim, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	c := &heldClaim{d: d}
	d.flying.claims.Add(1)
	err := func() error {
		if err := c.begin(work); err != nil {
			return err
		}
		now := sqlstore.Now()
		read := d.store.GormWalk(c.tx, now, false)
		if c.conn != nil {
			read = d.pgxWalk(work, c.conn, read, now)
		}
		read = d.plannedWalk(c.tx, read)
		var err error
		if c.msgs, err = d.pickHeld(read, now, opts); err != nil {
			return err
		}
		// Outside the walk's turn: the picked rows are in flight already,
		// so the other workers' walks leave them out. The lock reads what
		// the walk left out of the rows (see walkKeys): walks take turns,
		// locks do not.
		locked, err := d.lockPicked(c.tx, c.conn, now, c.msgs, opts.Lease, true)
		if err != nil {
			return err
		}
		if len(locked) < len(c.msgs) {
			d.flying.remove(c.msgs)
			d.flying.add(locked)
		}
		c.msgs = locked
		return nil
	}()
	if err != nil || len(c.msgs) == 0 {
		c.abandon()
		if err != nil {
			return nil, fmt.Errorf("outbox: claiming messages from %s: %w", d.table, err)
		}
	}
	return c, nil
}

// begin opens the claim's transaction on a connection of its own, so that
// the walk can read through pgx itself (see pgxWalk).
func (c *heldClaim) begin(work context.Context) error {
	db := c.d.store.DB().Session(&gorm.Session{NewDB: true, Context: work})
	if sqlDB, err := c.d.store.DB().DB(); err == nil {
		if c.conn, err = sqlDB.Conn(work); err != nil {
			return err
		}
		db.Statement.ConnPool = c.conn
	}
	c.tx = db.Begin()
	return c.tx.Error
}

// pgxWalk reads the held claim's walk (s.walkKeys) through pgx itself, on
// conn, inside the claim's transaction; with another driver it reads
// through fallback. Through database/sql each value of each row is
// converted twice (to a driver.Value, then to its destination: a uuid
// formatted and parsed again), and the walk, which takes turns, would be
// longer for it. These reads do not pass through GORM's logger and callbacks.
func (d *dialect) pgxWalk(ctx context.Context, conn *sql.Conn, fallback sqlstore.WalkReader, now time.Time) sqlstore.WalkReader {
	return func(window int, query string, args []any) ([]sqlstore.Queued, error) {
		out := make([]sqlstore.Queued, 0, min(window, 4096))
		ok, err := pgxQuery(ctx, conn, false, query, append(args, window), func(rows pgx.Rows) error {
			var (
				w     sqlstore.WalkRow
				id    pgtype.UUID
				token pgtype.Text
			)
			if err := rows.Scan(&id, &w.Key, &w.Next, &token, &w.Attempts, &w.Created, &w.Ref); err != nil {
				return err
			}
			w.ID = id.Bytes
			w.Token = sqlstore.Optional(token.String, token.Valid)
			r, err := w.Queued(now, false)
			if err != nil {
				return err
			}
			out = append(out, r)
			return nil
		})
		if !ok {
			return fallback(window, query, args)
		}
		return out, err
	}
}

// plannedWalk returns read, which runs the dialect's walkSetup in tx
// before its first read: only a claim that walks pays for it.
func (d *dialect) plannedWalk(tx *gorm.DB, read sqlstore.WalkReader) sqlstore.WalkReader {
	if walkSetup == "" {
		return read
	}
	set := false
	return func(window int, query string, args []any) ([]sqlstore.Queued, error) {
		if !set {
			if err := tx.Exec(walkSetup).Error; err != nil {
				return nil, err
			}
			set = true
		}
		return read(window, query, args)
	}
}

// pgxQuery runs query (with GORM's ? placeholders) through pgx itself on
// conn and calls row for each row; ok is false, and nothing ran, where the
// driver is not pgx. unnamed runs it as an unnamed statement, planned for
// its arguments each time, unless the connection is set to another mode
// (the simple protocol, for PgBouncer): a cached statement may get a
// generic plan, in which an id list is a parameter array matched against
// each row one by one, and one chosen while the table was nearly empty can
// scan it whole once it has grown. The lock needs it (it is the statement
// that sets plan_cache_mode for the rest of the claim); the walk does not
// take it: its generic plan costs far more than its custom one whenever
// the table holds more than a few rows, so PostgreSQL keeps planning it
// for its arguments anyway, and a cached statement spares the parse on
// every claim.
func pgxQuery(ctx context.Context, conn *sql.Conn, unnamed bool, query string, args []any, row func(pgx.Rows) error) (ok bool, err error) {
	err = conn.Raw(func(dc any) error {
		pc, isPgx := dc.(pgxConn)
		if !isPgx {
			return nil
		}
		ok = true
		c := pc.Conn()
		if unnamed && c.Config().DefaultQueryExecMode == pgx.QueryExecModeCacheStatement {
			args = append([]any{pgx.QueryExecModeCacheDescribe}, args...)
		}
		rows, err := c.Query(ctx, dollarParams(query), args...)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			if err := row(rows); err != nil {
				return err
			}
		}
		return rows.Err()
	})
	return ok, err
}

// dollarParams numbers the ? placeholders of query as PostgreSQL's $1, $2...,
// as GORM does for it. The outbox's SQL has no ? in a literal or a name.
func dollarParams(query string) string {
	var b strings.Builder
	b.Grow(len(query) + 16)
	n := 0
	for i := 0; i < len(query); i++ {
		if query[i] != '?' {
			b.WriteByte(query[i])
			continue
		}
		n++
		b.WriteByte('$')
		b.WriteString(strconv.Itoa(n))
	}
	return b.String()
}

// pickHeld walks in this process's turn and puts what it picked in flight.
// A claim that finds a spare batch for it takes that instead of walking.
func (d *dialect) pickHeld(read sqlstore.WalkReader, now time.Time, opts core.ClaimOptions) ([]sqlstore.Picked, error) {
	f := &d.flying
	f.pick.Lock()
	defer f.pick.Unlock()
	if spare := f.takeSpare(opts); spare != nil {
		return spare, nil
	}
	walk := opts
	walk.Limit *= min(max(2*int(f.claims.Load())-1, 1), maxWalkBatches)
	inFlight, keys := f.snapshot()
	picked, err := d.store.Pick(read, false, now, walk, inFlight, keys)
	if err != nil {
		return nil, err
	}
	batches := splitPicked(picked, opts.Limit)
	for _, b := range batches {
		f.add(b)
	}
	if len(batches) == 0 {
		return nil, nil
	}
	if len(batches) > 1 {
		f.spares, f.spareOpts, f.spareAt = batches[1:], opts, time.Now()
	}
	return batches[0], nil
}

// takeSpare returns the next spare batch if they were picked for claims
// like opts and are fresh; otherwise it drops them (their rows leave the
// rows in flight, still due). Called in the walk's turn.
func (f *inFlight) takeSpare(opts core.ClaimOptions) []sqlstore.Picked {
	if len(f.spares) == 0 {
		return nil
	}
	if f.spareOpts != opts || time.Since(f.spareAt) > spareFresh {
		for _, b := range f.spares {
			f.remove(b)
		}
		f.spares = nil
		return nil
	}
	spare := f.spares[0]
	f.spares = f.spares[1:]
	return spare
}

// splitPicked splits a walk's picks, in id order, into batches of limit.
// A key's messages must not be sent by two claims at once, so a key's
// messages go in the batch of its first; those that do not fit stay due,
// behind their key's batch.
func splitPicked(picked []sqlstore.Picked, limit int) [][]sqlstore.Picked {
	if len(picked) <= limit {
		if len(picked) == 0 {
			return nil
		}
		return [][]sqlstore.Picked{picked}
	}
	var batches [][]sqlstore.Picked
	batchOf := make(map[string]int, len(picked))
	for _, m := range picked {
		last := len(batches) - 1
		b, seen := batchOf[m.Key]
		switch {
		case m.Key != "" && seen && (b != last || len(batches[last]) == limit):
			continue // its key's batch is out of reach, or full
		case last < 0 || len(batches[last]) == limit:
			batches = append(batches, make([]sqlstore.Picked, 0, limit))
			last++
		}
		batches[last] = append(batches[last], m)
		if m.Key != "" {
			batchOf[m.Key] = last
		}
	}
	return batches
}

func (c *heldClaim) Messages() []*core.OutboxMessage {
	out := make([]*core.OutboxMessage, len(c.msgs))
	for i, m := range c.msgs {
		out[i] = m.OutboxMessage
	}
	return out
}

// Record records the results in the claim's transaction and commits it;
// the released messages, left as they were, are due again.
func (c *heldClaim) Record(_ context.Context, published []uuid.UUID, failures []core.Failure, _ []uuid.UUID) error {
	return c.finish(published, failures)
}

// GiveBack rolls the claim back: every message is due again.
func (c *heldClaim) GiveBack(context.Context) error {
	c.abandon()
	return nil
}

// End rolls back what finish has not committed.
func (c *heldClaim) End() { c.abandon() }

// finish records the sends' results in the claim's transaction and
// commits it; the messages not among them are left as they were, due.
func (c *heldClaim) finish(published []uuid.UUID, failures []core.Failure) error {
	if c == nil || c.done {
		return nil
	}
	if len(published) == 0 && len(failures) == 0 {
		c.abandon()
		return nil
	}
	defer c.release()
	c.done = true
	err := c.markPublished(published)
	if err == nil {
		err = c.d.store.MarkFailedOn(c.tx, nil, failures)
	}
	if err != nil {
		c.tx.Rollback()
		return err
	}
	if err := c.tx.Commit().Error; err != nil {
		return fmt.Errorf("outbox: committing the results of %d messages in %s: %w", len(c.msgs), c.d.table, err)
	}
	return nil
}

// abandon rolls the claim's transaction back if it is still open: its
// messages are due again, no attempt counted.
func (c *heldClaim) abandon() {
	if c == nil || c.done {
		return
	}
	c.done = true
	if c.tx != nil && c.tx.Error == nil {
		c.tx.Rollback()
	}
	c.release()
}

// release hands the claim's connection back to the pool once its
// transaction has ended, and its messages leave the rows in flight.
func (c *heldClaim) release() {
	c.d.flying.claims.Add(-1)
	if c.conn != nil {
		c.conn.Close()
	}
	c.d.flying.remove(c.msgs)
}

// markPublished writes the result of the published rows, which the
// claim's transaction has locked at their addresses.
func (c *heldClaim) markPublished(published []uuid.UUID) error {
	if len(published) == 0 {
		return nil
	}
	if arg, ok := refsArg(published, c.msgs); ok {
		return c.d.store.MarkPublishedWhere(c.tx, len(published), refsMatch(""), arg)
	}
	in, arg := c.d.InIDs(c.d.store.Quote("id"), published)
	return c.d.store.MarkPublishedWhere(c.tx, len(published), in, arg)
}

// pickedIDs are the ids of picked, in order.
func pickedIDs(picked []sqlstore.Picked) []uuid.UUID {
	out := make([]uuid.UUID, len(picked))
	for i, m := range picked {
		out[i] = m.ID
	}
	return out
}

// refColumn reads the address of a row of alias ("o." or ""); refsMatch is
// true of a row whose address is among those of a refsArg. The list is
// a subquery's result, not a constant: planned as a constant, each of its
// addresses is estimated in turn, which takes longer than locking the
// rows; a TID scan needs no estimate to be chosen.
func refColumn(alias string) string { return "CAST(" + alias + "ctid AS text)" }
func refsMatch(alias string) string {
	return alias + "ctid = ANY(CAST((SELECT CAST(? AS tid[])) AS tid[]))"
}

// refsArg is the argument of refsMatch for the rows ids of msgs, which
// has them in the same order (a held claim's messages and the ids of
// those published); ok is false unless msgs has an address for each.
//
// A row's address (PostgreSQL's ctid) stays its own while a transaction
// holds it locked, so the lock and the results of a held claim find rows
// by address, one page read each, instead of by id through the index
// (three or four). The walk
// reads each row's address (OutboxMessage.ref); the lock checks that each
// address still holds the id picked there.
func refsArg(ids []uuid.UUID, msgs []sqlstore.Picked) (arg string, ok bool) {
	if len(msgs) == 0 {
		return "", false
	}
	var b strings.Builder
	b.Grow(len(ids)*12 + 2)
	b.WriteByte('{')
	j := 0
	for i, id := range ids {
		for j < len(msgs) && msgs[j].ID != id {
			j++
		}
		if j == len(msgs) || msgs[j].Ref == "" {
			return "", false
		}
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteByte('"') // "(page,item)": the comma must be quoted
		b.WriteString(msgs[j].Ref)
		b.WriteByte('"')
		j++
	}
	b.WriteByte('}')
	return b.String(), true
}

// lockedRow is a row as the lock reads it.
type lockedRow struct {
	ref                       string
	topic, headers, lastError string
	payload                   []byte
	attempts                  int
}

// lockPicked locks the picked rows (PostgreSQL) and returns those it may
// send, each with the address where it is locked. A row it cannot lock is in another
// transaction's claim, or has changed since the walk (published, or put
// back in a retry's backoff): either way its key is busy, and the later
// picked rows of that key are dropped too (they stay locked until this
// transaction ends, unsent).
//
// With the address of every picked row (OutboxMessage.ref, as the walk
// read it), it locks by address: a row
// that has changed since the walk has a new address or none (an updated
// row's new version is elsewhere, and the old one fails the lock's check);
// an address that holds another row since (deleted, vacuumed, reused) is
// not one of the picked ids, and is left out.
//
// read: the picked messages were walked without their contents (walkKeys);
// the lock reads them from the rows it locks, as they are while locked.
//
// A held claim (lease > 0) sets two things for its transaction in the
// same statement, before it holds anything: idle_in_transaction_session_timeout,
// so that PostgreSQL ends the claim of a publisher that stops answering
// after the lease; and plan_cache_mode force_custom_plan, so that the
// results' statements, which pgx prepares and caches, are planned for
// their id lists: a generic plan chosen while the table was nearly empty
// scans it whole for every batch once it has grown. Its commit waits for
// the disk (synchronous_commit as the server has it): the rows it deletes
// are not known to be gone, and walks cannot drop their index entries,
// until the commit is on disk, which without the wait is up to the WAL
// writer's next round: every walk would step over the rows deleted in
// that time.
func (d *dialect) lockPicked(tx *gorm.DB, conn *sql.Conn, now time.Time, picked []sqlstore.Picked, lease time.Duration, read bool) ([]sqlstore.Picked, error) {
	if len(picked) == 0 {
		return nil, nil
	}
	q := d.store.Quote
	from, args := d.store.QuotedTable()+" AS o", []any{}
	if lease > 0 {
		from += ", (SELECT set_config('idle_in_transaction_session_timeout', ?, true)," +
			" set_config('plan_cache_mode', 'force_custom_plan', true)) AS settings"
		args = append(args, strconv.FormatInt(max(lease.Milliseconds(), 1), 10))
	}
	ids := pickedIDs(picked)
	var match string
	var matchArg any
	byAddress := false
	if arg, ok := refsArg(ids, picked); ok {
		match, matchArg, byAddress = refsMatch("o."), arg, true
	} else {
		match, matchArg = d.InIDs("o."+q("id"), ids)
	}
	cols := "o." + q("id") + ", " + refColumn("o.")
	if read {
		cols += ", o." + q("topic") + ", o." + q("payload") + ", o." + q("headers") + ", o." + q("last_error") + ", o." + q("attempts")
	}
	query := "SELECT " + cols + " FROM " + from + " WHERE " + match +
		" AND o." + q("state") + " = 'pending' AND o." + q("next_attempt_at") + " <= ? FOR UPDATE OF o SKIP LOCKED"
	args = append(args, matchArg, now)
	index := make(map[uuid.UUID]int, len(picked))
	for i, m := range picked {
		index[m.ID] = i
	}
	locked := make([]bool, len(picked))
	nLocked := 0
	var row lockedRow
	dest := func(id any) []any {
		out := []any{id, &row.ref}
		if read {
			out = append(out, &row.topic, &row.payload, &row.headers, &row.lastError, &row.attempts)
		}
		return out
	}
	lockedOne := func(id uuid.UUID) error {
		i, ok := index[id]
		if !ok || byAddress && picked[i].Ref != row.ref {
			return nil // by address: not the row picked there
		}
		m := picked[i]
		locked[i], m.Ref = true, row.ref
		nLocked++
		if read {
			m.Topic, m.Payload, m.LastError, m.Attempts = row.topic, row.payload, row.lastError, row.attempts
			return m.Headers.Scan(row.headers)
		}
		return nil
	}
	ok := false
	if conn != nil {
		var err error
		ok, err = pgxQuery(tx.Statement.Context, conn, true, query, args, func(rows pgx.Rows) error {
			var id pgtype.UUID
			row = lockedRow{}
			if err := rows.Scan(dest(&id)...); err != nil {
				return err
			}
			return lockedOne(id.Bytes)
		})
		if err != nil {
			return nil, err
		}
	}
	if !ok {
		rows, err := tx.Raw(query, args...).Rows()
		if err != nil {
			return nil, err
		}
		defer rows.Close()
		for rows.Next() {
			var id uuid.UUID
			row = lockedRow{}
			if err := rows.Scan(dest(&id)...); err != nil {
				return nil, err
			}
			if err := lockedOne(id); err != nil {
				return nil, err
			}
		}
		if err := rows.Err(); err != nil {
			return nil, err
		}
	}
	if nLocked == len(picked) {
		return picked, nil
	}
	busy := map[string]bool{}
	out := make([]sqlstore.Picked, 0, len(picked)) // not in place: the caller still needs picked
	for i, m := range picked {
		switch {
		case !locked[i]:
			if m.Key != "" {
				busy[m.Key] = true
			}
		case m.Key == "" || !busy[m.Key]:
			out = append(out, m)
		}
	}
	return out, nil
}

// TakesPgxPath reports whether the held claim's reads through pgx itself
// (its walk and lock) reach pgx on db's connections, or fall back to GORM:
// how a deployment can tell which path its driver gets.
func TakesPgxPath(ctx context.Context, db *gorm.DB) (bool, error) {
	sqlDB, err := db.DB()
	if err != nil {
		return false, err
	}
	conn, err := sqlDB.Conn(ctx)
	if err != nil {
		return false, err
	}
	defer conn.Close()
	return pgxQuery(ctx, conn, false, "SELECT 1", nil, func(pgx.Rows) error { return nil })
}
