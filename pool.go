package outbox

import (
	"context"
	"time"
)

// poolCheckInterval is how often a publisher looks at its pool's churn.
var poolCheckInterval = time.Minute

// watchPool warns, once, when the publisher's connection pool closes
// connections for lack of idle room (database/sql keeps 2 idle by default)
// and so opens them again for the next caller: each worker takes a
// connection for every claim, and opening one costs the claim a round trip
// or several, which shows in the commit-to-Kafka latency.
func (p *Publisher) watchPool(ctx context.Context, store pooled) {
	sqlDB, err := store.sqlDB()
	if err != nil {
		return // not a *sql.DB: nothing to read
	}
	ticker := time.NewTicker(poolCheckInterval)
	defer ticker.Stop()
	last := sqlDB.Stats().MaxIdleClosed
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
		closed := sqlDB.Stats().MaxIdleClosed
		if closed-last > int64(p.cfg.workers) {
			p.cfg.logger.Warn("outbox: the connection pool keeps closing connections for lack of idle room and opening "+
				"them again, which slows every claim; raise it with sqlDB.SetMaxIdleConns (database/sql's default is 2)",
				"closed", closed-last, "in", poolCheckInterval, "at_least", p.cfg.workers+2)
			return
		}
		last = closed
	}
}
