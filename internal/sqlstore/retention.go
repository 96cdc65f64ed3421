package sqlstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/internal/core"
)

// Cleanup deletes the published (and, if the policy says so, dead)
// messages older than the policy allows, in batches, each its own short
// transaction; the policy has its defaults already. progress, if not nil,
// is called after each batch with the total so far.
func (s *Store) Cleanup(ctx context.Context, policy core.RetentionPolicy, progress func(deleted int64)) (int64, error) {
	ctx = orBackground(ctx)
	now := time.Now().UTC()
	var total int64
	type step struct {
		state  core.State
		cutoff time.Time
		also   string // published rows: published long enough ago, too
	}
	steps := []step{{core.StatePublished, now.Add(-policy.Published), s.Quote("published_at") + " < ?"}}
	if policy.Dead > 0 {
		steps = append(steps, step{core.StateDead, now.Add(-policy.Dead), ""})
	}
	for _, st := range steps {
		for {
			n, err := s.deleteBatch(ctx, st.state, st.cutoff, st.also, policy.BatchSize)
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

func (s *Store) deleteBatch(ctx context.Context, state core.State, cutoff time.Time, also string, limit int) (int64, error) {
	q := s.Quote
	// The state is a literal so that its partial index (MySQL: the state
	// index) serves it whatever the statement cache.
	where := q("state") + " = '" + string(state) + "' AND " + q("created_at") + " < ?"
	args := []any{cutoff}
	if also != "" {
		where += " AND " + also
		args = append(args, cutoff)
	}
	args = append(args, limit)
	query := s.dialect.DeleteOld(s.QuotedTable(), q("id"), where)
	var deleted int64
	err := s.dialect.Serialized(ctx, s.db.WithContext(ctx), CleanupTurn, s.LockKey(CleanupTurn), func(tx *gorm.DB) error {
		res := tx.Exec(query, args...)
		deleted = res.RowsAffected
		return res.Error
	})
	if errors.Is(err, core.ErrLockBusy) {
		err = core.ErrCleanupRunning
	}
	if err != nil && !errors.Is(err, core.ErrCleanupRunning) {
		err = fmt.Errorf("outbox: deleting old %s messages from %s: %w", state, s.cfg.Table, err)
	}
	return deleted, err
}
