package mysql

import (
	"context"

	"github.com/gorm-outbox/outbox/internal/core"
	"github.com/gorm-outbox/outbox/internal/sqlstore"
)

// ClaimHeld is the publisher's claim: its rows stay locked until the
// claim's Finish or Abandon.
func ClaimHeld(ctx context.Context, s *sqlstore.Store, opts core.ClaimOptions) (*sqlstore.HeldClaim, error) {
	return s.Dialect().(*dialect).held.Claim(ctx, ctx, opts)
}

// ClaimWhole is the exactly-once publisher's claim, with nothing excluded.
func ClaimWhole(ctx context.Context, s *sqlstore.Store, opts core.ClaimOptions) (*sqlstore.HeldClaim, error) {
	return s.Dialect().(*dialect).held.ClaimWhole(ctx, ctx, opts, nil)
}

// WholeTurnName is the named lock of the exactly-once claims' turn.
func WholeTurnName(s *sqlstore.Store) string {
	return s.Dialect().(*dialect).lockName(s.DB(), s.LockKey(sqlstore.WholeClaimTurn))
}
