package outbox

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"gorm.io/gorm"
	"gorm.io/gorm/clause"

	"github.com/gorm-outbox/outbox/internal/sqlstore"
)

// TransactionalSender is a Sender that delivers in broker transactions:
// given one, a Publisher runs in exactly-once mode (docs/exactly-once.md).
// kafka.NewTransactionalSender makes the one for Kafka.
//
// Its producers are slots, numbered from 0 to Slots()-1, shared by every
// publisher of the table: a publisher's worker holds one slot at a time,
// under a lease in the database, and whoever takes a slot over opens it
// again, which fences the producer that held it before.
type TransactionalSender interface {
	Sender
	// Slots is how many producers the publishers of the table share.
	Slots() int
	// TransactionalID is the id under which the broker knows slot's producer.
	TransactionalID(slot int) string
	// OpenSlot starts slot's producer. The broker fences every earlier
	// producer of the slot: its open transaction is aborted, or completed
	// if it was committing, and it cannot commit again.
	OpenSlot(ctx context.Context, slot int) (SlotProducer, error)
}

// SlotProducer sends one slot's transactions, one at a time.
type SlotProducer interface {
	// SendInTransaction sends msgs, in order, and a marker naming token, in
	// one transaction, and commits it. nil means committed. An error
	// wrapping ErrTransactionInDoubt means the outcome is unknown (the
	// commit failed, or the producer was fenced): the slot must be opened
	// again and LastCommitted asked. Any other error means nothing was
	// committed; its form is a Sender's (ErrBrokerUnavailable, SendError).
	//
	// ready, if not nil, says whether the batch may be committed: it must
	// be called, once, after the records are sent and before the commit,
	// and its error must abort the transaction. The publisher sends while
	// it records the batch as in flight, and commits only once that is on
	// disk.
	SendInTransaction(ctx context.Context, token string, msgs []*OutboxMessage, ready func() error) error
	// LastCommitted is the token of the slot's last committed transaction,
	// "" if the broker knows none. Ask it of a freshly opened slot.
	LastCommitted(ctx context.Context) (string, error)
	// Close ends the producer; an open transaction is aborted by the broker.
	Close() error
}

// ErrTransactionInDoubt says a broker transaction may or may not have
// committed. The publisher settles it from the broker's marker before the
// slot sends anything else.
var ErrTransactionInDoubt = errors.New("outbox: the outcome of the broker transaction is unknown")

// ErrFenced says a slot's producer was fenced: another publisher took the
// slot over. It comes with ErrTransactionInDoubt.
var ErrFenced = errors.New("outbox: the slot's producer was fenced by a newer one")

// slotClaimLease is how long the rows of an exactly-once batch stay
// claimed: until the slot's holder or whoever takes the slot over settles
// them from the broker's marker, never by expiry alone. The bound is for
// a table whose publishers all leave exactly-once mode with rows in flight.
const slotClaimLease = 24 * time.Hour

// SlotTableName is the table of a transactional publisher's slots, beside
// the outbox table.
func SlotTableName(outboxTable string) string { return outboxTable + "_txn_slots" }

// slotRow is one slot: who holds it, until when, and the claim whose
// broker transaction is not yet settled in the outbox table (with its
// rows, where the claim held them locked instead of stamping them).
type slotRow struct {
	TransactionalID string    `gorm:"column:transactional_id;size:255;primaryKey"`
	Owner           *string   `gorm:"size:128"`
	LeaseUntil      time.Time `gorm:"not null"`
	Pending         *string   `gorm:"size:36"`
	PendingIDs      []byte    `gorm:"column:pending_ids"` // the pending claim's rows, 16 bytes each, where they are not stamped with it
	Commits         int64     `gorm:"not null;default:0"`
	Aborts          int64     `gorm:"not null;default:0"`
	Takeovers       int64     `gorm:"not null;default:0"`
	LastError       string    `gorm:"size:1000;not null;default:''"`
	UpdatedAt       time.Time `gorm:"not null"`
}

// txnMode is a publisher's exactly-once mode: its sender, the plugin's
// store it claims through, and the slots table.
type txnMode struct {
	sender TransactionalSender
	store  *GormStore
	db     *gorm.DB
	table  string
	lease  time.Duration
	host   string
	tel    *telemetry

	mu       sync.Mutex
	migrated bool

	// claimFault, set by tests only, replaces a committed claim's result
	// with an error: the reply of a commit lost with its connection.
	claimFault func() error
	// beforeNaming, set by tests only, runs between a held claim's lock
	// and its naming: a publisher paused at that instant.
	beforeNaming func()
}

