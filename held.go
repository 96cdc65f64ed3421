package outbox

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/google/uuid"
	"gorm.io/gorm"
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
	store *GormStore
	tx    *gorm.DB
	msgs  []*OutboxMessage
	done  bool
}

// inFlight is the set of rows this process's held claims have locked, with
// their keys. They are not stamped, so a walk would read them as due rows
// at the front of the queue, with their payloads, only to skip them: the
// walk leaves them out in SQL instead, and starts with their keys busy.
type inFlight struct {
	mu   sync.Mutex
	pick sync.Mutex // one walk at a time in this process: no two pick the same rows
	ids  map[uuid.UUID]string
}

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

func (f *inFlight) add(msgs []*OutboxMessage) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.ids == nil {
		f.ids = map[uuid.UUID]string{}
	}
	for _, m := range msgs {
		f.ids[m.ID] = m.Key
	}
}

func (f *inFlight) remove(msgs []*OutboxMessage) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, m := range msgs {
		delete(f.ids, m.ID)
	}
}

// claimHeld picks and locks due messages like Claim, and returns them with
// the transaction that holds them. ctx ends the picking; work is the
// transaction's context, whose end rolls it back (the rows are free again).
// A claim of no message holds nothing.
func (s *GormStore) claimHeld(ctx, work context.Context, opts ClaimOptions) (*heldClaim, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	c := &heldClaim{store: s}
	err := func() error {
		c.tx = s.db.WithContext(work).Begin()
		if c.tx.Error != nil {
			return c.tx.Error
		}
		now := time.Now().UTC().Truncate(time.Millisecond).Add(time.Millisecond)
		var err error
		if c.msgs, err = s.pickHeld(c.tx, now, opts); err != nil {
			return err
		}
		// Outside the walk's turn: the picked rows are in flight already,
		// so the other workers' walks leave them out.
		locked, err := s.lockPicked(c.tx, now, c.msgs, opts.Lease)
		if err != nil {
			return err
		}
		if len(locked) < len(c.msgs) {
			s.flying.remove(c.msgs)
			s.flying.add(locked)
		}
		c.msgs = locked
		return nil
	}()
	if err != nil || len(c.msgs) == 0 {
		c.abandon()
		if err != nil {
			return nil, fmt.Errorf("outbox: claiming messages from %s: %w", s.cfg.table, err)
		}
	}
	return c, nil
}

// pickHeld walks in this process's turn and puts what it picked in flight.
func (s *GormStore) pickHeld(tx *gorm.DB, now time.Time, opts ClaimOptions) ([]*OutboxMessage, error) {
	s.flying.pick.Lock()
	defer s.flying.pick.Unlock()
	inFlight, keys := s.flying.snapshot()
	picked, err := s.pick(tx, now, opts, inFlight, keys)
	if err != nil {
		return nil, err
	}
	s.flying.add(picked)
	return picked, nil
}

// finish records the sends' results in the claim's transaction and
// commits it; the messages not among them are left as they were, due.
func (c *heldClaim) finish(published []uuid.UUID, failures []Failure) error {
	if c == nil || c.done {
		return nil
	}
	if len(published) == 0 && len(failures) == 0 {
		c.abandon()
		return nil
	}
	defer c.store.flying.remove(c.msgs)
	c.done = true
	err := c.store.markPublished(c.tx, nil, published)
	if err == nil {
		err = c.store.markFailed(c.tx, nil, failures)
	}
	if err != nil {
		c.tx.Rollback()
		return err
	}
	if err := c.tx.Commit().Error; err != nil {
		return fmt.Errorf("outbox: committing the results of %d messages in %s: %w", len(c.msgs), c.store.cfg.table, err)
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
	c.store.flying.remove(c.msgs)
}

// lockPicked locks the picked rows (PostgreSQL) and returns those it may
// send. A row it cannot lock is in another transaction's claim, or has
// changed since the walk (published, or put back in a retry's backoff):
// either way its key is busy, and the later picked rows of that key are
// dropped too (they stay locked until this transaction ends, unsent).
//
// A held claim (lease > 0) sets two things for its transaction in the same
// statement, before it holds anything: idle_in_transaction_session_timeout,
// so that PostgreSQL ends the claim of a publisher that stops answering
// after the lease; and synchronous_commit off, because its commit only
// records results, and one lost in a crash of the database sends those
// messages again, never loses one (the enqueues stay synchronous).
func (s *GormStore) lockPicked(tx *gorm.DB, now time.Time, picked []*OutboxMessage, lease time.Duration) ([]*OutboxMessage, error) {
	if len(picked) == 0 {
		return nil, nil
	}
	q := s.quote
	from, args := s.table()+" AS o", []any{}
	if lease > 0 {
		from += ", (SELECT set_config('idle_in_transaction_session_timeout', ?, true)," +
			" set_config('synchronous_commit', 'off', true)) AS settings"
		args = append(args, strconv.FormatInt(max(lease.Milliseconds(), 1), 10))
	}
	rows, err := tx.Raw("SELECT o."+q("id")+" FROM "+from+" WHERE o."+q("id")+" "+s.dialect.inIDs+
		" AND o."+q("state")+" = 'pending' AND o."+q("next_attempt_at")+" <= ? FOR UPDATE OF o SKIP LOCKED",
		append(args, s.idsArg(ids(picked)), now)...).Rows()
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	locked := make(map[uuid.UUID]bool, len(picked))
	for rows.Next() {
		var id uuid.UUID
		if err := rows.Scan(&id); err != nil {
			return nil, err
		}
		locked[id] = true
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	if len(locked) == len(picked) {
		return picked, nil
	}
	busy := map[string]bool{}
	out := make([]*OutboxMessage, 0, len(picked)) // not in place: the caller still needs picked
	for _, m := range picked {
		switch {
		case !locked[m.ID]:
			if m.Key != "" {
				busy[m.Key] = true
			}
		case m.Key == "" || !busy[m.Key]:
			out = append(out, m)
		}
	}
	return out, nil
}
