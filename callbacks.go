package outbox

import (
	"reflect"

	"gorm.io/gorm"
)

// EventRecorder is implemented by models that record domain events while
// their state changes. After GORM creates, updates or deletes such a model,
// and before GORM commits, the plugin writes the recorded events to the
// outbox in the same transaction and clears them, so each is written once.
// Embed hooks.Events to implement it.
type EventRecorder interface {
	RecordedEvents() []Message
	ClearRecordedEvents()
}

type callbackOp struct {
	name                     string
	before, write, afterHook string
	// needsRows: an UPDATE or DELETE that touched no row changed nothing, so
	// its events are not written. Save relies on it: when its UPDATE finds no
	// row it falls back to a create, which writes them.
	needsRows bool
}

// callbackOps is the one table of every callback the plugin registers.
var callbackOps = []callbackOp{
	{name: "create", before: "gorm:before_create", write: "gorm:create", afterHook: "gorm:after_create"},
	{name: "update", before: "gorm:before_update", write: "gorm:update", afterHook: "gorm:after_update", needsRows: true},
	{name: "delete", before: "gorm:before_delete", write: "gorm:delete", afterHook: "gorm:after_delete", needsRows: true},
}

// callbackRegistrar is what GORM's (unexported) callback processors offer.
type callbackRegistrar interface {
	Register(name string, fn func(*gorm.DB)) error
}

type callbackProcessor[C callbackRegistrar] interface {
	Before(name string) C
	After(name string) C
}

func registerCallbacks(db *gorm.DB, p *OutboxPlugin) error {
	for _, op := range callbackOps {
		var err error
		switch op.name {
		case "create":
			err = registerOp(db.Callback().Create(), op, p)
		case "update":
			err = registerOp(db.Callback().Update(), op, p)
		case "delete":
			err = registerOp(db.Callback().Delete(), op, p)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func registerOp[C interface {
	callbackRegistrar
	callbackProcessor[C]
}, P callbackProcessor[C]](proc P, op callbackOp, p *OutboxPlugin) error {
	// Refuse before the domain row is written: afterwards, without a
	// transaction, it could no longer be taken back.
	err := proc.Before(op.write).After(op.before).
		Register("outbox:require_transaction_"+op.name, p.requireTransaction)
	if err != nil {
		return err
	}
	// Pinned before the commit: a callback placed only after gorm:after_*
	// would run after GORM's implicit commit.
	err = proc.After(op.afterHook).Before("gorm:commit_or_rollback_transaction").
		Register("outbox:write_events_"+op.name, func(tx *gorm.DB) { p.writeRecordedEvents(tx, op) })
	if err != nil {
		return err
	}
	// After it, on purpose: the publishers wake once the events are committed.
	return proc.After("gorm:commit_or_rollback_transaction").
		Register("outbox:wake_after_commit_"+op.name, p.wakeAfterCommit)
}

func (p *OutboxPlugin) requireTransaction(tx *gorm.DB) {
	if tx.Error != nil || p.cfg.allowNoTx || inTransaction(tx) {
		return
	}
	for _, r := range recordersIn(tx.Statement.ReflectValue) {
		if len(r.RecordedEvents()) > 0 {
			tx.AddError(ErrNoTransaction)
			return
		}
	}
}

func (p *OutboxPlugin) writeRecordedEvents(tx *gorm.DB, op callbackOp) {
	if tx.Error != nil || tx.Statement.Schema == nil {
		return
	}
	recorders := recordersIn(tx.Statement.ReflectValue)
	if len(recorders) == 0 {
		return
	}
	if op.needsRows && tx.Statement.RowsAffected == 0 {
		return
	}
	var msgs []Message
	for _, r := range recorders {
		msgs = append(msgs, r.RecordedEvents()...)
	}
	if err := p.store.enqueue(tx.Statement.Context, tx, msgs); err != nil {
		tx.AddError(err)
		return
	}
	for _, r := range recorders {
		r.ClearRecordedEvents()
	}
}

var recorderType = reflect.TypeFor[EventRecorder]()

// recordersIn finds the EventRecorders in a statement's value, which is a
// struct for Create(&one) and a slice or array for Create(&many),
// CreateInBatches and Save(&many).
func recordersIn(v reflect.Value) []EventRecorder {
	for v.IsValid() && (v.Kind() == reflect.Pointer || v.Kind() == reflect.Interface) {
		if v.IsNil() {
			return nil
		}
		v = v.Elem()
	}
	if !v.IsValid() {
		return nil
	}
	switch v.Kind() {
	case reflect.Struct:
		if r := recorderOf(v); r != nil {
			return []EventRecorder{r}
		}
	case reflect.Slice, reflect.Array:
		var out []EventRecorder
		for i := range v.Len() {
			e := v.Index(i)
			for e.Kind() == reflect.Pointer || e.Kind() == reflect.Interface {
				if e.IsNil() {
					break
				}
				e = e.Elem()
			}
			if e.Kind() == reflect.Struct {
				if r := recorderOf(e); r != nil {
					out = append(out, r)
				}
			}
		}
		return out
	}
	return nil
}

func recorderOf(v reflect.Value) EventRecorder {
	if v.CanAddr() && v.Addr().Type().Implements(recorderType) {
		return v.Addr().Interface().(EventRecorder)
	}
	if v.Type().Implements(recorderType) {
		return v.Interface().(EventRecorder)
	}
	return nil
}