func newTxnMode(sender TransactionalSender, store Store, lease time.Duration, tel *telemetry) (*txnMode, error) {
	gs, ok := store.(*GormStore)
	if !ok {
		return nil, fmt.Errorf("outbox: exactly-once mode (a TransactionalSender) needs the plugin's store, not %T", store)
	}
	if n := sender.Slots(); n <= 0 {
		return nil, fmt.Errorf("outbox: the TransactionalSender has %d slots; it needs at least one", n)
	}
	host, _ := os.Hostname()
	if host == "" {
		host = "unknown"
	}
	return &txnMode{sender: sender, store: gs, db: gs.engine.DB(), table: SlotTableName(gs.TableName()),
		lease: lease, host: fmt.Sprintf("%s/%d", host, os.Getpid()), tel: tel}, nil
}

// checkPool refuses a pool too small for workers held claims: each holds
// one connection for its claim and takes a second to name the claim in
// its slot, and with every connection held by a claim none could.
func (m *txnMode) checkPool(workers int) error {
	if m.store.engine.WholeClaimer() == nil {
		return nil // lease claims, which hold no connection across the send
	}
	// A *sql.DB: WholeClaimer is nil otherwise.
	sqlDB, _ := m.store.engine.SQLDB()
	need := 2*workers + 1 // and one for the wake-ups' listener
	if limit := sqlDB.Stats().MaxOpenConnections; limit > 0 && limit < need {
		return fmt.Errorf("outbox: exactly-once mode needs two database connections a worker (one holds the claim, one names it in its slot) and one more: "+
			"the pool allows %d (SetMaxOpenConns) for %d workers; allow at least %d, or use fewer workers (WithWorkers)", limit, workers, need)
	}
	return nil
}

// migrate creates the slots table and its rows, and the index of the
// outbox table's transaction groups where its schema has none, once, when
// the database first answers.
func (m *txnMode) migrate(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.migrated {
		return nil
	}
	if err := m.store.engine.EnsureGroupIndex(ctx); err != nil {
		return err
	}
	db := m.db.WithContext(ctx)
	// Created if missing, and given the column a table made before it
	// lacks; never altered otherwise: GORM's column reads of an existing
	// table fail through lib/pq. A CREATE that fails because another
	// process created the table at the same moment is no failure.
	if !db.Migrator().HasTable(m.table) {
		if err := db.Table(m.table).Migrator().CreateTable(&slotRow{}); err != nil && !db.Migrator().HasTable(m.table) {
			return fmt.Errorf("outbox: creating the slots table %s: %w", m.table, err)
		}
	} else if mg := db.Table(m.table).Migrator(); !mg.HasColumn(&slotRow{}, "pending_ids") {
		if err := mg.AddColumn(&slotRow{}, "PendingIDs"); err != nil && !mg.HasColumn(&slotRow{}, "pending_ids") {
			return fmt.Errorf("outbox: adding column pending_ids to the slots table %s: %w", m.table, err)
		}
	}
	rows := make([]slotRow, m.sender.Slots())
	for i := range rows {
		rows[i] = slotRow{TransactionalID: m.sender.TransactionalID(i), LeaseUntil: time.Unix(0, 0).UTC(), UpdatedAt: time.Now().UTC()}
	}
	err := m.write(ctx, false, func(db *gorm.DB) error {
		return db.Table(m.table).Clauses(clause.OnConflict{DoNothing: true}).CreateInBatches(rows, 500).Error
	})
	if err != nil {
		return fmt.Errorf("outbox: creating the slots of %s: %w", m.table, err)
	}
	m.migrated = true
	return nil
}

// write runs fn, which writes the slots table (and, inTx, the outbox
// table's settled rows), as the database's store records: on SQLite, in
// the single writer's turn.
func (m *txnMode) write(ctx context.Context, inTx bool, fn func(db *gorm.DB) error) error {
	return m.store.engine.Dialect().Recording(ctx, m.db.WithContext(ctx), inTx, fn)
}

// errSlotLost says the worker's slot was taken over: its claim did not
// happen, and the new holder settles what the slot had in flight.
var errSlotLost = errors.New("outbox: the slot was taken over by another publisher")

