package sqlstore

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/internal/core"
)

// Holder is a database whose publisher claims hold their rows locked in
// a transaction across the send (HeldClaims).
type Holder interface {
	// HeldTxOptions are the options of the claim's transaction.
	HeldTxOptions() *sql.TxOptions
	// HeldWalk is the walk's reader in the claim's transaction tx, which
	// runs on conn (nil if the pool is not a *sql.DB): a walk of keys.
	HeldWalk(ctx context.Context, tx *gorm.DB, conn *sql.Conn, now time.Time) WalkReader
	// LockHeld locks the picked rows in tx and returns those the claim may
	// send, read whole. A row it cannot lock is in another claim, or has
	// changed since the walk: its key is busy, and the later picked rows
	// of that key are left out too (still locked, unsent, until the
	// claim ends). It also makes the database end the transaction if it
	// stays idle for longer than lease (a publisher that stopped).
	LockHeld(tx *gorm.DB, conn *sql.Conn, now time.Time, picked []Picked, lease time.Duration) ([]Picked, error)
	// WritePublished writes the result of the published rows among the
	// claim's held rows, in its transaction tx (see Store.MarkPublishedWhere).
	WritePublished(tx *gorm.DB, published []uuid.UUID, held []Picked) error
	// AfterHeld runs on conn once the claim's transaction has ended, before
	// the connection goes back to the pool, if LockHeld was given rows to
	// lock; an error discards the connection.
	AfterHeld(conn *sql.Conn) error
}

// HeldClaims are the publisher's claims of a Holder database: the rows a
// claim picks stay locked (FOR UPDATE) in a transaction that stays open
// across the send and records the results before it commits. Against a
// lease (Claim), a claim writes each row once instead of twice (no stamp
// before the send), and needs no lock serializing the claims: another
// publisher's locked rows are in flight, and their keys busy, for as long
// as they are locked. A publisher that dies frees its rows at once, when
// its connection drops; one that stops answering frees them after the
// lease, when the database ends its idle transaction.
type HeldClaims struct {
	store  *Store
	holder Holder
	flying inFlight // rows locked by this process's held claims

	// turnUntil (nanoseconds since born, a monotonic reading): until
	// then, exactly-once claims take the WholeTurn before they lock, as
	// the last claim whose groups reached beyond its batch found they had
	// to.
	turnUntil atomic.Int64
	born      time.Time
}

// NewHeldClaims returns the held claims of store's table through holder.
func NewHeldClaims(store *Store, holder Holder) *HeldClaims {
	return &HeldClaims{store: store, holder: holder, born: time.Now()}
}

// HeldClaim is one held claim: a Batch whose results are written in its
// own transaction.
type HeldClaim struct {
	h      *HeldClaims
	conn   *sql.Conn // the pool connection tx runs on; nil if the pool is not a *sql.DB
	tx     *gorm.DB
	msgs   []Picked // with the addresses where the lock found them
	done   bool
	locked bool // LockHeld ran with rows to lock (see Holder.AfterHeld)
	// turnKept: the claim could not give its turn back (WholeTurn), so its
	// connection, which would keep it, is closed instead of pooled.
	turnKept bool
}

