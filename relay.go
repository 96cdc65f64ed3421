package outbox

import (
	"context"
	"database/sql"

	"github.com/gorm-outbox/outbox/internal/core"
	"github.com/gorm-outbox/outbox/internal/sqlstore"
)

// What a publisher uses of its store: the Store interface, and the optional
// capabilities below, each found by an interface of its own, never by the
// store's type. The plugin's store (GormStore) has every one; a Store of the
// application's gets what its methods provide:
//
//   - claims, sends, results, retries, dead messages, per-key order and the
//     pause of an outage: always, through Claim, MarkPublished, MarkFailed
//     and Release (leases);
//   - the backlog gauges: with a Stats(ctx, attemptBudget) (Stats, error)
//     method;
//   - retention: with a Cleanup(ctx, RetentionPolicy, func(int64)) (int64,
//     error) method;
//   - the wake-up of enqueuing transactions of this process (Transaction, the
//     hooks), PostgreSQL's LISTEN, the held claim, the server check and the
//     pool watch: the plugin's store only. A store that embeds *GormStore
//     gets all of them but the held claim: it claims through its own Claim
//     and results.

// batchClaimer claims in its own way; a store without it claims by lease.
// outer is the store the publisher was given: a store that embeds the
// plugin's (and so has this method) but has its own Claim and results
// must be claimed through them, by lease.
type batchClaimer interface {
	claimBatch(outer Store, ctx, work context.Context, opts ClaimOptions) (claimedBatch, error)
}

// claimedBatch is a claim's messages and how their results are recorded.
type claimedBatch = sqlstore.Batch

// statser gives the backlog gauges their figures.
type statser interface {
	Stats(ctx context.Context, attemptBudget int) (Stats, error)
}

// cleaner runs the retention cleanup.
type cleaner interface {
	Cleanup(ctx context.Context, policy RetentionPolicy, progress func(deleted int64)) (int64, error)
}

// wakeSource wakes its subscribers when an enqueuing transaction of this
// process commits (or, nudge, is about to).
type wakeSource interface {
	subscribe(w waker) (unsubscribe func())
}

// notifyListener waits for other processes' enqueues; listenOnce calls
// ready once it listens and wake on each notification, and returns when
// ctx ends or the connection fails (errNotListening: it never can).
type notifyListener interface {
	listens() bool
	listenOnce(ctx context.Context, ready, wake func()) error
}

// errNotListening says the store cannot listen for notifications at all.
var errNotListening = core.ErrNotListening

// errUnsupportedServer marks a server the publisher cannot use, which no
// wait mends.
var errUnsupportedServer = core.ErrUnsupportedServer

// serverChecker refuses a database server the publisher cannot use
// (errUnsupportedServer) or says it cannot be reached now.
type serverChecker interface {
	checkServer(ctx context.Context) error
}

// pooled has the connection pool whose churn the publisher watches.
type pooled interface {
	sqlDB() (*sql.DB, error)
}

// instrumented records with the plugin's meter and tracer providers.
type instrumented interface {
	telemetry() *telemetry
}

// claimBatch claims through the store's own claimBatch, or by lease.
func claimBatch(store Store, ctx, work context.Context, opts ClaimOptions) (claimedBatch, error) {
	if c, ok := store.(batchClaimer); ok {
		return c.claimBatch(store, ctx, work, opts)
	}
	return leaseClaim(store, ctx, opts)
}

// leaseClaim claims through store's Claim, and records through its
// MarkPublished, MarkFailed and Release.
func leaseClaim(store Store, ctx context.Context, opts ClaimOptions) (claimedBatch, error) {
	token, msgs, err := store.Claim(ctx, opts)
	if err != nil {
		return nil, err
	}
	return &sqlstore.LeaseBatch{Store: store, Token: token, Msgs: msgs}, nil
}