// slotHolder is one worker's slot, held or not.
type slotHolder struct {
	m        *txnMode
	owner    string
	slot     int // -1: none held
	id       string
	producer SlotProducer
	// pending is the claim the slot has not settled in the table;
	// committed says its transaction is known to have committed.
	pending   string
	committed bool
	renewed   time.Time
}

func (m *txnMode) holder() *slotHolder {
	return &slotHolder{m: m, slot: -1, owner: m.host + "/" + uuid.NewString()[:8]}
}

func (h *slotHolder) where() (string, []any) {
	return "transactional_id = ? AND owner = ?", []any{h.id, h.owner}
}

// acquire takes a free slot, or one whose lease expired (those with a
// transaction to settle first), and settles it. false: none is free.
func (h *slotHolder) acquire(ctx context.Context) (bool, error) {
	db := h.m.db.WithContext(ctx)
	now := time.Now().UTC()
	var free []slotRow
	err := db.Table(h.m.table).Select("transactional_id", "owner").Where("lease_until < ? AND transactional_id IN ?", now, h.m.slotIDs()).
		Order("CASE WHEN pending IS NULL THEN 1 ELSE 0 END, transactional_id").Limit(8).Find(&free).Error
	if err != nil {
		return false, err
	}
	for _, f := range free {
		slot := h.slotOf(f.TransactionalID)
		if slot < 0 {
			continue // a slot of a larger sender: not ours to use
		}
		updates := map[string]any{"owner": h.owner, "lease_until": now.Add(h.m.lease), "updated_at": now}
		if f.Owner != nil {
			updates["takeovers"] = gorm.Expr("takeovers + 1")
		}
		var took int64
		err := h.m.write(ctx, false, func(db *gorm.DB) error {
			res := db.Table(h.m.table).Where("transactional_id = ? AND lease_until < ?", f.TransactionalID, now).Updates(updates)
			took = res.RowsAffected
			return res.Error
		})
		if err != nil {
			return false, err
		}
		if took == 1 {
			h.slot, h.id, h.renewed = slot, f.TransactionalID, now
			return true, h.settle(ctx)
		}
	}
	return false, nil
}

// slotIDs are the transactional ids of the sender's slots.
func (m *txnMode) slotIDs() []string {
	ids := make([]string, m.sender.Slots())
	for i := range ids {
		ids[i] = m.sender.TransactionalID(i)
	}
	return ids
}

func (h *slotHolder) slotOf(id string) int {
	for i := range h.m.sender.Slots() {
		if h.m.sender.TransactionalID(i) == id {
			return i
		}
	}
	return -1
}

// settle opens the slot's producer if it is not open (fencing whoever had
// it) and settles its pending claim: published if the broker's last
// committed marker names it, handed back otherwise.
func (h *slotHolder) settle(ctx context.Context) error {
	// Ownership first: opening a slot that another worker took over would
	// fence that worker's transaction in flight.
	db := h.m.db.WithContext(ctx)
	var row slotRow
	where, args := h.where()
	res := db.Table(h.m.table).Where(where, args...).Limit(1).Find(&row)
	if res.Error != nil {
		return res.Error
	}
	if res.RowsAffected == 0 {
		h.drop()
		return nil
	}
	if h.producer == nil {
		p, err := h.m.sender.OpenSlot(ctx, h.slot)
		if err != nil {
			return fmt.Errorf("opening slot %s: %w", h.id, err)
		}
		h.producer, h.committed = p, false
	}
	if row.Pending == nil {
		h.pending = ""
		return nil
	}
	token := *row.Pending
	committed := h.committed && h.pending == token
	if !committed {
		last, err := h.producer.LastCommitted(ctx)
		if err != nil {
			return fmt.Errorf("reading slot %s's last committed marker: %w", h.id, err)
		}
		committed = last == token
	}
	counter := "aborts"
	if committed {
		counter = "commits"
	}
	err := h.m.write(ctx, true, func(tx *gorm.DB) error {
		if len(row.PendingIDs) > 0 {
			// A held claim: its rows were never stamped. Those the broker
			// has are published; the others are due as they are.
			if committed {
				if err := h.m.store.engine.PublishPending(tx, decodeIDs(row.PendingIDs)); err != nil {
					return err
				}
			}
		} else if err := h.m.store.engine.ResolveToken(tx, token, committed); err != nil {
			return err
		}
		return h.clearPending(tx, token, committed)
	})
	if err != nil {
		return err
	}
	h.m.tel.noteTransaction("settled_" + counter)
	h.pending, h.committed, h.renewed = "", false, time.Now().UTC()
	return nil
}

