package postgres

import (
	"context"
	"database/sql"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/internal/core"
	"github.com/gorm-outbox/outbox/internal/sqlstore"
)

// ClaimBatch is the publisher's claim on PostgreSQL: held across the send
// (sqlstore.HeldClaims). A publisher that stops answering frees its rows
// after the lease, when PostgreSQL ends its idle transaction
// (idle_in_transaction_session_timeout, set by lockPicked).
func (d *dialect) ClaimBatch(ctx, work context.Context, opts core.ClaimOptions) (sqlstore.Batch, error) {
	c, err := d.held.Claim(ctx, work, opts)
	if err != nil {
		return nil, err
	}
	return c, nil
}

func (d *dialect) HeldTxOptions() *sql.TxOptions { return nil }

// HeldWalk reads through pgx itself where it can (pgxWalk), after the
// walk's setup (plannedWalk).
func (d *dialect) HeldWalk(ctx context.Context, tx *gorm.DB, conn *sql.Conn, now time.Time) sqlstore.WalkReader {
	read := d.store.GormWalk(tx, now, false)
	if conn != nil {
		read = d.pgxWalk(ctx, conn, read, now)
	}
	return d.plannedWalk(tx, read)
}

func (d *dialect) LockHeld(tx *gorm.DB, conn *sql.Conn, now time.Time, picked []sqlstore.Picked, lease time.Duration) ([]sqlstore.Picked, error) {
	return d.lockPicked(tx, conn, now, picked, lease, true)
}

// WritePublished finds the published rows by their addresses, which stay
// theirs while the claim holds them locked.
func (d *dialect) WritePublished(tx *gorm.DB, published []uuid.UUID, held []sqlstore.Picked) error {
	if arg, ok := refsArg(published, held); ok {
		return d.store.MarkPublishedWhere(tx, len(published), refsMatch(""), arg)
	}
	in, arg := d.InIDs(d.store.Quote("id"), published)
	return d.store.MarkPublishedWhere(tx, len(published), in, arg)
}

func (d *dialect) AfterHeld(*sql.Conn) error { return nil }

// pgxWalk reads the held claim's walk (s.walkKeys) through pgx itself, on
// conn, inside the claim's transaction; with another driver it reads
// through fallback. Through database/sql each value of each row is
// converted twice (to a driver.Value, then to its destination: a uuid
// formatted and parsed again), and the walk, which takes turns, would be
// longer for it. These reads do not pass through GORM's logger and callbacks.
func (d *dialect) pgxWalk(ctx context.Context, conn *sql.Conn, fallback sqlstore.WalkReader, now time.Time) sqlstore.WalkReader {
	return func(window int, query string, args []any) ([]sqlstore.Queued, error) {
		out := make([]sqlstore.Queued, 0, min(window, 4096))
		ok, err := pgxQuery(ctx, conn, false, query, append(args, window), func(rows pgx.Rows) error {
			var (
				w     sqlstore.WalkRow
				id    pgtype.UUID
				token pgtype.Text
			)
			if err := rows.Scan(&id, &w.Key, &w.Next, &token, &w.Attempts, &w.Created, &w.Ref); err != nil {
				return err
			}
			w.ID = id.Bytes
			w.Token = sqlstore.Optional(token.String, token.Valid)
			r, err := w.Queued(now, false)
			if err != nil {
				return err
			}
			out = append(out, r)
			return nil
		})
		if !ok {
			return fallback(window, query, args)
		}
		return out, err
	}
}

// plannedWalk returns read, which runs the dialect's walkSetup in tx
// before its first read: only a claim that walks pays for it.
func (d *dialect) plannedWalk(tx *gorm.DB, read sqlstore.WalkReader) sqlstore.WalkReader {
	if walkSetup == "" {
		return read
	}
	set := false
	return func(window int, query string, args []any) ([]sqlstore.Queued, error) {
		if !set {
			if err := tx.Exec(walkSetup).Error; err != nil {
				return nil, err
			}
			set = true
		}
		return read(window, query, args)
	}
}

// pgxQuery runs query (with GORM's ? placeholders) through pgx itself on
// conn and calls row for each row; ok is false, and nothing ran, where the
// driver is not pgx. unnamed runs it as an unnamed statement, planned for
// its arguments each time, unless the connection is set to another mode
// (the simple protocol, for PgBouncer): a cached statement may get a
// generic plan, in which an id list is a parameter array matched against
// each row one by one, and one chosen while the table was nearly empty can
// scan it whole once it has grown. The lock needs it (it is the statement
// that sets plan_cache_mode for the rest of the claim); the walk does not
// take it: its generic plan costs far more than its custom one whenever
// the table holds more than a few rows, so PostgreSQL keeps planning it
// for its arguments anyway, and a cached statement spares the parse on
// every claim.
func pgxQuery(ctx context.Context, conn *sql.Conn, unnamed bool, query string, args []any, row func(pgx.Rows) error) (ok bool, err error) {
	err = conn.Raw(func(dc any) error {
		pc, isPgx := dc.(pgxConn)
		if !isPgx {
			return nil
		}
		ok = true
		c := pc.Conn()
		if unnamed && c.Config().DefaultQueryExecMode == pgx.QueryExecModeCacheStatement {
			args = append([]any{pgx.QueryExecModeCacheDescribe}, args...)
		}
		rows, err := c.Query(ctx, dollarParams(query), args...)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			if err := row(rows); err != nil {
				return err
			}
		}
		return rows.Err()
	})
	return ok, err
}

