package outbox

import (
	"context"

	"github.com/gorm-outbox/outbox/internal/core"
)

// RetentionPolicy says how long finished messages stay in the table:
// Published ones this long after they were published (default 7 days),
// Dead ones this long after they were enqueued (zero, the default, keeps
// them until requeued or purged by hand), deleted BatchSize rows (default
// 1000) a statement. Pending messages are never deleted, whatever their age.
type RetentionPolicy = core.RetentionPolicy

func retentionDefaults(r RetentionPolicy) RetentionPolicy {
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
var ErrCleanupRunning = core.ErrCleanupRunning

// Cleanup deletes the published (and, if the policy says so, dead) messages
// older than the policy allows, in batches, each its own short transaction.
// progress, if not nil, is called after each batch with the total so far.
// It returns how many rows it deleted.
func (s *GormStore) Cleanup(ctx context.Context, policy RetentionPolicy, progress func(deleted int64)) (int64, error) {
	return s.engine.Cleanup(orBackground(ctx), retentionDefaults(policy), progress)
}