// guard is the claim's check, in its transaction, that the slot is still
// this worker's; it names the claim as the slot's pending one and renews
// the lease.
func (h *slotHolder) guard(token string) func(tx *gorm.DB) error {
	return func(tx *gorm.DB) error {
		now := time.Now().UTC()
		where, args := h.where()
		res := tx.Table(h.m.table).Where(where, args...).
			Updates(map[string]any{"pending": token, "lease_until": now.Add(h.m.lease), "updated_at": now})
		if res.Error != nil {
			return res.Error
		}
		if res.RowsAffected != 1 {
			return errSlotLost
		}
		h.renewed = now
		return nil
	}
}

// renew keeps an idle slot's lease; false: the slot was taken over.
func (h *slotHolder) renew(ctx context.Context) (bool, error) {
	now := time.Now().UTC()
	if now.Sub(h.renewed) < h.m.lease/3 {
		return true, nil
	}
	where, args := h.where()
	var kept int64
	err := h.m.write(ctx, false, func(db *gorm.DB) error {
		res := db.Table(h.m.table).Where(where, args...).
			Updates(map[string]any{"lease_until": now.Add(h.m.lease), "updated_at": now})
		kept = res.RowsAffected
		return res.Error
	})
	if err != nil {
		return true, err
	}
	if kept != 1 {
		h.drop()
		return false, nil
	}
	h.renewed = now
	return true, nil
}

// settled records a batch whose transaction committed: its rows published
// and the slot's pending claim cleared, in one transaction.
func (h *slotHolder) settled(ctx context.Context, token string, published bool, record func(tx *gorm.DB) error) error {
	err := h.m.write(ctx, true, func(tx *gorm.DB) error {
		if err := record(tx); err != nil {
			return err
		}
		return h.clearPending(tx, token, published)
	})
	if err != nil {
		return err
	}
	h.pending, h.committed, h.renewed = "", false, time.Now().UTC()
	return nil
}

// clearPending clears, on tx, the slot's pending claim token, counting it
// committed or aborted, and renews the lease (h.renewed is the caller's to
// set once tx commits).
func (h *slotHolder) clearPending(tx *gorm.DB, token string, committed bool) error {
	counter := "aborts"
	if committed {
		counter = "commits"
	}
	now := time.Now().UTC()
	where, args := h.where()
	return tx.Table(h.m.table).Where(where+" AND pending = ?", append(args, token)...).
		Updates(map[string]any{"pending": nil, "pending_ids": nil, counter: gorm.Expr(counter + " + 1"), "lease_until": now.Add(h.m.lease), "updated_at": now}).Error
}

// name names a held claim's rows as the slot's pending claim, in a
// transaction of its own, durable before the broker may commit them: a
// claim whose transaction ends before its result is recorded (a crash, a
// database restart, a pause past the lease) leaves its rows free but
// named, and every claim leaves them out (txnMode.unsettled) until the
// slot is settled from its marker. false: the slot was taken over.
func (h *slotHolder) name(ctx context.Context, token string, ids []uuid.UUID) (bool, error) {
	now := time.Now().UTC()
	where, args := h.where()
	// One statement, committed on its own: held claims are on databases
	// whose writers need no turn (see txnMode.write).
	res := h.m.db.Session(&gorm.Session{SkipDefaultTransaction: true, Context: ctx}).Table(h.m.table).
		Where(where+" AND pending IS NULL", args...).
		Updates(map[string]any{"pending": token, "pending_ids": encodeIDs(ids), "lease_until": now.Add(h.m.lease), "updated_at": now})
	if res.Error != nil || res.RowsAffected != 1 {
		return false, res.Error
	}
	h.renewed = now
	return true, nil
}

