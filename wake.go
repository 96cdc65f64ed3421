package outbox

import (
	"database/sql"
	"errors"
	"sync"

	"gorm.io/gorm"
)

// wakeups are the running publishers of one store, woken in-process when a
// transaction that enqueued commits, so that they need not wait for their
// next poll. It works on every database; on PostgreSQL the NOTIFY (see
// WithNotifyInterval) also reaches other processes.
type wakeups struct {
	mu   sync.RWMutex
	subs map[waker]struct{}
}

// waker is what a wake-up reaches: a running publisher.
type waker interface {
	Wake()
	nudge()
}

// subscribe adds w until the returned function is called.
func (w *wakeups) subscribe(p waker) (unsubscribe func()) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.subs == nil {
		w.subs = map[waker]struct{}{}
	}
	w.subs[p] = struct{}{}
	return func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		delete(w.subs, p)
	}
}

func (w *wakeups) wake() {
	w.mu.RLock()
	defer w.mu.RUnlock()
	for p := range w.subs {
		p.Wake()
	}
}

// nudge tells the publishers that a transaction has enqueued and has not
// committed yet (see Publisher.nudge).
func (w *wakeups) nudge() {
	w.mu.RLock()
	defer w.mu.RUnlock()
	for p := range w.subs {
		p.nudge()
	}
}

// enqueuedKey marks a statement that wrote outbox rows, for the callback
// that wakes the publishers after GORM's own commit.
const enqueuedKey = "outbox:enqueued"

// Transaction is db.Transaction that also wakes this process's publishers
// when it commits, so that its events leave at once instead of at the next
// poll. Use it where you would use db.Transaction around Enqueue; nested, it
// is a savepoint like db.Transaction's, and the wake-up waits for nothing
// more than the outermost commit would.
//
// Statements that run in GORM's own transaction (Create, Save, Update and
// Delete of a model whose hooks or recorded events enqueue) wake the
// publishers after their commit without it: GORM's hooks share the
// statement, which Enqueue marks. Inside a plain db.Transaction nothing in
// the process can see the commit (GORM has no after-commit hook): there
// the enqueue nudges this process's publishers to look again shortly (10
// ms), which finds the events if the transaction has committed by then,
// and on PostgreSQL its NOTIFY wakes the publishers of every process.
func Transaction(db *gorm.DB, fn func(tx *gorm.DB) error, opts ...*sql.TxOptions) error {
	if db == nil || db.Config == nil {
		return errors.New("outbox: Transaction needs an opened *gorm.DB, got nil")
	}
	if fn == nil {
		return errors.New("outbox: Transaction needs a function to run, got nil")
	}
	if err := db.Transaction(fn, opts...); err != nil {
		return err
	}
	if p, err := pluginOf(db); err == nil {
		p.store.wakeups.wake()
	}
	return nil
}

// wakeAfterCommit runs after GORM's commit of a statement's own
// transaction: if the statement enqueued and committed, the publishers wake.
func (p *OutboxPlugin) wakeAfterCommit(tx *gorm.DB) {
	if tx.Error != nil {
		return
	}
	if _, began := tx.InstanceGet("gorm:started_transaction"); !began {
		return // inside the caller's transaction: its commit is not ours to see
	}
	if _, ok := tx.Statement.Settings.Load(enqueuedKey); ok {
		p.store.wakeups.wake()
	}
}
