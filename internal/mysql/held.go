package mysql

import (
	"context"
	"database/sql"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/internal/core"
	"github.com/gorm-outbox/outbox/internal/sqlstore"
)

// ClaimBatch is the publisher's claim: held across the send
// (sqlstore.HeldClaims), as on PostgreSQL. Each row is written once, by
// its result, and claims take no named lock: a row another claim holds
// cannot be locked, and its key counts as busy.
//
// The rows are picked by a plain read and then locked by primary key,
// never by a locking read of the pending rows: InnoDB locks what a locking
// read scans, not only what it returns, so SKIP LOCKED over the queue
// would skip rows that another statement merely passed over, among them a
// key's oldest message, and take the next one. A lock by primary key
// touches the picked rows only: one it skips is in a claim (or being
// written by one).
func (d *dialect) ClaimBatch(ctx, work context.Context, opts core.ClaimOptions) (sqlstore.Batch, error) {
	if _, err := d.store.SQLDB(); err != nil {
		// No connection of its own to give a timeout (a pool that is not a
		// *sql.DB): a claim held by a publisher that stops answering would
		// never end, so it takes a lease instead.
		token, msgs, err := d.store.Claim(ctx, opts)
		if err != nil {
			return nil, err
		}
		return &sqlstore.LeaseBatch{Store: d.store, Token: token, Msgs: msgs}, nil
	}
	c, err := d.held.Claim(ctx, work, opts)
	if err != nil {
		return nil, err
	}
	return c, nil
}

// HeldTxOptions: the claim reads and writes in READ COMMITTED (see
// readCommitted); REPEATABLE READ would also take gap locks, which block
// the enqueuers' inserts beside the claimed rows.
func (d *dialect) HeldTxOptions() *sql.TxOptions { return readCommitted }

func (d *dialect) HeldWalk(_ context.Context, tx *gorm.DB, _ *sql.Conn, now time.Time) sqlstore.WalkReader {
	return d.store.GormWalk(tx, now, false)
}

// LockHeld first sets the connection's wait_timeout to the lease, so that
// the server closes the connection, rolling the claim back, if the
// publisher stops answering (MySQL has no timeout for an idle transaction
// alone); it keeps the session's own value, which AfterHeld puts back.
func (d *dialect) LockHeld(tx *gorm.DB, conn *sql.Conn, now time.Time, picked []sqlstore.Picked, lease time.Duration) ([]sqlstore.Picked, error) {
	if len(picked) == 0 {
		return nil, nil
	}
	if conn != nil {
		secs := max(int64((lease+time.Second-1)/time.Second), 1)
		if err := tx.Exec(setWaitTimeout(secs)).Error; err != nil {
			return nil, err
		}
	}
	return d.lockPicked(tx, now, picked, true)
}

// AfterHeld runs only after a LockHeld that set the timeout. It is bounded:
// a connection that does not answer is discarded, not waited for.
func (d *dialect) AfterHeld(conn *sql.Conn) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := conn.ExecContext(ctx, "SET SESSION wait_timeout = @outbox_wait_timeout, @outbox_wait_timeout = NULL")
	return err
}

// WritePublished deletes the published rows, or marks them, by primary
// key (see idsTable).
func (d *dialect) WritePublished(tx *gorm.DB, published []uuid.UUID, _ []sqlstore.Picked) error {
	q := d.store.Quote
	ids, arg := idsTable(published)
	join := ids + " STRAIGHT_JOIN " + d.store.QuotedTable() + " AS o ON o." + q("id") + " = j.id"
	var err error
	if d.store.DeletesPublished() {
		err = tx.Exec("DELETE o FROM "+join, arg).Error
	} else {
		err = tx.Exec("UPDATE "+join+" SET o."+q("state")+" = 'published', o."+q("published_at")+" = ?, o."+q("claim_token")+" = NULL",
			arg, time.Now().UTC()).Error
	}
	if err != nil {
		return fmt.Errorf("outbox: marking %d messages published in %s: %w", len(published), d.table, err)
	}
	return nil
}

// idsTable is a table of ids, one argument (a JSON array), to join the
// outbox table to: InnoDB then finds each row by its primary key. Matched
// with "id IN (...)", a list that is a large part of the table makes the
// optimizer scan the table instead, and InnoDB locks every row an UPDATE
// or DELETE scans: two claims that write their results at once would wait
// for each other's rows, a deadlock. MySQL has no index hint for DELETE.
func idsTable(ids []uuid.UUID) (table string, arg string) {
	var b strings.Builder
	b.Grow(len(ids)*39 + 2)
	b.WriteByte('[')
	for i, id := range ids {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteByte('"')
		b.WriteString(id.String())
		b.WriteByte('"')
	}
	b.WriteByte(']')
	return "JSON_TABLE(?, '$[*]' COLUMNS(id char(36) PATH '$')) AS j", b.String()
}