// unsettled returns the check of a held claim's locked rows: those named
// by a slot's pending claim, whose broker transaction may have committed,
// are left out. It reads the slots outside the claim's transaction, so
// that it sees what was committed up to now.
func (m *txnMode) unsettled(ctx context.Context) func([]uuid.UUID) (map[uuid.UUID]bool, error) {
	return func(ids []uuid.UUID) (map[uuid.UUID]bool, error) {
		var named [][]byte
		err := m.db.WithContext(ctx).Table(m.table).Where("pending IS NOT NULL AND pending_ids IS NOT NULL").
			Pluck("pending_ids", &named).Error
		if err != nil || len(named) == 0 {
			return nil, err
		}
		mine := make(map[uuid.UUID]bool, len(ids))
		for _, id := range ids {
			mine[id] = true
		}
		out := map[uuid.UUID]bool{}
		for _, b := range named {
			for _, id := range decodeIDs(b) {
				if mine[id] {
					out[id] = true
				}
			}
		}
		return out, nil
	}
}

// encodeIDs packs ids, 16 bytes each; decodeIDs unpacks them.
func encodeIDs(ids []uuid.UUID) []byte {
	out := make([]byte, 0, 16*len(ids))
	for _, id := range ids {
		out = append(out, id[:]...)
	}
	return out
}

func decodeIDs(b []byte) []uuid.UUID {
	out := make([]uuid.UUID, len(b)/16)
	for i := range out {
		copy(out[i][:], b[16*i:])
	}
	return out
}

// noteError keeps the slot's last error for the admin command.
func (h *slotHolder) noteError(ctx context.Context, err error) {
	if h.slot < 0 || err == nil {
		return
	}
	text := errorText(err)
	if len(text) > 1000 {
		text = strings.ToValidUTF8(text[:1000], "")
	}
	where, args := h.where()
	_ = h.m.write(ctx, false, func(db *gorm.DB) error {
		return db.Table(h.m.table).Where(where, args...).
			Updates(map[string]any{"last_error": text, "updated_at": time.Now().UTC()}).Error
	})
}

// closeProducer drops the producer: the next settle opens the slot again.
func (h *slotHolder) closeProducer() {
	if h.producer != nil {
		_ = h.producer.Close()
		h.producer = nil
	}
}

// drop forgets a slot that is no longer this worker's.
func (h *slotHolder) drop() {
	h.closeProducer()
	h.slot, h.id, h.pending, h.committed = -1, "", "", false
}

// release hands a settled slot back at once; one with a claim still to
// settle is left to its lease, for whoever takes it over.
func (h *slotHolder) release(ctx context.Context) {
	if h.slot < 0 {
		return
	}
	// The row, not h.pending, says whether a claim is left to settle: a
	// claim whose commit failed ambiguously is known only there.
	where, args := h.where()
	_ = h.m.write(ctx, false, func(db *gorm.DB) error {
		return db.Table(h.m.table).Where(where+" AND pending IS NULL", args...).
			Updates(map[string]any{"owner": nil, "lease_until": time.Now().UTC().Add(-time.Millisecond), "updated_at": time.Now().UTC()}).Error
	})
	h.drop()
}

// SlotStatus is one slot of a transactional publisher, as Slots reads it.
type SlotStatus struct {
	TransactionalID string
	Owner           string    // "" when free
	LeaseUntil      time.Time // past: free, or its holder is gone
	Open            bool      // a transaction is in flight, or not yet settled in the table
	Commits         int64
	Aborts          int64
	Takeovers       int64 // times the slot was taken over, fencing its holder
	LastError       string
}

// Slots lists the slots of the exactly-once publishers of the store's
// table, or none if no such publisher ever ran.
func (s *GormStore) Slots(ctx context.Context) ([]SlotStatus, error) {
	db := s.engine.DB().WithContext(orBackground(ctx))
	table := SlotTableName(s.TableName())
	if !db.Migrator().HasTable(table) {
		return nil, nil
	}
	var rows []slotRow
	if err := db.Table(table).Order("transactional_id").Find(&rows).Error; err != nil {
		return nil, fmt.Errorf("outbox: reading the slots table %s: %w", table, err)
	}
	out := make([]SlotStatus, len(rows))
	for i, r := range rows {
		out[i] = SlotStatus{TransactionalID: r.TransactionalID, LeaseUntil: r.LeaseUntil, Open: r.Pending != nil,
			Commits: r.Commits, Aborts: r.Aborts, Takeovers: r.Takeovers, LastError: r.LastError}
		if r.Owner != nil {
			out[i].Owner = *r.Owner
		}
	}
	return out, nil
}

