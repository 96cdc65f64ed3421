// Package pgxpipeline is a database/sql driver for PostgreSQL: pgx's own
// (the one GORM uses), except that in a transaction the outbox's INSERT is
// not sent on its own but with the next statement, which is usually the
// COMMIT, in one round trip. With pgx's driver an event costs its
// transaction a round trip; through this one it costs a few statements'
// parsing. Importing the package registers the driver as DriverName; open
// GORM with it:
//
//	db, err := gorm.Open(postgres.New(postgres.Config{DriverName: pgxpipeline.DriverName, DSN: dsn}))
//
// Nothing else changes: the INSERT still runs in the transaction, before
// its COMMIT, so the two commit or roll back together. What differs is
// when an error in the INSERT is seen: at the next statement (most often
// the commit, which then fails and rolls the transaction back) instead of
// at Enqueue, which has already validated the message. Any statement of the
// transaction after an enqueue, a savepoint's included, first sends the
// INSERT, so the transaction reads its own events as with any driver.
//
// Every feature of the outbox that needs pgx (the publisher's LISTEN, its
// held claim's pgx path) works through it: its connections give their
// *pgx.Conn like pgx's own.
package pgxpipeline

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/gorm-outbox/outbox/internal/pgmark"
)

// DriverName is the name under which the package registers its driver
// with database/sql.
const DriverName = "outbox-pgx"

func init() { sql.Register(DriverName, pipelinedDriver{}) }

const withCommit = pgmark.WaitMark

type pipelinedDriver struct{}

func (pipelinedDriver) Open(dsn string) (driver.Conn, error) {
	c, err := stdlib.GetDefaultDriver().Open(dsn)
	if err != nil {
		return nil, err
	}
	sc, ok := c.(*stdlib.Conn)
	if !ok {
		c.Close()
		return nil, errors.New("pgxpipeline: pgx's database/sql driver returned an unexpected connection")
	}
	return &pipelinedConn{stdConn: sc}, nil
}

// stdConn names the embedded connection: embedded as *stdlib.Conn, the
// field would be called Conn and hide the promoted Conn() method, by which
// the outbox finds the *pgx.Conn of a connection.
type stdConn = stdlib.Conn

// pipelinedConn is pgx's database/sql connection that holds the outbox's
// statements of an open transaction until the next statement.
type pipelinedConn struct {
	*stdConn
	tx      *pipelinedTx // the open transaction, if any
	waiting []waitingStatement
}

type waitingStatement struct {
	query string
	args  []any
}

func (c *pipelinedConn) BeginTx(ctx context.Context, opts driver.TxOptions) (driver.Tx, error) {
	tx, err := c.stdConn.BeginTx(ctx, opts)
	if err != nil {
		return nil, err
	}
	c.tx, c.waiting = &pipelinedTx{conn: c, ctx: ctx, Tx: tx}, nil
	return c.tx, nil
}

func (c *pipelinedConn) Begin() (driver.Tx, error) {
	return c.BeginTx(context.Background(), driver.TxOptions{})
}

func (c *pipelinedConn) ExecContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Result, error) {
	if c.tx != nil && strings.HasPrefix(query, withCommit) {
		values := make([]any, len(args))
		for i, a := range args {
			values[i] = a.Value
		}
		c.waiting = append(c.waiting, waitingStatement{query, values})
		return driver.RowsAffected(0), nil
	}
	if err := c.send(ctx); err != nil {
		return nil, err
	}
	return c.stdConn.ExecContext(ctx, query, args)
}

func (c *pipelinedConn) QueryContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Rows, error) {
	if err := c.send(ctx); err != nil {
		return nil, err
	}
	return c.stdConn.QueryContext(ctx, query, args)
}

func (c *pipelinedConn) PrepareContext(ctx context.Context, query string) (driver.Stmt, error) {
	if err := c.send(ctx); err != nil {
		return nil, err
	}
	st, err := c.stdConn.PrepareContext(ctx, query)
	if err != nil {
		return nil, err
	}
	ps, ok := st.(*stdlib.Stmt)
	if !ok {
		st.Close()
		return nil, errors.New("pgxpipeline: pgx's database/sql driver returned an unexpected statement")
	}
	return &pipelinedStmt{Stmt: ps, conn: c}, nil
}

// pipelinedStmt is a prepared statement of a pipelinedConn: database/sql
// runs one again later (GORM's PrepareStmt does, a savepoint's among
// them), and it too must come after the waiting statements.
type pipelinedStmt struct {
	*stdlib.Stmt
	conn *pipelinedConn
}

func (s *pipelinedStmt) ExecContext(ctx context.Context, args []driver.NamedValue) (driver.Result, error) {
	if err := s.conn.send(ctx); err != nil {
		return nil, err
	}
	return s.Stmt.ExecContext(ctx, args)
}

func (s *pipelinedStmt) QueryContext(ctx context.Context, args []driver.NamedValue) (driver.Rows, error) {
	if err := s.conn.send(ctx); err != nil {
		return nil, err
	}
	return s.Stmt.QueryContext(ctx, args)
}

func (c *pipelinedConn) Prepare(query string) (driver.Stmt, error) {
	return c.PrepareContext(context.Background(), query)
}

// send sends the waiting statements, followed by last if it is not empty,
// in one round trip, and returns the first error.
func (c *pipelinedConn) send(ctx context.Context, last ...string) error {
	if len(c.waiting) == 0 && len(last) == 0 {
		return nil
	}
	b := &pgx.Batch{}
	for _, w := range c.waiting {
		b.Queue(w.query, w.args...)
	}
	for _, q := range last {
		b.Queue(q)
	}
	c.waiting = nil
	results := c.Conn().SendBatch(ctx, b)
	var first error
	for i := range b.Len() {
		tag, err := results.Exec()
		if err != nil {
			first = err
			break
		}
		if i == b.Len()-1 && len(last) > 0 && tag.String() == "ROLLBACK" { // a COMMIT of an aborted transaction
			first = pgx.ErrTxCommitRollback
		}
	}
	return errors.Join(first, results.Close())
}

// pipelinedTx commits with the waiting statements in the same round trip.
type pipelinedTx struct {
	driver.Tx
	conn *pipelinedConn
	ctx  context.Context
}

func (t *pipelinedTx) Commit() error {
	c := t.conn
	defer func() { c.tx = nil }()
	if len(c.waiting) == 0 {
		return t.Tx.Commit()
	}
	err := c.send(t.ctx, "COMMIT")
	if err == nil {
		return nil
	}
	// A waiting statement failed: PostgreSQL skipped the COMMIT and the
	// transaction is aborted; end it, so the connection can be used again.
	if pc := c.Conn(); !pc.IsClosed() && pc.PgConn().TxStatus() != 'I' {
		if _, rbErr := pc.Exec(context.Background(), "ROLLBACK"); rbErr != nil {
			err = errors.Join(err, rbErr, driver.ErrBadConn)
		}
	}
	return err
}

func (t *pipelinedTx) Rollback() error {
	t.conn.tx, t.conn.waiting = nil, nil
	return t.Tx.Rollback()
}
