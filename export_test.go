package outbox

import (
	"context"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/internal/pgmark"
)

// CleanupLockKey exposes the cleanup's advisory lock to the tests, which
// hold it as another process would.
func CleanupLockKey(s *GormStore) int64 { return s.lockKey() + 1 }

// CheckSkipLocked exposes the server version check to the tests.
var CheckSkipLocked = checkSkipLocked

// HoldCleanupLock takes the cleanup lock of s's table as another process
// would, until release is called. ok is false where the database has no
// such lock (SQLite: one process writes).
func HoldCleanupLock(s *GormStore) (release func(), ok bool, err error) {
	key := s.lockKey() + 1
	switch s.dialect.name {
	case "postgres":
		tx := s.db.Begin()
		if err := tx.Exec("SELECT pg_advisory_xact_lock(?)", key).Error; err != nil {
			return nil, true, err
		}
		return func() { tx.Rollback() }, true, nil
	case "mysql":
		sqlDB, err := s.db.DB()
		if err != nil {
			return nil, true, err
		}
		conn, err := sqlDB.Conn(context.Background())
		if err != nil {
			return nil, true, err
		}
		if _, err := conn.ExecContext(context.Background(), "SELECT GET_LOCK(?, 0)", s.lockName(key)); err != nil {
			return nil, true, err
		}
		return func() { conn.Close() }, true, nil // a named lock ends with its connection
	}
	return nil, false, nil
}

// CountKeysNotIn counts the rows of s's table whose key is not among keys,
// with the claim walk's own exclusion (dialect.notInKeys, keysArg).
func CountKeysNotIn(s *GormStore, keys ...string) (int64, error) {
	set := map[string]bool{}
	for _, k := range keys {
		set[k] = true
	}
	var n int64
	err := s.db.Raw("SELECT count(*) FROM "+s.table()+" WHERE "+s.quote("message_key")+" "+s.dialect.notInKeys, s.keysArg(set)).Scan(&n).Error
	return n, err
}

// WalkSQL is the SQL of a walk's first read, with its arguments for a claim
// now of at most limit rows.
func WalkSQL(s *GormStore, limit int) (string, []any) {
	now := time.Now().UTC()
	args := make([]any, 0, len(walkIfDue)+1)
	for range walkIfDue {
		args = append(args, now)
	}
	return s.walk + " ORDER BY " + s.quote("id") + " LIMIT ?", append(args, limit)
}

// ClaimHeld is the publisher's claim on PostgreSQL (heldClaim): msgs stay
// locked until finish records their results and commits, or abandon hands
// them back.
func ClaimHeld(ctx context.Context, s *GormStore, opts ClaimOptions) (msgs []*OutboxMessage, finish func(published []uuid.UUID, failures []Failure) error, abandon func(), err error) {
	c, err := s.claimHeld(ctx, ctx, opts)
	if err != nil {
		return nil, nil, nil, err
	}
	return c.msgs, c.finish, c.abandon, nil
}

// HeldClaimSetting claims like the publisher on PostgreSQL, returns what
// the claim's transaction reads of a setting, and commits the claimed
// messages as failed (due again at once).
func HeldClaimSetting(ctx context.Context, s *GormStore, opts ClaimOptions, name string) (claimed int, value string, err error) {
	c, err := s.claimHeld(ctx, ctx, opts)
	if err != nil {
		return 0, "", err
	}
	defer c.abandon()
	if len(c.msgs) == 0 {
		return 0, "", nil
	}
	if err := c.tx.Raw("SELECT current_setting(?)", name).Scan(&value).Error; err != nil {
		return 0, "", err
	}
	var failures []Failure
	for _, m := range c.msgs {
		failures = append(failures, Failure{ID: m.ID, Err: "setting read", NextAttemptAt: time.Now()})
	}
	return len(c.msgs), value, c.finish(nil, failures)
}

// SetPoolCheckInterval shortens how often publishers look at their pool's
// churn, until restore is called.
func SetPoolCheckInterval(d time.Duration) (restore func()) {
	old := poolCheckInterval
	poolCheckInterval = d
	return func() { poolCheckInterval = old }
}

// WaitMark starts a statement that pgxpipeline holds until the next one.
const WaitMark = pgmark.WaitMark

// LockPicked locks msgs as a held claim does after its walk, with refs as
// the addresses the walk read, and returns the ids it would send; the
// locks end with it.
func LockPicked(ctx context.Context, s *GormStore, msgs []*OutboxMessage, refs map[uuid.UUID]string) ([]uuid.UUID, error) {
	tx := s.db.WithContext(ctx).Begin()
	defer tx.Rollback()
	for _, m := range msgs {
		m.ref = refs[m.ID]
	}
	locked, err := s.lockPicked(tx, nil, time.Now().Add(time.Second), msgs, time.Minute, false)
	return ids(locked), err
}

// WalkPicks walks as a held claim does, with inFlight as the rows this
// process has in flight (their keys not marked busy), and returns the ids
// it picks.
func WalkPicks(ctx context.Context, s *GormStore, inFlight []uuid.UUID) ([]uuid.UUID, error) {
	sqlDB, err := s.db.DB()
	if err != nil {
		return nil, err
	}
	conn, err := sqlDB.Conn(ctx)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	db := s.db.Session(&gorm.Session{NewDB: true, Context: ctx})
	db.Statement.ConnPool = conn
	tx := db.Begin()
	defer tx.Rollback()
	now := time.Now().Add(time.Second)
	read := s.pgxWalk(ctx, conn, s.gormWalk(tx, now, false), now)
	picked, err := s.pick(read, false, now, ClaimOptions{Limit: 100, Lease: time.Minute}, inFlight, nil)
	return ids(picked), err
}

// HeldWalkSQL is the SQL of a held claim's first walk read of limit rows,
// with its arguments, and the setup its transaction runs before it.
func HeldWalkSQL(s *GormStore, limit int) (sql string, args []any, setup string) {
	return s.walkKeys + " ORDER BY " + s.quote("id") + " LIMIT ?", []any{limit}, s.dialect.walkSetup
}

// TakesPgxPath reports whether the store's reads through pgx itself (the
// held claim's walk and lock) reach pgx on db's connections, or fall back
// to GORM.
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