// publishTxn is one batch of exactly-once mode: hold a slot (settling
// what it left in flight), claim under the slot's guard, send the batch in
// one broker transaction with the claim's marker, and record the outcome.
// A batch whose transaction's outcome is unknown stays claimed until the
// slot, opened again, tells it from its marker.
func (p *Publisher) publishTxn(ctx, work context.Context, h *slotHolder) (BatchResult, error) {
	var res BatchResult
	m := p.txn
	if err := m.migrate(ctx); err != nil {
		return res, &outage{"database", err}
	}
	if h.slot < 0 {
		got, err := h.acquire(ctx)
		if err != nil {
			return res, p.slotFailure(ctx, h, err)
		}
		if !got {
			return res, nil
		}
	}
	if h.producer == nil || h.pending != "" {
		if err := h.settle(ctx); err != nil {
			return res, p.slotFailure(ctx, h, err)
		}
		if h.slot < 0 {
			return res, nil
		}
	}
	token := uuid.NewString()
	if w := m.store.engine.WholeClaimer(); w != nil {
		return p.publishHeldTxn(ctx, work, h, w, token)
	}
	opts := ClaimOptions{Limit: p.cfg.batchSize, Lease: slotClaimLease, SkipFailedKeys: p.cfg.keyPolicy == KeySkip}
	msgs, err := m.store.engine.ClaimGuarded(ctx, token, opts, h.guard(token))
	if err == nil && m.claimFault != nil {
		err = m.claimFault()
	}
	switch {
	case errors.Is(err, errSlotLost):
		h.drop()
		return res, nil
	case errors.Is(err, sqlstore.ErrClaimRace):
		return res, nil
	case err != nil:
		// The claim may have committed all the same (its commit's reply
		// lost with the connection): the slot then names it pending, and
		// settling it first hands its rows back, which the next claim's
		// guard, naming another token, would leave claimed for the lease.
		h.pending, h.committed = token, false
		return res, &outage{"database", err}
	}
	res.Claimed = len(msgs)
	if len(msgs) == 0 {
		if _, err := h.renew(ctx); err != nil {
			return res, &outage{"database", err}
		}
		return res, nil
	}
	h.pending, h.committed = token, false
	if ctx.Err() != nil { // stopping: hand the claim back unsent
		res.Released = len(msgs)
		return res, h.settled(work, token, false, func(tx *gorm.DB) error {
			return m.store.engine.SettleIDs(tx, token, sqlstore.IDs(msgs), false)
		})
	}
	// A worker that was held up since its claim (a pause, a slow machine)
	// makes sure the slot is still its own before it sends: one taken over
	// meanwhile has its claim settled by the new holder. The broker's fence
	// covers the moments after this check.
	if kept, err := h.renew(work); err != nil || !kept {
		if err != nil {
			return res, &outage{"database", err}
		}
		p.cfg.logger.Warn("outbox: the slot was taken over while its batch waited to be sent; the new holder settles the batch",
			"messages", len(msgs))
		return res, nil
	}
	return p.sendTxn(work, h, token, msgs, res, nil, func(committed bool, o batchOutcomes) error {
		return h.settled(work, token, committed, func(tx *gorm.DB) error {
			if committed {
				return m.store.engine.SettleIDs(tx, token, o.published, true)
			}
			if err := m.store.engine.MarkFailedOn(tx, &token, o.failures); err != nil {
				return err
			}
			return m.store.engine.SettleIDs(tx, token, o.released, false)
		})
	})
}

