package outbox

import (
	"context"
	"errors"
	"time"
)

// WithNotifyInterval sets how often, at most, this process's enqueuing
// transactions on PostgreSQL send a NOTIFY that wakes the publishers
// LISTENing in every process (defaults to DefaultNotifyInterval). PostgreSQL
// serializes the commits of notifying transactions, so a NOTIFY in every
// transaction would cost concurrent writers about a third of their
// throughput; one per interval costs almost nothing, and a publisher woken
// by one keeps looking for a moment for what the next transactions commit
// (see Publisher). Zero turns the NOTIFY off: publishers then learn of work
// from this process's in-process wake-up and from polling.
func WithNotifyInterval(d time.Duration) PluginOption {
	return func(c *config) { c.notifyInterval = d }
}

// listen keeps store LISTENing and wakes p on each notification, until
// ctx ends. When the connection breaks it listens again after a pause;
// polling covers the gap, and p is woken after each (re)start in case a
// notification was missed.
func (p *Publisher) listen(ctx context.Context, store notifyListener) {
	var pause time.Duration
	for ctx.Err() == nil {
		err := store.listenOnce(ctx, p.Wake, p.Wake)
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, errNotListening) {
			// Said once: enqueues in other processes now reach this
			// publisher only at its next poll.
			p.cfg.logger.Warn("outbox: cannot LISTEN for the enqueuers' notifications; publishing from other processes' enqueues waits for the poll interval (use pgx's driver or package pgxpipeline, or WithoutListen to silence this)",
				"reason", err, "poll_interval", p.cfg.pollInterval)
			return
		}
		pause = min(max(2*pause, p.cfg.pollInterval), p.cfg.maxPause)
		p.cfg.logger.Warn("outbox: listening for notifications failed; polling meanwhile", "error", err, "retry_in", pause)
		timer := time.NewTimer(pause)
		select {
		case <-ctx.Done():
		case <-timer.C:
		}
		timer.Stop()
	}
}
