package sqlstore

import (
	"context"
	"fmt"
	"time"

	"github.com/google/uuid"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/internal/core"
)

// MarkPublished records a successful send of messages still held by
// token: they become published, or are deleted (Config.DeletePublished).
func (s *Store) MarkPublished(ctx context.Context, token string, ids []uuid.UUID) error {
	ctx = orBackground(ctx)
	if len(ids) == 0 {
		return nil
	}
	return s.dialect.Recording(ctx, s.db.WithContext(ctx), false, func(db *gorm.DB) error {
		in, arg := s.dialect.InIDs(s.Quote("id"), ids)
		return s.MarkPublishedWhere(db, len(ids), in+" AND "+s.Quote("claim_token")+" = ?", arg, token)
	})
}

// DeletesPublished says whether published rows are deleted rather than kept.
func (s *Store) DeletesPublished() bool { return s.cfg.DeletePublished }

// MarkPublishedWhere writes the result of the n published rows that where
// matches, on db.
func (s *Store) MarkPublishedWhere(db *gorm.DB, n int, where string, args ...any) error {
	var err error
	if s.cfg.DeletePublished {
		err = db.Exec("DELETE FROM "+s.QuotedTable()+" WHERE "+where, args...).Error
	} else {
		err = db.Table(s.cfg.Table).Where(where, args...).
			Updates(map[string]any{"state": core.StatePublished, "published_at": time.Now().UTC(), "claim_token": nil}).Error
	}
	if err != nil {
		return fmt.Errorf("outbox: marking %d messages published in %s: %w", n, s.cfg.Table, err)
	}
	return nil
}

// MarkFailed records failed sends of messages still held by token.
// Failures are rare, so each is its own UPDATE, all in one transaction.
func (s *Store) MarkFailed(ctx context.Context, token string, failures []core.Failure) error {
	ctx = orBackground(ctx)
	if len(failures) == 0 {
		return nil
	}
	return s.dialect.Recording(ctx, s.db.WithContext(ctx), true, func(tx *gorm.DB) error {
		return s.MarkFailedOn(tx, &token, failures)
	})
}

// MarkFailedOn writes failures on tx; token, if not nil, is the claim
// that must still hold each row.
func (s *Store) MarkFailedOn(tx *gorm.DB, token *string, failures []core.Failure) error {
	held, args := "", []any(nil)
	if token != nil {
		held, args = " AND "+s.Quote("claim_token")+" = ?", []any{*token}
	}
	for _, f := range failures {
		state := core.StatePending
		if f.Dead {
			state = core.StateDead
		}
		err := tx.Table(s.cfg.Table).Where(s.Quote("id")+" = ?"+held, append([]any{f.ID}, args...)...).
			Updates(map[string]any{
				"state":           state,
				"attempts":        gorm.Expr(s.Quote("attempts") + " + 1"),
				"last_error":      f.Err,
				"next_attempt_at": f.NextAttemptAt.UTC(),
				"claim_token":     nil,
			}).Error
		if err != nil {
			return fmt.Errorf("outbox: recording %d failed sends in %s: %w", len(failures), s.cfg.Table, err)
		}
	}
	return nil
}

// Release hands messages held by token back, due now, with no attempt counted.
func (s *Store) Release(ctx context.Context, token string, ids []uuid.UUID) error {
	ctx = orBackground(ctx)
	if len(ids) == 0 {
		return nil
	}
	err := s.dialect.Recording(ctx, s.db.WithContext(ctx), false, func(db *gorm.DB) error {
		in, arg := s.dialect.InIDs(s.Quote("id"), ids)
		return db.Table(s.cfg.Table).Where(in+" AND "+s.Quote("claim_token")+" = ?", arg, token).
			Updates(map[string]any{"next_attempt_at": time.Now().UTC(), "claim_token": nil}).Error
	})
	if err != nil {
		return fmt.Errorf("outbox: releasing %d claimed messages in %s: %w", len(ids), s.cfg.Table, err)
	}
	return nil
}

// SettleIDs is ResolveToken for a claim whose messages the caller holds:
// found by primary key, not by a scan for the token.
func (s *Store) SettleIDs(tx *gorm.DB, token string, ids []uuid.UUID, published bool) error {
	if len(ids) == 0 {
		return nil
	}
	in, arg := s.dialect.InIDs(s.Quote("id"), ids)
	held := in + " AND " + s.Quote("claim_token") + " = ?"
	if published {
		return s.MarkPublishedWhere(tx, len(ids), held, arg, token)
	}
	err := tx.Table(s.cfg.Table).Where(held, arg, token).
		Updates(map[string]any{"next_attempt_at": time.Now().UTC(), "claim_token": nil}).Error
	if err != nil {
		return fmt.Errorf("outbox: releasing %d claimed messages in %s: %w", len(ids), s.cfg.Table, err)
	}
	return nil
}

// ResolveToken settles every message still held by token, whichever
// process claimed them: published (or deleted) if the broker has them,
// else handed back due now with no attempt counted. It is how a claim
// whose publisher is gone is settled once the broker has told which.
func (s *Store) ResolveToken(tx *gorm.DB, token string, published bool) error {
	// Every row a claim holds is pending: the state, a literal, lets the
	// pending index serve the search instead of a scan of the table.
	held := s.Quote("state") + " = 'pending' AND " + s.Quote("claim_token") + " = ?"
	if published {
		return s.MarkPublishedWhere(tx, 0, held, token)
	}
	err := tx.Table(s.cfg.Table).Where(held, token).
		Updates(map[string]any{"next_attempt_at": time.Now().UTC(), "claim_token": nil}).Error
	if err != nil {
		return fmt.Errorf("outbox: releasing the messages of claim %s in %s: %w", token, s.cfg.Table, err)
	}
	return nil
}

// PublishPending records as published the rows among ids still pending:
// the rows of an exactly-once held claim whose broker transaction
// committed while its own transaction did not.
func (s *Store) PublishPending(tx *gorm.DB, ids []uuid.UUID) error {
	if len(ids) == 0 {
		return nil
	}
	in, arg := s.dialect.InIDs(s.Quote("id"), ids)
	return s.MarkPublishedWhere(tx, len(ids), in+" AND "+s.Quote("state")+" = 'pending'", arg)
}