// publishHeldTxn is publishTxn's batch where claims are held (PostgreSQL,
// MariaDB/MySQL): the claim's rows stay locked in its transaction across
// the send, unstamped, and the slot names them instead; the outcome and
// the slot's cleared claim commit with that transaction. Each row is
// written once; claims take turns only to complete groups that reach
// beyond their batch (sqlstore.WholeTurn).
func (p *Publisher) publishHeldTxn(ctx, work context.Context, h *slotHolder, w sqlstore.WholeClaimer, token string) (BatchResult, error) {
	var res BatchResult
	m := p.txn
	opts := ClaimOptions{Limit: p.cfg.batchSize, Lease: m.lease, SkipFailedKeys: p.cfg.keyPolicy == KeySkip}
	c, err := w.ClaimWhole(ctx, work, opts, m.unsettled(work))
	if err != nil {
		return res, &outage{"database", err}
	}
	defer c.End() // rolls back what was not recorded: the rows are free, and left out while named
	msgs := c.Messages()
	res.Claimed = len(msgs)
	if len(msgs) == 0 {
		if _, err := h.renew(ctx); err != nil {
			return res, &outage{"database", err}
		}
		return res, nil
	}
	if ctx.Err() != nil { // stopping: the rollback hands the claim back unsent
		res.Released = len(msgs)
		return res, nil
	}
	if m.beforeNaming != nil {
		m.beforeNaming()
	}
	// The rows are named in the slot while the broker takes the records:
	// the transaction commits only once the naming is on disk and the rows
	// were still locked when it was (ready).
	var naming struct {
		named bool
		err   error
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		naming.named, naming.err = h.name(work, token, sqlstore.IDs(msgs))
		if naming.err == nil && m.claimFault != nil {
			naming.err = m.claimFault()
		}
		if naming.err == nil && naming.named {
			// A claim whose transaction ended before its rows were named
			// (a pause past the lease) may have lost them to another
			// claim, which did not see them named.
			if err := c.Alive(); err != nil {
				naming.err = fmt.Errorf("outbox: the claim's transaction ended before its batch was named in slot %s; the batch is not sent: %w", h.id, err)
			}
		}
	}()
	ready := func() error {
		<-done
		switch {
		case naming.err != nil:
			return naming.err
		case !naming.named:
			return errSlotLost
		}
		return nil
	}
	return p.sendTxn(work, h, token, msgs, res, ready, func(committed bool, o batchOutcomes) error {
		err := c.RecordWith(o.published, o.failures, func(tx *gorm.DB) error {
			return h.clearPending(tx, token, committed)
		})
		if err == nil {
			h.renewed = time.Now().UTC()
		}
		return err
	})
}

// sendTxn sends a claimed batch in one broker transaction and records its
// outcome with record, which clears the slot's pending claim. ready, if
// not nil, is the batch's permission to commit (SlotProducer).
func (p *Publisher) sendTxn(work context.Context, h *slotHolder, token string, msgs []*OutboxMessage, res BatchResult,
	ready func() error, record func(committed bool, o batchOutcomes) error) (BatchResult, error) {
	started := time.Now()
	sendCtx, span := p.tel.startSend(work, p.system, msgs)
	sendErr := h.producer.SendInTransaction(sendCtx, token, msgs, ready)
	now := time.Now()
	if ready != nil {
		if err := ready(); err != nil && sendErr == nil {
			// A SlotProducer that commits without its permission: the
			// batch is delivered, and recorded so as best can be.
			p.cfg.logger.Error("outbox: the slot's producer committed a transaction that was not ready to commit (its SendInTransaction must call ready first): "+
				"exactly-once delivery cannot hold; the batch is recorded as published", "transactional_id", h.id, "messages", len(msgs), "error", err)
		} else if err != nil {
			// Nothing was committed: the batch was not safe to commit.
			// The producer may still have the transaction open, so the
			// slot is opened again before it sends anything else.
			errs := make([]error, len(msgs))
			for i := range errs {
				errs[i] = ErrHeldBack // handed back unsent, as a stop does
			}
			p.tel.recordBatch(work, span, started, now, msgs, errs, nil)
			res.Released = len(msgs)
			h.closeProducer()
			if errors.Is(err, errSlotLost) {
				h.drop()
				return res, nil
			}
			// The naming may have committed all the same: settled first,
			// it is found unsent and cleared.
			h.pending, h.committed = token, false
			return res, &outage{"database", err}
		}
		h.pending, h.committed = token, false
	}
	if errors.Is(sendErr, ErrTransactionInDoubt) {
		outcome := "in_doubt"
		if errors.Is(sendErr, ErrFenced) {
			outcome = "fenced"
		}
		p.tel.noteTransaction(outcome)
		errs := make([]error, len(msgs))
		for i := range errs {
			errs[i] = sendErr
		}
		p.tel.recordBatch(work, span, started, now, msgs, errs, nil)
		h.closeProducer()
		h.noteError(work, sendErr)
		if outcome == "fenced" {
			p.cfg.logger.Warn("outbox: the slot's producer was fenced: another publisher took the slot over (this one was paused past its lease), "+
				"or another application uses the same transactional id; the batch is settled by the slot's holder",
				"transactional_id", h.id, "messages", len(msgs), "error", sendErr)
		} else {
			p.cfg.logger.Warn("outbox: a broker transaction's outcome is unknown; its slot will be opened again and settled from its marker",
				"transactional_id", h.id, "messages", len(msgs), "error", sendErr)
		}
		return res, &outage{"broker", sendErr}
	}
	errs := make([]error, len(msgs))
	if sendErr != nil {
		errs = perMessage(sendErr, msgs)
		for i := range errs {
			if errs[i] == nil {
				// The transaction was aborted: what the broker took of it is
				// not delivered either, and costs no attempt.
				errs[i] = ErrHeldBack
			}
		}
	}
	o := p.outcomes(msgs, errs, now, &res)
	defer func() { p.tel.recordBatch(work, span, started, now, msgs, errs, o.deadIDs) }()
	committed := sendErr == nil
	h.committed = committed
	if committed {
		p.tel.noteTransaction("committed")
	} else {
		p.tel.noteTransaction("aborted")
		h.noteError(work, sendErr)
	}
	if err := record(committed, o); err != nil {
		// The slot keeps its pending claim: the next batch settles it first.
		return res, &outage{"database", err}
	}
	h.pending, h.committed = "", false
	if o.unavailable != nil {
		return res, &outage{"broker", fmt.Errorf("%d messages handed back: %w", len(o.released), o.unavailable)}
	}
	return res, nil
}

