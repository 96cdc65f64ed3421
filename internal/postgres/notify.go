package postgres

import (
	"context"
	"database/sql/driver"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/gorm-outbox/outbox/internal/core"
	"github.com/gorm-outbox/outbox/internal/pgmark"
)

// notifier sends the debounced NOTIFY of one table's enqueues. PostgreSQL
// serializes the commits of notifying transactions, so a NOTIFY in every
// transaction would cost concurrent writers much of their throughput; one
// per interval costs almost nothing.
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

func newNotifier(table string, interval time.Duration) *notifier {
	call := "pg_notify(" + channelSQL(table) + ", '')"
	return &notifier{returning: " RETURNING " + call, statement: pgmark.WaitMark + "SELECT " + call, interval: interval}
}

// Due reports whether the enqueue about to be written sends a NOTIFY: not
// if one was sent less than the interval ago. PostgreSQL delivers it when
// the enqueuing transaction commits, and not at all if it rolls back.
func (n *notifier) Due() bool {
	now := time.Now().UnixNano()
	last := n.last.Load()
	return now-last >= int64(n.interval) && n.last.CompareAndSwap(last, now)
}

func (n *notifier) Returning() string { return n.returning }
func (n *notifier) Statement() string { return n.statement }

// pgxConn is what pgx's database/sql driver connection offers; naming it
// here keeps the pgx driver package (and its init) out of this package.
type pgxConn interface{ Conn() *pgx.Conn }

// Listen holds one connection of the store's pool LISTENing on the table's
// channel, calls ready once it listens and wake on each notification,
// until ctx ends or the connection fails.
func (d *dialect) Listen(ctx context.Context, ready, wake func()) error {
	sqlDB, err := d.store.SQLDB()
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
			return fmt.Errorf("%w, got %T", core.ErrNotListening, dc)
		}
		c := pc.Conn()
		var channel string
		if err := c.QueryRow(ctx, "SELECT "+channelSQL(d.table)).Scan(&channel); err != nil {
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