// LockPicked, in a lease claim (Store.Claim), locks what the walk picked
// as a held claim does: rows in a publisher's held claim look due to the
// walk, and must be left with their keys.
func (d *dialect) LockPicked(tx *gorm.DB, now time.Time, picked []sqlstore.Picked) ([]sqlstore.Picked, error) {
	return d.lockPicked(tx, now, picked, false)
}

// lockPicked locks the picked rows by primary key, skipping those another
// transaction holds, and returns those the claim may send (see
// sqlstore.KeepLocked). read: the walk read keys only; the rows are read
// whole as they are locked.
func (d *dialect) lockPicked(tx *gorm.DB, now time.Time, picked []sqlstore.Picked, read bool) ([]sqlstore.Picked, error) {
	if len(picked) == 0 {
		return nil, nil
	}
	q := d.store.Quote
	cols := "o." + q("id")
	if read {
		for _, c := range []string{"topic", "payload", "headers", "last_error", "attempts", "tx_group"} {
			cols += ", o." + q(c)
		}
	}
	ids, arg := idsTable(sqlstore.PickedIDs(picked))
	rows, err := tx.Raw("SELECT "+cols+" FROM "+ids+" STRAIGHT_JOIN "+d.store.QuotedTable()+" AS o ON o."+q("id")+" = j.id"+
		" WHERE o."+q("state")+" = 'pending' AND o."+q("next_attempt_at")+" <= ? FOR UPDATE SKIP LOCKED", arg, now).Rows()
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	index := make(map[uuid.UUID]int, len(picked))
	for i, m := range picked {
		index[m.ID] = i
	}
	locked := make([]bool, len(picked))
	n := 0
	for rows.Next() {
		var (
			id                        uuid.UUID
			topic, headers, lastError string
			payload                   []byte
			attempts                  int
			group                     uuid.NullUUID
		)
		dest := []any{&id}
		if read {
			dest = append(dest, &topic, &payload, &headers, &lastError, &attempts, &group)
		}
		if err := rows.Scan(dest...); err != nil {
			return nil, err
		}
		i, ok := index[id]
		if !ok {
			continue
		}
		locked[i] = true
		n++
		if read {
			m := picked[i]
			m.Topic, m.Payload, m.LastError, m.Attempts = topic, payload, lastError, attempts
			picked[i].Group = id
			if group.Valid {
				picked[i].Group = group.UUID
			}
			if err := m.Headers.Scan(headers); err != nil {
				return nil, err
			}
		}
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	return sqlstore.KeepLocked(picked, locked, n), nil
}

// ClaimWhole is the exactly-once claim: held, of whole transaction groups.
func (d *dialect) ClaimWhole(ctx, work context.Context, opts core.ClaimOptions, excluded func([]uuid.UUID) (map[uuid.UUID]bool, error)) (*sqlstore.HeldClaim, error) {
	return d.held.ClaimWhole(ctx, work, opts, excluded)
}

// setWaitTimeout sets the session's wait_timeout to secs, keeping its own
// value, the first time, for AfterHeld to put back.
func setWaitTimeout(secs int64) string {
	// A user variable never set is a NULL string: COALESCE would make the
	// value a string, which wait_timeout refuses.
	return "SET @outbox_wait_timeout = CAST(COALESCE(@outbox_wait_timeout, @@SESSION.wait_timeout) AS UNSIGNED), SESSION wait_timeout = " + strconv.FormatInt(secs, 10)
}

// wholeTurnWait bounds the wait for the exactly-once claims' turn, in
// seconds: its holder locks and completes one batch's groups.
const wholeTurnWait = 30

// TakeWholeTurn takes the exactly-once claims' turn as a named lock of the
// claim's connection, given back before the transaction ends. The
// connection's wait_timeout is set to the lease first, so that a publisher
// frozen with the turn loses it with its connection.
func (d *dialect) TakeWholeTurn(tx *gorm.DB, lease time.Duration) (func() error, error) {
	if err := tx.Exec(setWaitTimeout(max(int64((lease+time.Second-1)/time.Second), 1))).Error; err != nil {
		return nil, err
	}
	name := d.lockName(tx, d.store.LockKey(sqlstore.WholeClaimTurn))
	var got sql.NullInt64
	if err := tx.Raw("SELECT GET_LOCK(?, ?)", name, wholeTurnWait).Scan(&got).Error; err != nil {
		return nil, err
	}
	if !got.Valid || got.Int64 != 1 {
		return nil, fmt.Errorf("outbox: waited %ds for the exactly-once claims' turn (named lock %s)", wholeTurnWait, name)
	}
	return func() error { return tx.Exec("SELECT RELEASE_LOCK(?)", name).Error }, nil
}