// WholeTurn is a Holder whose exactly-once claims take turns across
// processes from their lock to the end of their groups' completion. Two
// claims that locked rows at once would each hold rows of the other's
// groups, and each drop the groups it cannot complete, again and again.
//
// The turn is for liveness only, and costs every claim two statements and
// a wait: a claim takes it only while its process's claims have lately
// met groups reaching beyond their batch (turnStays). A claim without the
// turn whose groups reach beyond its batch gives its rows back before it
// locks another and claims again with the turn (errTurnNeeded); one whose
// groups are whole in its batch (one-message transactions, or groups the
// walk picked whole) has nothing to complete, so nothing to drop.
type WholeTurn interface {
	// TakeWholeTurn takes the turn in the claim's transaction tx (a lock
	// of its session), and also makes the database end that transaction
	// if it stays idle for longer than lease; release gives the turn back
	// while the transaction stays open.
	TakeWholeTurn(tx *gorm.DB, lease time.Duration) (release func() error, err error)
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
	// the rows in flight and the index entries of rows deleted too recently
	// for the database to drop them) is most of it, and walks
	// take turns: so while other claims are open (other workers sending,
	// soon back for more), a walk picks the next two batches of each, up
	// to maxWalkBatches, and leaves them here, in flight, for the next
	// claims to take instead of walking. A spare may have changed since
	// the walk read it: the lock checks each row again.
	claims    atomic.Int32 // held claims open, from their start to their end
	spares    [][]Picked
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
func (f *inFlight) add(msgs []Picked) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.ids == nil {
		f.ids = map[uuid.UUID]string{}
	}
	for _, m := range msgs {
		f.ids[m.ID] = m.Key
	}
}

func (f *inFlight) remove(msgs []Picked) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, m := range msgs {
		delete(f.ids, m.ID)
	}
}

// Claim picks and locks due messages like Claim, and returns them with
// the transaction that holds them. ctx ends the picking; work is the
// transaction's context, whose end rolls it back (the rows are free again).
// A claim of no message holds nothing.
func (h *HeldClaims) Claim(ctx, work context.Context, opts core.ClaimOptions) (*HeldClaim, error) {
	return h.claim(ctx, work, opts, false, false, nil)
}

// ClaimWhole is Claim for exactly-once mode: the claim holds whole
// transaction groups (see completeGroups), and leaves out, with their
// groups and the later messages of their keys, the rows that excluded
// names among those it locked: rows of an earlier claim whose broker
// transaction is not settled yet, free since its transaction ended.
// excluded runs once every row of the claim is locked, so that it sees
// every claim that locked one of them before.
func (h *HeldClaims) ClaimWhole(ctx, work context.Context, opts core.ClaimOptions, excluded func([]uuid.UUID) (map[uuid.UUID]bool, error)) (*HeldClaim, error) {
	_, turns := h.holder.(WholeTurn)
	withTurn := turns && int64(time.Since(h.born)) < h.turnUntil.Load()
	c, err := h.claim(ctx, work, opts, true, withTurn, excluded)
	if errors.Is(err, errTurnNeeded) {
		return h.claim(ctx, work, opts, true, true, excluded)
	}
	return c, err
}

// turnStays is how long a process's exactly-once claims keep taking the
// WholeTurn once one met groups reaching beyond its batch: a backlog of
// multi-message transactions keeps them in it, a quiet spell of
// one-message transactions lets them out.
const turnStays = time.Second

// errTurnNeeded ends a claim made without the WholeTurn whose groups reach
// beyond its batch: it claims again with the turn.
var errTurnNeeded = errors.New("the claim's groups reach beyond its batch: claiming again with the exactly-once claims' turn")

// keepTurn makes the next turnStays of exactly-once claims take the turn.
func (h *HeldClaims) keepTurn() {
	h.turnUntil.Store(int64(time.Since(h.born) + turnStays))
}