// dollarParams numbers the ? placeholders of query as PostgreSQL's $1, $2...,
// as GORM does for it. The outbox's SQL has no ? in a literal or a name.
func dollarParams(query string) string {
	var b strings.Builder
	b.Grow(len(query) + 16)
	n := 0
	for i := 0; i < len(query); i++ {
		if query[i] != '?' {
			b.WriteByte(query[i])
			continue
		}
		n++
		b.WriteByte('$')
		b.WriteString(strconv.Itoa(n))
	}
	return b.String()
}

// refColumn reads the address of a row of alias ("o." or ""); refsMatch is
// true of a row whose address is among those of a refsArg. The list is
// a subquery's result, not a constant: planned as a constant, each of its
// addresses is estimated in turn, which takes longer than locking the
// rows; a TID scan needs no estimate to be chosen.
func refColumn(alias string) string { return "CAST(" + alias + "ctid AS text)" }
func refsMatch(alias string) string {
	return alias + "ctid = ANY(CAST((SELECT CAST(? AS tid[])) AS tid[]))"
}

// refsArg is the argument of refsMatch for the rows ids of msgs, which
// has them in the same order (a held claim's messages and the ids of
// those published); ok is false unless msgs has an address for each.
//
// A row's address (PostgreSQL's ctid) stays its own while a transaction
// holds it locked, so the lock and the results of a held claim find rows
// by address, one page read each, instead of by id through the index
// (three or four). The walk
// reads each row's address (OutboxMessage.ref); the lock checks that each
// address still holds the id picked there.
func refsArg(ids []uuid.UUID, msgs []sqlstore.Picked) (arg string, ok bool) {
	if len(msgs) == 0 {
		return "", false
	}
	var b strings.Builder
	b.Grow(len(ids)*12 + 2)
	b.WriteByte('{')
	j := 0
	for i, id := range ids {
		for j < len(msgs) && msgs[j].ID != id {
			j++
		}
		if j == len(msgs) || msgs[j].Ref == "" {
			return "", false
		}
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteByte('"') // "(page,item)": the comma must be quoted
		b.WriteString(msgs[j].Ref)
		b.WriteByte('"')
		j++
	}
	b.WriteByte('}')
	return b.String(), true
}

// lockedRow is a row as the lock reads it.
type lockedRow struct {
	ref                       string
	topic, headers, lastError string
	payload                   []byte
	attempts                  int
	group                     uuid.NullUUID // through database/sql
	pgGroup                   pgtype.UUID   // through pgx
}