// slotFailure is what a failure to hold or settle a slot does: the
// producer is dropped so that the next try opens the slot again, and the
// publisher pauses as in an outage of the side that failed.
func (p *Publisher) slotFailure(ctx context.Context, h *slotHolder, err error) error {
	h.closeProducer()
	if errors.Is(err, ErrBrokerUnavailable) || errors.Is(err, ErrTransactionInDoubt) {
		return &outage{"broker", err}
	}
	var refused *SlotError
	if errors.As(err, &refused) {
		h.noteError(ctx, err)
		p.cfg.logger.Error("outbox: the broker refuses the publisher's transactions", "transactional_id", h.id, "error", err)
		return &outage{"broker", err}
	}
	return &outage{"database", err}
}

// SlotError is a broker's refusal to open a slot that no wait mends by
// itself (transactions not supported, not allowed, or not configured): its
// message says what to change. The publisher keeps trying, paused.
type SlotError struct {
	TransactionalID string
	Err             error
}

func (e *SlotError) Error() string {
	return fmt.Sprintf("outbox: the broker refuses transactional id %q: %v", e.TransactionalID, e.Err)
}

func (e *SlotError) Unwrap() error { return e.Err }

// sweepSlots settles, every lease, the slots whose holder went away with
// a claim in flight, so that their messages do not wait for a worker to
// need the slot.
func (p *Publisher) sweepSlots(ctx context.Context) {
	ticker := time.NewTicker(p.cfg.lease)
	defer ticker.Stop()
	var reported []string // the stranded slots last logged: said again only when they change
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
		if err := p.txn.migrate(ctx); err != nil {
			continue
		}
		var stranded []string
		err := p.txn.db.WithContext(ctx).Table(p.txn.table).Where("pending IS NOT NULL AND lease_until < ? AND transactional_id NOT IN ?", time.Now().UTC(), p.txn.slotIDs()).
			Order("transactional_id").Pluck("transactional_id", &stranded).Error
		if err == nil && !slices.Equal(stranded, reported) {
			if len(stranded) > 0 {
				p.cfg.logger.Error("outbox: slots that are not this publisher's (another transactional id, or more slots than WithSlots) hold a batch in flight; "+
					"its messages, and the later messages of their keys, wait until a publisher with those slots settles them", "transactional_ids", stranded)
			} else {
				p.cfg.logger.Info("outbox: no slot that is not this publisher's holds a batch in flight any more")
			}
			reported = stranded
		}
		var stale int64
		err = p.txn.db.WithContext(ctx).Table(p.txn.table).Where("pending IS NOT NULL AND lease_until < ? AND transactional_id IN ?", time.Now().UTC(), p.txn.slotIDs()).Count(&stale).Error
		if err != nil || stale == 0 {
			continue
		}
		h := p.txn.holder()
		if got, err := h.acquire(ctx); err != nil {
			p.cfg.logger.Warn("outbox: settling a slot left in flight failed; retrying later", "transactional_id", h.id, "error", err)
		} else if got {
			p.cfg.logger.Info("outbox: settled a slot left in flight", "transactional_id", h.id)
		}
		h.release(context.WithoutCancel(ctx))
	}
}