// claim is a held claim; whole, of whole transaction groups, taking the
// WholeTurn if withTurn, or else ending with errTurnNeeded if its groups
// reach beyond its batch.
func (h *HeldClaims) claim(ctx, work context.Context, opts core.ClaimOptions, whole, withTurn bool, excluded func([]uuid.UUID) (map[uuid.UUID]bool, error)) (*HeldClaim, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	c := &HeldClaim{h: h}
	h.flying.claims.Add(1)
	err := func() error {
		if err := c.begin(work); err != nil {
			return err
		}
		now := Now()
		read := h.holder.HeldWalk(work, c.tx, c.conn, now)
		var err error
		if c.msgs, err = h.pick(read, now, opts); err != nil {
			return err
		}
		// Outside the walk's turn: the picked rows are in flight already,
		// so the other workers' walks leave them out. The lock reads what
		// the walk left out of the rows (see walkKeys): walks take turns,
		// locks do not, unless they complete groups (WholeTurn).
		c.locked = len(c.msgs) > 0
		t, turns := h.holder.(WholeTurn)
		if whole && turns && withTurn && c.locked {
			release, err := t.TakeWholeTurn(c.tx, opts.Lease)
			if err != nil {
				return err
			}
			defer func() {
				if release() != nil {
					c.turnKept = true
				}
			}()
		}
		locked, err := h.holder.LockHeld(c.tx, c.conn, now, c.msgs, opts.Lease)
		if err != nil {
			return err
		}
		if whole && len(locked) > 0 {
			reaching := func() error {
				h.keepTurn()
				if turns && !withTurn {
					return errTurnNeeded
				}
				return nil
			}
			if locked, err = h.store.completeGroups(c.tx, now, locked, excluded, reaching); err != nil {
				return err
			}
		}
		if whole || len(locked) < len(c.msgs) {
			h.flying.remove(c.msgs)
			h.flying.add(locked)
		}
		c.msgs = locked
		return nil
	}()
	if err != nil || len(c.msgs) == 0 {
		c.abandon()
		if err != nil {
			return nil, fmt.Errorf("outbox: claiming messages from %s: %w", h.store.Table(), err)
		}
	}
	return c, nil
}

// begin opens the claim's transaction on a connection of its own, so that
// the database's part can reach its driver (PostgreSQL reads through pgx
// itself) and set up the connection (MySQL's timeout).
func (c *HeldClaim) begin(work context.Context) error {
	db := c.h.store.DB().Session(&gorm.Session{NewDB: true, Context: work})
	if sqlDB, err := c.h.store.DB().DB(); err == nil {
		if c.conn, err = sqlDB.Conn(work); err != nil {
			return err
		}
		db.Statement.ConnPool = c.conn
	}
	c.tx = db.Begin(c.h.holder.HeldTxOptions())
	return c.tx.Error
}

