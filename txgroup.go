package outbox

import (
	"database/sql"
	"runtime"
	"sync"
	"weak"

	"github.com/google/uuid"
	"gorm.io/gorm"
)

// txGroups ties the messages of one database transaction together: it
// remembers, for each open transaction that enqueued, the id of its first
// message, which the transaction's later messages carry as their TxGroup.
// An entry lives as long as the transaction's *sql.Tx.
type txGroups struct {
	first sync.Map // weak.Pointer[sql.Tx] -> uuid.UUID
}

// assign sets the TxGroup of msgs, which tx is about to write: nil on the
// transaction's first message, that message's id on every later one. A
// message that has a TxGroup keeps it; a connection that is not a
// database/sql transaction groups only the messages of one call.
func (g *txGroups) assign(tx *gorm.DB, msgs []*OutboxMessage) {
	if len(msgs) == 0 {
		return
	}
	t := sqlTx(tx)
	var key weak.Pointer[sql.Tx]
	leader, known := uuid.Nil, false
	if t != nil {
		key = weak.Make(t)
		if v, ok := g.first.Load(key); ok {
			leader, known = v.(uuid.UUID), true
		}
	}
	for _, m := range msgs {
		switch {
		case m.TxGroup != nil:
		case leader == uuid.Nil:
			leader = m.ID
		default:
			l := leader
			m.TxGroup = &l
		}
	}
	if t != nil && !known && leader != uuid.Nil {
		if _, loaded := g.first.LoadOrStore(key, leader); !loaded {
			runtime.AddCleanup(t, func(k weak.Pointer[sql.Tx]) { g.first.Delete(k) }, key)
		}
	}
}

// sqlTx is the database/sql transaction under tx, or nil.
func sqlTx(tx *gorm.DB) *sql.Tx {
	if tx == nil || tx.Statement == nil {
		return nil
	}
	switch pool := tx.Statement.ConnPool.(type) {
	case *sql.Tx:
		return pool
	case *gorm.PreparedStmtTX:
		if t, ok := pool.Tx.(*sql.Tx); ok {
			return t
		}
	}
	return nil
}
