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
