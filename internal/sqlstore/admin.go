package sqlstore

import (
	"context"
	"fmt"
	"time"

	"github.com/google/uuid"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/internal/core"
)

// List returns messages, oldest first unless opts.NewestFirst.
func (s *Store) List(ctx context.Context, opts core.ListOptions) ([]core.OutboxMessage, error) {
	ctx = orBackground(ctx)
	q := s.db.WithContext(ctx).Table(s.cfg.Table)
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
	var out []core.OutboxMessage
	if err := q.Order(order).Limit(opts.Limit).Offset(opts.Offset).Find(&out).Error; err != nil {
		return nil, fmt.Errorf("outbox: listing %s: %w", s.cfg.Table, err)
	}
	return out, nil
}

// Get returns one message, or core.ErrNotFound.
func (s *Store) Get(ctx context.Context, id uuid.UUID) (*core.OutboxMessage, error) {
	ctx = orBackground(ctx)
	var out []core.OutboxMessage
	if err := s.db.WithContext(ctx).Table(s.cfg.Table).Where("id = ?", id).Limit(1).Find(&out).Error; err != nil {
		return nil, fmt.Errorf("outbox: reading message %s from %s: %w", id, s.cfg.Table, err)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%w with id %s in %s", core.ErrNotFound, id, s.cfg.Table)
	}
	return &out[0], nil
}

// CountOlder counts the messages in state that Cleanup would delete with a
// retention of age: created, and for published ones published, before it.
func (s *Store) CountOlder(ctx context.Context, state core.State, age time.Duration) (int64, error) {
	ctx = orBackground(ctx)
	cutoff := time.Now().UTC().Add(-age)
	q := s.db.WithContext(ctx).Table(s.cfg.Table).Where("state = ? AND created_at < ?", state, cutoff)
	if state == core.StatePublished {
		q = q.Where("published_at < ?", cutoff)
	}
	var n int64
	if err := q.Count(&n).Error; err != nil {
		return 0, fmt.Errorf("outbox: counting %s: %w", s.cfg.Table, err)
	}
	return n, nil
}

// Requeue makes the dead messages among ids pending again (see outbox.GormStore.Requeue).
func (s *Store) Requeue(ctx context.Context, ids ...uuid.UUID) (int64, error) {
	ctx = orBackground(ctx)
	if len(ids) == 0 {
		return 0, nil
	}
	return s.requeue(s.db.WithContext(ctx).Table(s.cfg.Table).Where("id IN ?", ids))
}

// RequeueDead requeues every dead message, or those of one topic if topic is not empty.
func (s *Store) RequeueDead(ctx context.Context, topic string) (int64, error) {
	ctx = orBackground(ctx)
	q := s.db.WithContext(ctx).Table(s.cfg.Table)
	if topic != "" {
		q = q.Where("topic = ?", topic)
	}
	return s.requeue(q)
}

func (s *Store) requeue(q *gorm.DB) (int64, error) {
	res := q.Where("state = ?", core.StateDead).Updates(map[string]any{
		"state": core.StatePending, "attempts": 0, "next_attempt_at": time.Now().UTC(), "claim_token": nil,
	})
	if res.Error != nil {
		return 0, fmt.Errorf("outbox: requeueing dead messages in %s: %w", s.cfg.Table, res.Error)
	}
	return res.RowsAffected, nil
}

// Stats reads the table's state; attemptBudget is the MaxAttempts to count
// OverBudget against.
func (s *Store) Stats(ctx context.Context, attemptBudget int) (core.Stats, error) {
	ctx = orBackground(ctx)
	st := core.Stats{}
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
	q, pending := s.Quote, "'"+string(core.StatePending)+"'"
	// The oldest by id is the oldest by creation (UUIDv7), found on the
	// pending index; a real column keeps its type on every driver.
	var oldest []time.Time
	err = s.db.WithContext(ctx).Table(s.QuotedTable()+s.dialect.PendingHint()).Where(q("state")+" = "+pending).
		Order(q("id")).Limit(1).Pluck("created_at", &oldest).Error
	if err != nil {
		return st, fmt.Errorf("outbox: reading stats of %s: %w", s.cfg.Table, err)
	}
	if len(oldest) == 1 {
		st.OldestPendingAge = max(now.Sub(oldest[0]), 0)
	}
	err = s.db.WithContext(ctx).Table(s.cfg.Table).
		Select("COALESCE(SUM(CASE WHEN "+q("attempts")+" > 0 THEN 1 ELSE 0 END), 0) AS retrying, "+
			"COALESCE(SUM(CASE WHEN "+q("claim_token")+" IS NOT NULL AND "+q("next_attempt_at")+" < ? THEN 1 ELSE 0 END), 0) AS expired_claims", now).
		Where(q("state") + " = " + pending).Scan(&agg).Error
	if err != nil {
		return st, fmt.Errorf("outbox: reading stats of %s: %w", s.cfg.Table, err)
	}
	st.Retrying, st.ExpiredClaims = agg.Retrying, agg.ExpiredClaims
	err = s.db.WithContext(ctx).Table(s.cfg.Table).Where("state <> ? AND attempts >= ?", core.StatePublished, attemptBudget).Count(&st.OverBudget).Error
	if err != nil {
		return st, fmt.Errorf("outbox: reading stats of %s: %w", s.cfg.Table, err)
	}
	return st, nil
}

// Count returns how many messages are in each state.
func (s *Store) Count(ctx context.Context) (map[core.State]int64, error) {
	ctx = orBackground(ctx)
	var rows []struct {
		State core.State
		N     int64
	}
	err := s.db.WithContext(ctx).Table(s.cfg.Table).Select("state, count(*) AS n").Group("state").Scan(&rows).Error
	if err != nil {
		return nil, fmt.Errorf("outbox: counting %s: %w", s.cfg.Table, err)
	}
	out := map[core.State]int64{}
	for _, r := range rows {
		out[r.State] = r.N
	}
	return out, nil
}
