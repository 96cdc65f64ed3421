package outbox

import (
	"context"
	"database/sql/driver"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
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

// notifier sends the debounced NOTIFY of one table's enqueues.
type notifier struct {
	// returning, appended to a one-row INSERT, sends the NOTIFY in the
	// same statement: a statement of its own would cost the transaction a
	// round trip. A multi-row INSERT would return a row for each message,
	// so a batch runs statement after its INSERTs instead.
	returning, statement string
	interval             time.Duration
	last                 atomic.Int64 // unix nanoseconds of the last NOTIFY sent
}

// channelSQL is the SQL expression of a table's NOTIFY channel, computed by
// the server so that every process agrees: a hash of the schema-qualified
// table, so that the outboxes of two schemas do not wake each other's
// publishers and the name stays within PostgreSQL's 63 bytes. The table
// name is a validated identifier, safe in a literal.
func channelSQL(table string) string {
	if strings.Contains(table, ".") {
		return "'outbox_' || left(md5('" + table + "'), 16)"
	}
	return "'outbox_' || left(md5(current_schema() || '." + table + "'), 16)"
}

func newNotifier(d dialect, table string, interval time.Duration) *notifier {
	if !d.listens || interval <= 0 {
		return nil
	}
	call := "pg_notify(" + channelSQL(table) + ", '')"
	return &notifier{returning: " RETURNING " + call, statement: d.waitPrefix + "SELECT " + call, interval: interval}
}

// due reports whether the enqueue about to be written sends a NOTIFY: not
// if one was sent less than the interval ago. PostgreSQL delivers it when
// the enqueuing transaction commits, and not at all if it rolls back.
func (n *notifier) due() bool {
	if n == nil {
		return false
	}
	now := time.Now().UnixNano()
	last := n.last.Load()
	return now-last >= int64(n.interval) && n.last.CompareAndSwap(last, now)
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

// pgxConn is what pgx's database/sql driver connection offers; naming it
// here keeps the pgx driver package (and its init) out of this package.
type pgxConn interface{ Conn() *pgx.Conn }

// listens reports whether the database has notifications to LISTEN for.
func (s *GormStore) listens() bool { return s.dialect.listens }

// listenOnce holds one connection of the store's pool LISTENing on the
// table's channel, calls ready once it listens and wake on each
// notification, until ctx ends or the connection fails.
func (s *GormStore) listenOnce(ctx context.Context, ready, wake func()) error {
	sqlDB, err := s.db.DB()
	if err != nil {
		return err
	}
	conn, err := sqlDB.Conn(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	return conn.Raw(func(dc any) error {
		pc, ok := dc.(pgxConn)
		if !ok {
			return fmt.Errorf("%w, got %T", errNotListening, dc)
		}
		c := pc.Conn()
		var channel string
		if err := c.QueryRow(ctx, "SELECT "+channelSQL(s.cfg.table)).Scan(&channel); err != nil {
			return errors.Join(err, driver.ErrBadConn)
		}
		if _, err := c.Exec(ctx, "LISTEN "+pgx.Identifier{channel}.Sanitize()); err != nil {
			return errors.Join(err, driver.ErrBadConn)
		}
		ready()
		for {
			if _, err := c.WaitForNotification(ctx); err != nil {
				// The connection still LISTENs, or is broken: never hand it
				// back to the pool.
				return errors.Join(err, driver.ErrBadConn)
			}
			wake()
		}
	})
}
