package postgres

import (
	"context"
	"time"

	"github.com/google/uuid"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/internal/core"
	"github.com/gorm-outbox/outbox/internal/sqlstore"
)

func dialectOf(s *sqlstore.Store) *dialect { return s.Dialect().(*dialect) }

// ClaimHeld is the publisher's claim (heldClaim): msgs stay locked until
// finish records their results and commits, or abandon hands them back.
func ClaimHeld(ctx context.Context, s *sqlstore.Store, opts core.ClaimOptions) (msgs []*core.OutboxMessage, finish func(published []uuid.UUID, failures []core.Failure) error, abandon func(), err error) {
	c, err := dialectOf(s).held.Claim(ctx, ctx, opts)
	if err != nil {
		return nil, nil, nil, err
	}
	return c.Messages(), c.Finish, c.Abandon, nil
}

// HeldClaimSetting claims like the publisher, returns what the claim's
// transaction reads of a setting, and commits the claimed messages as
// failed (due again at once).
func HeldClaimSetting(ctx context.Context, s *sqlstore.Store, opts core.ClaimOptions, name string) (claimed int, value string, err error) {
	c, err := dialectOf(s).held.Claim(ctx, ctx, opts)
	if err != nil {
		return 0, "", err
	}
	defer c.Abandon()
	msgs := c.Messages()
	if len(msgs) == 0 {
		return 0, "", nil
	}
	if err := c.Tx().Raw("SELECT current_setting(?)", name).Scan(&value).Error; err != nil {
		return 0, "", err
	}
	var failures []core.Failure
	for _, m := range msgs {
		failures = append(failures, core.Failure{ID: m.ID, Err: "setting read", NextAttemptAt: time.Now()})
	}
	return len(msgs), value, c.Finish(nil, failures)
}

// LockPicked locks msgs as a held claim does after its walk, with refs as
// the addresses the walk read, and returns the ids it would send; the
// locks end with it.
func LockPicked(ctx context.Context, s *sqlstore.Store, msgs []*core.OutboxMessage, refs map[uuid.UUID]string) ([]uuid.UUID, error) {
	tx := s.DB().WithContext(ctx).Begin()
	defer tx.Rollback()
	picked := make([]sqlstore.Picked, len(msgs))
	for i, m := range msgs {
		picked[i] = sqlstore.Picked{OutboxMessage: m, Ref: refs[m.ID]}
	}
	locked, err := dialectOf(s).lockPicked(tx, nil, time.Now().Add(time.Second), picked, time.Minute, false)
	return sqlstore.PickedIDs(locked), err
}

// WalkPicks walks as a held claim does, with inFlight as the rows this
// process has in flight (their keys not marked busy), and returns the ids
// it picks.
func WalkPicks(ctx context.Context, s *sqlstore.Store, inFlight []uuid.UUID) ([]uuid.UUID, error) {
	sqlDB, err := s.SQLDB()
	if err != nil {
		return nil, err
	}
	conn, err := sqlDB.Conn(ctx)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	db := s.DB().Session(&gorm.Session{NewDB: true, Context: ctx})
	db.Statement.ConnPool = conn
	tx := db.Begin()
	defer tx.Rollback()
	now := time.Now().Add(time.Second)
	read := dialectOf(s).pgxWalk(ctx, conn, s.GormWalk(tx, now, false), now)
	picked, err := s.Pick(read, false, now, core.ClaimOptions{Limit: 100, Lease: time.Minute}, inFlight, nil)
	return sqlstore.PickedIDs(picked), err
}

// HeldWalkSQL is the SQL of a held claim's first walk read of limit rows,
// with its arguments, and the setup its transaction runs before it.
func HeldWalkSQL(s *sqlstore.Store, limit int) (sql string, args []any, setup string) {
	sql, args = s.WalkSQL(false, limit)
	return sql, args, walkSetup
}

// ClaimWhole is the exactly-once publisher's claim, with nothing excluded.
func ClaimWhole(ctx context.Context, s *sqlstore.Store, opts core.ClaimOptions) (*sqlstore.HeldClaim, error) {
	return dialectOf(s).held.ClaimWhole(ctx, ctx, opts, nil)
}

// WholeTurnKey is the advisory lock key of the exactly-once claims' turn.
func WholeTurnKey(s *sqlstore.Store) int64 { return s.LockKey(sqlstore.WholeClaimTurn) }