// lockPicked locks the picked rows (PostgreSQL) and returns those it may
// send, each with the address where it is locked. A row it cannot lock is in another
// transaction's claim, or has changed since the walk (published, or put
// back in a retry's backoff): either way its key is busy, and the later
// picked rows of that key are dropped too (they stay locked until this
// transaction ends, unsent).
//
// With the address of every picked row (OutboxMessage.ref, as the walk
// read it), it locks by address: a row
// that has changed since the walk has a new address or none (an updated
// row's new version is elsewhere, and the old one fails the lock's check);
// an address that holds another row since (deleted, vacuumed, reused) is
// not one of the picked ids, and is left out.
//
// read: the picked messages were walked without their contents (walkKeys);
// the lock reads them from the rows it locks, as they are while locked.
//
// A held claim (lease > 0) sets two things for its transaction in the
// same statement, before it holds anything: idle_in_transaction_session_timeout,
// so that PostgreSQL ends the claim of a publisher that stops answering
// after the lease; and plan_cache_mode force_custom_plan, so that the
// results' statements, which pgx prepares and caches, are planned for
// their id lists: a generic plan chosen while the table was nearly empty
// scans it whole for every batch once it has grown. Its commit waits for
// the disk (synchronous_commit as the server has it): the rows it deletes
// are not known to be gone, and walks cannot drop their index entries,
// until the commit is on disk, which without the wait is up to the WAL
// writer's next round: every walk would step over the rows deleted in
// that time.
func (d *dialect) lockPicked(tx *gorm.DB, conn *sql.Conn, now time.Time, picked []sqlstore.Picked, lease time.Duration, read bool) ([]sqlstore.Picked, error) {
	if len(picked) == 0 {
		return nil, nil
	}
	q := d.store.Quote
	from, args := d.store.QuotedTable()+" AS o", []any{}
	if lease > 0 {
		from += ", (SELECT set_config('idle_in_transaction_session_timeout', ?, true)," +
			" set_config('plan_cache_mode', 'force_custom_plan', true)) AS settings"
		args = append(args, strconv.FormatInt(max(lease.Milliseconds(), 1), 10))
	}
	ids := sqlstore.PickedIDs(picked)
	var match string
	var matchArg any
	byAddress := false
	if arg, ok := refsArg(ids, picked); ok {
		match, matchArg, byAddress = refsMatch("o."), arg, true
	} else {
		match, matchArg = d.InIDs("o."+q("id"), ids)
	}
	cols := "o." + q("id") + ", " + refColumn("o.")
	if read {
		cols += ", o." + q("topic") + ", o." + q("payload") + ", o." + q("headers") + ", o." + q("last_error") + ", o." + q("attempts") + ", o." + q("tx_group")
	}
	query := "SELECT " + cols + " FROM " + from + " WHERE " + match +
		" AND o." + q("state") + " = 'pending' AND o." + q("next_attempt_at") + " <= ? FOR UPDATE OF o SKIP LOCKED"
	args = append(args, matchArg, now)
	index := make(map[uuid.UUID]int, len(picked))
	for i, m := range picked {
		index[m.ID] = i
	}
	locked := make([]bool, len(picked))
	nLocked := 0
	var row lockedRow
	dest := func(id, group any) []any {
		out := []any{id, &row.ref}
		if read {
			out = append(out, &row.topic, &row.payload, &row.headers, &row.lastError, &row.attempts, group)
		}
		return out
	}
	lockedOne := func(id uuid.UUID) error {
		i, ok := index[id]
		if !ok || byAddress && picked[i].Ref != row.ref {
			return nil // by address: not the row picked there
		}
		m := picked[i]
		locked[i], m.Ref = true, row.ref
		nLocked++
		if read {
			m.Topic, m.Payload, m.LastError, m.Attempts = row.topic, row.payload, row.lastError, row.attempts
			picked[i].Group = m.ID
			if row.group.Valid {
				picked[i].Group = row.group.UUID
			} else if row.pgGroup.Valid {
				picked[i].Group = row.pgGroup.Bytes
			}
			return m.Headers.Scan(row.headers)
		}
		return nil
	}
	ok := false
	if conn != nil {
		var err error
		ok, err = pgxQuery(tx.Statement.Context, conn, true, query, args, func(rows pgx.Rows) error {
			var id pgtype.UUID
			row = lockedRow{}
			if err := rows.Scan(dest(&id, &row.pgGroup)...); err != nil {
				return err
			}
			return lockedOne(id.Bytes)
		})
		if err != nil {
			return nil, err
		}
	}
	if !ok {
		rows, err := tx.Raw(query, args...).Rows()
		if err != nil {
			return nil, err
		}
		defer rows.Close()
		for rows.Next() {
			var id uuid.UUID
			row = lockedRow{}
			if err := rows.Scan(dest(&id, &row.group)...); err != nil {
				return nil, err
			}
			if err := lockedOne(id); err != nil {
				return nil, err
			}
		}
		if err := rows.Err(); err != nil {
			return nil, err
		}
	}
	return sqlstore.KeepLocked(picked, locked, nLocked), nil
}

// TakesPgxPath reports whether the held claim's reads through pgx itself
// (its walk and lock) reach pgx on db's connections, or fall back to GORM:
// how a deployment can tell which path its driver gets.
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

// ClaimWhole is the exactly-once claim: held, of whole transaction groups.
func (d *dialect) ClaimWhole(ctx, work context.Context, opts core.ClaimOptions, excluded func([]uuid.UUID) (map[uuid.UUID]bool, error)) (*sqlstore.HeldClaim, error) {
	return d.held.ClaimWhole(ctx, work, opts, excluded)
}

// TakeWholeTurn takes the exactly-once claims' turn as a session advisory
// lock, given back before the transaction ends; the same statement sets
// the transaction's idle timeout, so that a publisher frozen with the turn
// loses it with its transaction.
func (d *dialect) TakeWholeTurn(tx *gorm.DB, lease time.Duration) (func() error, error) {
	key := d.store.LockKey(sqlstore.WholeClaimTurn)
	err := tx.Exec("SELECT set_config('idle_in_transaction_session_timeout', ?, true), pg_advisory_lock(?)",
		strconv.FormatInt(max(lease.Milliseconds(), 1), 10), key).Error
	if err != nil {
		return nil, err
	}
	return func() error { return tx.Exec("SELECT pg_advisory_unlock(?)", key).Error }, nil
}
