package outbox

import (
	"context"
	"errors"
	"fmt"
	"time"

	"gorm.io/gorm"
)

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

func (r RetentionPolicy) withDefaults() RetentionPolicy {
	if r.Published <= 0 {
		r.Published = DefaultRetention.Published
	}
	if r.BatchSize <= 0 {
		r.BatchSize = DefaultRetention.BatchSize
	}
	return r
}

// ErrCleanupRunning is returned by Cleanup when another process is cleaning
// the same table: only one cleans at a time.
var ErrCleanupRunning = errors.New("outbox: another cleanup of this table is running")

// Cleanup deletes the published (and, if the policy says so, dead) messages
// older than the policy allows, in batches, each its own short transaction.
// progress, if not nil, is called after each batch with the total so far.
// It returns how many rows it deleted.
func (s *GormStore) Cleanup(ctx context.Context, policy RetentionPolicy, progress func(deleted int64)) (int64, error) {
	ctx = orBackground(ctx)
	policy = policy.withDefaults()
	now := time.Now().UTC()
	var total int64
	steps := []struct {
		state  State
		cutoff time.Time
		also   string // published rows: published long enough ago, too
	}{{StatePublished, now.Add(-policy.Published), s.quote("published_at") + " < ?"}}
	if policy.Dead > 0 {
		steps = append(steps, struct {
			state  State
			cutoff time.Time
			also   string
		}{StateDead, now.Add(-policy.Dead), ""})
	}
	for _, step := range steps {
		for {
			n, err := s.deleteBatch(ctx, step.state, step.cutoff, step.also, policy.BatchSize)
			if err != nil {
				return total, err
			}
			total += n
			if n > 0 && progress != nil {
				progress(total)
			}
			if n < int64(policy.BatchSize) {
				break
			}
		}
	}
	return total, nil
}

func (s *GormStore) deleteBatch(ctx context.Context, state State, cutoff time.Time, also string, limit int) (int64, error) {
	q, t := s.quote, s.table()
	// The state is a literal so that its partial index (MySQL: the state
	// index) serves it whatever the statement cache.
	where := q("state") + " = '" + string(state) + "' AND " + q("created_at") + " < ?"
	args := []any{cutoff}
	if also != "" {
		where += " AND " + also
		args = append(args, cutoff)
	}
	args = append(args, limit)
	sql := "DELETE FROM " + t + " WHERE " + q("id") + " IN (SELECT " + q("id") + " FROM " + t + " WHERE " + where + " LIMIT ?)"
	if s.dialect.deleteLimit { // MySQL cannot read the table it deletes from in a subquery
		sql = "DELETE FROM " + t + " WHERE " + where + " LIMIT ?"
	}
	var deleted int64
	err := s.serialized(ctx, s.dialect.cleanupLock, s.dialect.cleanupUnlock, s.lockKey()+1, func(tx *gorm.DB) error {
		res := tx.Exec(sql, args...)
		deleted = res.RowsAffected
		return res.Error
	}, s.dialect.resultTx)
	if errors.Is(err, errLockBusy) {
		err = ErrCleanupRunning
	}
	if err != nil && !errors.Is(err, ErrCleanupRunning) {
		err = fmt.Errorf("outbox: deleting old %s messages from %s: %w", state, s.cfg.table, err)
	}
	return deleted, err
}
