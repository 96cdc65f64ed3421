package outbox

import (
	"context"
	"errors"
	"time"

	"gorm.io/gorm"
)

// Enqueue writes messages to the outbox on tx, the transaction that writes the
// domain rows, so that both commit or roll back together. Many messages are
// written with one multi-row INSERT.
//
// Call it inside db.Transaction, or from a model's GORM hook (AfterCreate,
// AfterUpdate, AfterDelete, AfterSave) with the tx the hook is given. Outside a
// transaction it returns ErrNoTransaction unless AllowWithoutTransaction was
// set. A message that cannot be sent (bad topic, empty header key, payload
// that cannot be encoded or is too large) is refused with an error naming the
// problem, and nothing is written: return the error and the transaction rolls
// back whole.
func Enqueue(tx *gorm.DB, msgs ...Message) error {
	p, err := pluginOf(tx)
	if err != nil {
		return err
	}
	return p.store.enqueue(tx.Statement.Context, tx, msgs)
}

func (s *GormStore) enqueue(ctx context.Context, tx *gorm.DB, msgs []Message) error {
	if len(msgs) == 0 {
		return nil
	}
	if tx == nil || tx.Config == nil || tx.Statement == nil {
		return errors.New("outbox: enqueue needs the caller's *gorm.DB transaction, got nil")
	}
	if !s.cfg.allowNoTx && !inTransaction(tx) {
		return ErrNoTransaction
	}
	if ctx == nil {
		ctx = context.Background()
	}
	now := time.Now().UTC()
	rows := make([]*OutboxMessage, len(msgs))
	for i, m := range msgs {
		row, err := s.cfg.toRow(ctx, m, now)
		if err != nil {
			return err
		}
		rows[i] = row
	}
	if err := s.Save(ctx, tx, rows...); err != nil {
		return err
	}
	tx.Statement.Settings.Store(enqueuedKey, true)
	s.wakeups.nudge()
	if s.cfg.telemetry.enqueued.Enabled(ctx) {
		for _, r := range rows {
			s.cfg.telemetry.enqueued.Add(ctx, 1, destination(r.Topic))
		}
	}
	return nil
}

// SaveToOutbox is the design document's call: it writes one message for topic
// on tx through store, with the same validation and encoding as Enqueue.
// store is usually the one from StoreOf(db).
func SaveToOutbox(ctx context.Context, tx *gorm.DB, store Store, topic string, payload any, headers map[string]string) error {
	if isNil(store) {
		return errors.New("outbox: SaveToOutbox needs a store (StoreOf(db)), got nil")
	}
	m := Message{Topic: topic, Payload: payload, Headers: headers}
	if gs, ok := store.(*GormStore); ok {
		return gs.enqueue(ctx, tx, []Message{m})
	}
	// Another Store: validate and encode with the plugin's settings when
	// registered, the defaults otherwise.
	cfg, _ := newConfig(nil)
	if p, err := pluginOf(tx); err == nil {
		cfg = p.cfg
	}
	row, err := cfg.toRow(ctx, m, time.Now().UTC())
	if err != nil {
		return err
	}
	return store.Save(ctx, tx, row)
}
