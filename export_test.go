package outbox

import (
	"context"
	"time"

	"gorm.io/gorm"

	"github.com/google/uuid"
	"github.com/gorm-outbox/outbox/internal/pgmark"
	"github.com/gorm-outbox/outbox/internal/sqlstore"
)

// HoldCleanupLock takes the cleanup turn of s's table as another process
// would (its own store, its own connection), until release is called.
func HoldCleanupLock(s *GormStore) (release func(), err error) {
	other, err := newStore(s.engine.DB(), s.cfg)
	if err != nil {
		return nil, err
	}
	e := other.engine
	held, done, ended := make(chan error, 1), make(chan struct{}), make(chan struct{})
	go func() {
		defer close(ended)
		err := e.Dialect().Serialized(context.Background(), e.DB(), sqlstore.CleanupTurn, e.LockKey(sqlstore.CleanupTurn),
			func(*gorm.DB) error {
				held <- nil
				<-done
				return nil
			})
		if err != nil {
			held <- err
		}
	}()
	if err := <-held; err != nil {
		return nil, err
	}
	return func() { close(done); <-ended }, nil
}

// CountKeysNotIn counts the rows of s's table whose key is not among keys,
// with the claim walk's own exclusion (Dialect.NotInKeys).
func CountKeysNotIn(s *GormStore, keys ...string) (int64, error) {
	set := map[string]bool{}
	for _, k := range keys {
		set[k] = true
	}
	e := s.engine
	notIn, arg := e.Dialect().NotInKeys(e.Quote("message_key"), set)
	var n int64
	err := e.DB().Raw("SELECT count(*) FROM "+e.QuotedTable()+" WHERE "+notIn, arg).Scan(&n).Error
	return n, err
}

// WalkSQL is the SQL of a lease claim's first walk read, with its
// arguments for a claim now of at most limit rows.
func WalkSQL(s *GormStore, limit int) (string, []any) { return s.engine.WalkSQL(true, limit) }

// SetPoolCheckInterval shortens how often publishers look at their pool's
// churn, until restore is called.
func SetPoolCheckInterval(d time.Duration) (restore func()) {
	old := poolCheckInterval
	poolCheckInterval = d
	return func() { poolCheckInterval = old }
}

// WaitMark starts a statement that pgxpipeline holds until the next one.
const WaitMark = pgmark.WaitMark

// ClaimBatch claims as s's publishers do (held across the send where the
// database holds its claims); record writes the results and ends the
// claim, end gives back what was not recorded.
func ClaimBatch(ctx context.Context, s *GormStore, opts ClaimOptions) (msgs []*OutboxMessage, record func(published []uuid.UUID, failures []Failure) error, end func(), err error) {
	b, err := s.claimBatch(s, ctx, ctx, opts)
	if err != nil {
		return nil, nil, nil, err
	}
	record = func(published []uuid.UUID, failures []Failure) error {
		return b.Record(ctx, published, failures, nil)
	}
	return b.Messages(), record, b.End, nil
}

// FailCommittedClaims makes p's exactly-once claims, once committed, return
// fail()'s error when it is not nil, as a claim whose commit's reply was
// lost with its connection. Set it before p starts.
func FailCommittedClaims(p *Publisher, fail func() error) { p.txn.claimFault = fail }

// PauseBeforeNaming makes p's held exactly-once claims call pause between
// locking their rows and naming them in their slot, as a publisher frozen
// at that instant. Set it before p starts.
func PauseBeforeNaming(p *Publisher, pause func()) { p.txn.beforeNaming = pause }

// HoldsClaims says whether p's exactly-once claims are held.
func HoldsClaims(p *Publisher) bool { return p.txn.store.engine.WholeClaimer() != nil }