// pick walks in this process's turn and puts what it picked in flight.
// A claim that finds a spare batch for it takes that instead of walking.
func (h *HeldClaims) pick(read WalkReader, now time.Time, opts core.ClaimOptions) ([]Picked, error) {
	f := &h.flying
	f.pick.Lock()
	defer f.pick.Unlock()
	if spare := f.takeSpare(opts); spare != nil {
		return spare, nil
	}
	walk := opts
	walk.Limit *= min(max(2*int(f.claims.Load())-1, 1), maxWalkBatches)
	inFlight, keys := f.snapshot()
	picked, err := h.store.Pick(read, false, now, walk, inFlight, keys)
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
func (f *inFlight) takeSpare(opts core.ClaimOptions) []Picked {
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
func splitPicked(picked []Picked, limit int) [][]Picked {
	if len(picked) <= limit {
		if len(picked) == 0 {
			return nil
		}
		return [][]Picked{picked}
	}
	var batches [][]Picked
	batchOf := make(map[string]int, len(picked))
	for _, m := range picked {
		last := len(batches) - 1
		b, seen := batchOf[m.Key]
		switch {
		case m.Key != "" && seen && (b != last || len(batches[last]) == limit):
			continue // its key's batch is out of reach, or full
		case last < 0 || len(batches[last]) == limit:
			batches = append(batches, make([]Picked, 0, limit))
			last++
		}
		batches[last] = append(batches[last], m)
		if m.Key != "" {
			batchOf[m.Key] = last
		}
	}
	return batches
}

func (c *HeldClaim) Messages() []*core.OutboxMessage {
	out := make([]*core.OutboxMessage, len(c.msgs))
	for i, m := range c.msgs {
		out[i] = m.OutboxMessage
	}
	return out
}

// Record records the results in the claim's transaction and commits it;
// the released messages, left as they were, are due again.
func (c *HeldClaim) Record(_ context.Context, published []uuid.UUID, failures []core.Failure, _ []uuid.UUID) error {
	return c.finish(published, failures, nil)
}

// RecordWith is Record that also runs fn in the claim's transaction,
// which then commits even if no result is to be written.
func (c *HeldClaim) RecordWith(published []uuid.UUID, failures []core.Failure, fn func(tx *gorm.DB) error) error {
	return c.finish(published, failures, fn)
}

// Alive checks that the claim's transaction is still open, its rows still
// locked: the database ends the transaction of a connection it lost, and
// of one that stayed idle past the lease.
func (c *HeldClaim) Alive() error {
	if c == nil || c.done || c.tx == nil {
		return errors.New("outbox: the claim's transaction has ended")
	}
	return c.tx.Exec("SELECT 1").Error
}

// GiveBack rolls the claim back: every message is due again.
func (c *HeldClaim) GiveBack(context.Context) error {
	c.abandon()
	return nil
}

// End rolls back what finish has not committed.
func (c *HeldClaim) End() { c.abandon() }

// finish records the sends' results in the claim's transaction and
// commits it; the messages not among them are left as they were, due.
func (c *HeldClaim) finish(published []uuid.UUID, failures []core.Failure, also func(tx *gorm.DB) error) error {
	if c == nil || c.done {
		return nil
	}
	if len(published) == 0 && len(failures) == 0 && also == nil {
		c.abandon()
		return nil
	}
	defer c.release()
	c.done = true
	err := c.markPublished(published)
	if err == nil {
		err = c.h.store.MarkFailedOn(c.tx, nil, failures)
	}
	if err == nil && also != nil {
		err = also(c.tx)
	}
	if err != nil {
		c.tx.Rollback()
		return err
	}
	if err := c.tx.Commit().Error; err != nil {
		return fmt.Errorf("outbox: committing the results of %d messages in %s: %w", len(c.msgs), c.h.store.Table(), err)
	}
	return nil
}

// abandon rolls the claim's transaction back if it is still open: its
// messages are due again, no attempt counted.
func (c *HeldClaim) abandon() {
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
func (c *HeldClaim) release() {
	c.h.flying.claims.Add(-1)
	if c.conn != nil {
		if err := c.afterHeld(); err != nil || c.turnKept {
			_ = c.conn.Raw(func(any) error { return driver.ErrBadConn })
		}
		c.conn.Close()
	}
	c.h.flying.remove(c.msgs)
}

// markPublished writes the result of the published rows, which the
// claim's transaction has locked.
func (c *HeldClaim) markPublished(published []uuid.UUID) error {
	if len(published) == 0 {
		return nil
	}
	return c.h.holder.WritePublished(c.tx, published, c.msgs)
}

// PickedIDs are the ids of picked, in order.
func PickedIDs(picked []Picked) []uuid.UUID {
	out := make([]uuid.UUID, len(picked))
	for i, m := range picked {
		out[i] = m.ID
	}
	return out
}

// Finish records the results in the claim's transaction and commits it;
// the messages not among them are left as they were, due. Abandon rolls it
// back. Tx is the claim's transaction. For the database packages' tests.
func (c *HeldClaim) Finish(published []uuid.UUID, failures []core.Failure) error {
	return c.finish(published, failures, nil)
}
func (c *HeldClaim) Abandon()     { c.abandon() }
func (c *HeldClaim) Tx() *gorm.DB { return c.tx }

// KeepLocked returns the picked rows a claim may send once it has tried to
// lock them (locked[i], n of them locked): a row it could not lock is in
// another claim, or has changed since the walk; either way its key is
// busy, and the later picked rows of that key are left out too.
func KeepLocked(picked []Picked, locked []bool, n int) []Picked {
	if n == len(picked) {
		return picked
	}
	busy := map[string]bool{}
	out := make([]Picked, 0, len(picked)) // not in place: the caller still needs picked
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
	return out
}

func (c *HeldClaim) afterHeld() error {
	if !c.locked {
		return nil
	}
	return c.h.holder.AfterHeld(c.conn)
}
