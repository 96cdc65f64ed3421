package outbox_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/gorm-outbox/outbox"
)

func TestEnqueueCommitsWithTheTransaction(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		before := time.Now().Add(-time.Second)
		err := db.Transaction(func(tx *gorm.DB) error {
			if err := tx.Create(&Account{Name: "ada"}).Error; err != nil {
				return err
			}
			return outbox.Enqueue(tx, outbox.Message{
				Topic: "accounts", Key: "ada", Payload: []byte{0, 1, 2, 255},
				Headers: map[string]string{"type": "account.opened"},
			})
		})
		if err != nil {
			t.Fatal(err)
		}
		msgs := messages(t, db)
		if len(msgs) != 1 {
			t.Fatalf("%d messages, want 1", len(msgs))
		}
		m := msgs[0]
		if m.ID.Version() != 7 {
			t.Errorf("id %s is UUID version %d, want 7", m.ID, m.ID.Version())
		}
		if m.Topic != "accounts" || m.Key != "ada" || string(m.Payload) != "\x00\x01\x02\xff" || m.Headers["type"] != "account.opened" {
			t.Errorf("stored %+v", m)
		}
		if m.State != outbox.StatePending || m.Attempts != 0 || m.LastError != "" || m.PublishedAt != nil || m.ClaimToken != nil {
			t.Errorf("new message is not plainly pending: %+v", m)
		}
		if m.CreatedAt.Before(before) || m.NextAttemptAt.Before(before) || m.CreatedAt.After(time.Now()) {
			t.Errorf("created_at %v next_attempt_at %v", m.CreatedAt, m.NextAttemptAt)
		}
	})
}

// sqlRecorder is a GORM logger that keeps every statement, to count them.
type sqlRecorder struct {
	logger.Interface
	mu   sync.Mutex
	stmt []string
}

func (r *sqlRecorder) Trace(_ context.Context, _ time.Time, fc func() (string, int64), _ error) {
	sql, _ := fc()
	r.mu.Lock()
	r.stmt = append(r.stmt, sql)
	r.mu.Unlock()
}

func (r *sqlRecorder) inserts(table string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, s := range r.stmt {
		if strings.HasPrefix(s, "/*") { // the outbox's mark for PipelinedPgx
			s = strings.TrimSpace(s[strings.Index(s, "*/")+2:])
		}
		if strings.HasPrefix(s, "INSERT INTO") && strings.Contains(s, table) {
			n++
		}
	}
	return n
}

func TestEnqueueManyIsOneStatement(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		rec := &sqlRecorder{Interface: logger.Discard}
		tdb := db.Session(&gorm.Session{Logger: rec})
		msgs := make([]outbox.Message, 500)
		for i := range msgs {
			msgs[i] = outbox.Message{Topic: "bulk", Key: fmt.Sprint(i % 10), Payload: fmt.Sprint(i)}
		}
		if err := tdb.Transaction(func(tx *gorm.DB) error { return outbox.Enqueue(tx, msgs...) }); err != nil {
			t.Fatal(err)
		}
		if n := rec.inserts(outbox.DefaultTableName); n != 1 {
			t.Fatalf("500 messages took %d INSERTs, want 1", n)
		}
		// Past one statement's parameter budget it splits, and loses nothing.
		big := make([]outbox.Message, 2500)
		for i := range big {
			big[i] = outbox.Message{Topic: "bulk", Payload: "x"}
		}
		if err := db.Transaction(func(tx *gorm.DB) error { return outbox.Enqueue(tx, big...) }); err != nil {
			t.Fatal(err)
		}
		if n := count(t, db, outbox.DefaultTableName); n != 3000 {
			t.Fatalf("%d messages, want 3000", n)
		}
	})
}

// With GORM's PrepareStmt the transaction's connection is GORM's statement
// cache, which the enqueue's INSERT goes through like any other statement.
func TestEnqueueWithPreparedStatements(t *testing.T) {
	for _, d := range databases {
		t.Run(d.name, func(t *testing.T) {
			db := setup(t, d.open(t, &gorm.Config{PrepareStmt: true, Logger: logger.Discard}))
			for i := range 3 {
				err := db.Transaction(func(tx *gorm.DB) error {
					if err := tx.Create(&Account{Name: fmt.Sprint(i)}).Error; err != nil {
						return err
					}
					return outbox.Enqueue(tx, outbox.Message{Topic: "prepared", Key: "k", Payload: fmt.Sprint(i)})
				})
				if err != nil {
					t.Fatal(err)
				}
			}
			if n := count(t, db, outbox.DefaultTableName); n != 3 {
				t.Fatalf("%d messages, want 3", n)
			}
		})
	}
}

// GORM's DryRun builds statements without running them; Enqueue, which runs
// its INSERT on the connection itself, must not write either.
func TestEnqueueInDryRunWritesNothing(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		err := db.Transaction(func(tx *gorm.DB) error {
			return outbox.Enqueue(tx.Session(&gorm.Session{DryRun: true}), outbox.Message{Topic: "dry", Payload: "x"})
		})
		if err != nil {
			t.Fatal(err)
		}
		if n := count(t, db, outbox.DefaultTableName); n != 0 {
			t.Fatalf("a DryRun enqueue wrote %d messages", n)
		}
	})
}

func TestEnqueueRollbackAndSavepoints(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		enqueue := func(tx *gorm.DB, key string) error {
			return outbox.Enqueue(tx, outbox.Message{Topic: "nested", Key: key, Payload: key})
		}
		_ = db.Transaction(func(tx *gorm.DB) error {
			if err := enqueue(tx, "rolled-back"); err != nil {
				return err
			}
			return errors.New("roll back")
		})
		err := db.Transaction(func(tx *gorm.DB) error {
			if err := enqueue(tx, "outer-1"); err != nil {
				return err
			}
			_ = tx.Transaction(func(tx2 *gorm.DB) error { // a savepoint, rolled back
				if err := enqueue(tx2, "inner-rolled-back"); err != nil {
					return err
				}
				return errors.New("undo the savepoint")
			})
			if err := tx.Transaction(func(tx2 *gorm.DB) error { return enqueue(tx2, "inner-kept") }); err != nil {
				return err
			}
			return enqueue(tx, "outer-2")
		})
		if err != nil {
			t.Fatal(err)
		}
		var keys []string
		for _, m := range messages(t, db) {
			keys = append(keys, m.Key)
		}
		if got := strings.Join(keys, ","); got != "outer-1,inner-kept,outer-2" {
			t.Fatalf("messages = %s, want outer-1,inner-kept,outer-2 in that order", got)
		}
	})
}

type point struct{ X, Y int }

func TestEnqueuePayloadEncoding(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		err := db.Transaction(func(tx *gorm.DB) error {
			return outbox.Enqueue(tx,
				outbox.Message{Topic: "p", Key: "bytes", Payload: []byte(`{"raw":true}`)},
				outbox.Message{Topic: "p", Key: "string", Payload: "plain text"},
				outbox.Message{Topic: "p", Key: "struct", Payload: point{1, 2}},
				outbox.Message{Topic: "p", Key: "empty", Payload: []byte{}},
			)
		})
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]string{}
		for _, m := range messages(t, db) {
			got[m.Key] = string(m.Payload)
		}
		want := map[string]string{"bytes": `{"raw":true}`, "string": "plain text", "struct": `{"X":1,"Y":2}`, "empty": ""}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("payloads %v, want %v", got, want)
		}
	})
	t.Run("custom encoder", func(t *testing.T) {
		db := setup(t, databases[1].open(t, nil), outbox.WithEncoder(outbox.EncoderFunc(func(p any) ([]byte, error) {
			return []byte(fmt.Sprintf("%v", p)), nil
		})))
		if err := db.Transaction(func(tx *gorm.DB) error {
			return outbox.Enqueue(tx, outbox.Message{Topic: "p", Payload: point{3, 4}})
		}); err != nil {
			t.Fatal(err)
		}
		if p := string(messages(t, db)[0].Payload); p != "{3 4}" {
			t.Fatalf("payload %q, want the custom encoding", p)
		}
	})
}

func TestEnqueueRefusesBadInputAndRollsBackWhole(t *testing.T) {
	cases := []struct {
		name string
		msg  outbox.Message
		want string
	}{
		{"empty topic", outbox.Message{Topic: "", Payload: "x"}, "topic is empty"},
		{"topic with a space", outbox.Message{Topic: "orders created", Payload: "x"}, "Kafka allows only"},
		{"topic with a slash", outbox.Message{Topic: "orders/created", Payload: "x"}, "Kafka allows only"},
		{"topic with a non-ASCII letter", outbox.Message{Topic: "commandé", Payload: "x"}, "Kafka allows only"},
		{"topic too long", outbox.Message{Topic: strings.Repeat("t", 250), Payload: "x"}, "at most 249"},
		{"topic dot", outbox.Message{Topic: "..", Payload: "x"}, "not allowed"},
		{"payload the encoder refuses", outbox.Message{Topic: "t", Payload: math.Inf(1)}, "cannot encode payload"},
		{"payload of a channel", outbox.Message{Topic: "t", Payload: make(chan int)}, "cannot encode payload"},
		{"nil payload", outbox.Message{Topic: "t", Payload: nil}, "payload is nil"},
		{"key too long", outbox.Message{Topic: "t", Key: strings.Repeat("k", 256), Payload: "x"}, "at most 255"},
		{"empty header key", outbox.Message{Topic: "t", Payload: "x", Headers: map[string]string{"": "v"}}, "header with an empty key"},
		{"payload over the maximum", outbox.Message{Topic: "t", Payload: strings.Repeat("x", 1025)}, "over the maximum of 1024"},
	}
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		for _, c := range cases {
			err := db.Transaction(func(tx *gorm.DB) error {
				if err := tx.Create(&Account{Name: c.name}).Error; err != nil {
					return err
				}
				// A good message first: it must roll back with the rest.
				if err := outbox.Enqueue(tx, outbox.Message{Topic: "ok", Payload: "fine"}); err != nil {
					return err
				}
				return outbox.Enqueue(tx, outbox.Message{Topic: "ok", Payload: "also fine"}, c.msg)
			})
			if err == nil || !strings.Contains(err.Error(), c.want) || !strings.HasPrefix(err.Error(), "outbox: ") {
				t.Errorf("%s: err = %v, want one containing %q", c.name, err, c.want)
			}
		}
		if n := count(t, db, "accounts"); n != 0 {
			t.Errorf("%d accounts survived refused transactions", n)
		}
		if n := count(t, db, outbox.DefaultTableName); n != 0 {
			t.Errorf("%d messages survived refused transactions", n)
		}
		// At the limits, it is accepted.
		err := db.Transaction(func(tx *gorm.DB) error {
			return outbox.Enqueue(tx, outbox.Message{Topic: strings.Repeat("t", 249), Payload: strings.Repeat("x", 1024)},
				outbox.Message{Topic: "a-Z_0.9", Payload: "x", Headers: map[string]string{"k": ""}})
		})
		if err != nil {
			t.Fatalf("messages at the limits refused: %v", err)
		}
	}, outbox.WithMaxPayloadBytes(1024))
}

func TestEnqueueRefusesToRunWithoutTransaction(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		// A plain handle.
		if err := outbox.Enqueue(db, outbox.Message{Topic: "t", Payload: "x"}); !errors.Is(err, outbox.ErrNoTransaction) {
			t.Fatalf("Enqueue on a plain handle = %v, want ErrNoTransaction", err)
		}
		// A model hook under SkipDefaultTransaction: the row is not written either.
		nodb := db.Session(&gorm.Session{SkipDefaultTransaction: true})
		if err := nodb.Create(&Invoice{Amount: 1}).Error; !errors.Is(err, outbox.ErrNoTransaction) {
			t.Fatalf("hook without transaction = %v, want ErrNoTransaction", err)
		}
		o := &Order{}
		o.Place("no-tx")
		if err := nodb.Create(o).Error; !errors.Is(err, outbox.ErrNoTransaction) {
			t.Fatalf("recorded events without transaction = %v, want ErrNoTransaction", err)
		}
		if n := count(t, db, "orders"); n != 0 {
			t.Fatalf("the order was written although its events were refused")
		}
		if n := count(t, db, outbox.DefaultTableName); n != 0 {
			t.Fatalf("%d messages written without a transaction", n)
		}
		// A plain model is not affected.
		if err := nodb.Create(&Account{Name: "x"}).Error; err != nil {
			t.Fatal(err)
		}
	})
	t.Run("allowed", func(t *testing.T) {
		db := setup(t, databases[1].open(t, nil), outbox.AllowWithoutTransaction())
		if err := outbox.Enqueue(db, outbox.Message{Topic: "t", Payload: "x"}); err != nil {
			t.Fatal(err)
		}
		o := &Order{}
		o.Place("no-tx")
		if err := db.Session(&gorm.Session{SkipDefaultTransaction: true}).Create(o).Error; err != nil {
			t.Fatal(err)
		}
		if n := count(t, db, outbox.DefaultTableName); n != 2 {
			t.Fatalf("%d messages, want 2", n)
		}
	})
	t.Run("plugin not registered", func(t *testing.T) {
		db := databases[1].open(t, nil)
		err := db.Transaction(func(tx *gorm.DB) error { return outbox.Enqueue(tx, outbox.Message{Topic: "t", Payload: "x"}) })
		if err == nil || !strings.Contains(err.Error(), "plugin is not registered") {
			t.Fatalf("err = %v", err)
		}
	})
}

func TestSaveToOutboxAsInTheDesignDocument(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		store, err := outbox.StoreOf(db)
		if err != nil {
			t.Fatal(err)
		}
		ctx := t.Context()
		err = db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
			if err := tx.Create(&Account{Name: "u1"}).Error; err != nil {
				return err
			}
			return outbox.SaveToOutbox(ctx, tx, store, "user.created", map[string]string{"name": "u1"}, nil)
		})
		if err != nil {
			t.Fatal(err)
		}
		err = db.Transaction(func(tx *gorm.DB) error {
			return outbox.SaveToOutbox(ctx, tx, store, "", "x", nil)
		})
		if err == nil || !strings.Contains(err.Error(), "topic is empty") {
			t.Fatalf("empty topic: %v", err)
		}
		msgs := messages(t, db)
		if len(msgs) != 1 || msgs[0].Topic != "user.created" || string(msgs[0].Payload) != `{"name":"u1"}` {
			t.Fatalf("messages = %+v", msgs)
		}
		// Store.Save itself, given no context, runs in the transaction's.
		now := time.Now()
		row := &outbox.OutboxMessage{ID: uuid.Must(uuid.NewV7()), Topic: "user.created", Payload: []byte("x"),
			State: outbox.StatePending, NextAttemptAt: now, CreatedAt: now}
		//nolint:staticcheck // SA1012: a nil context is what this checks
		if err := db.WithContext(ctx).Transaction(func(tx *gorm.DB) error { return store.Save(nil, tx, row) }); err != nil {
			t.Fatal(err)
		}
		if n := len(messages(t, db)); n != 2 {
			t.Fatalf("%d messages after Save with no context, want 2", n)
		}
	})
}

// A *gorm.DB that carries an error (a failed statement chained on it) writes
// nothing: Enqueue returns that error, as GORM's own Exec would, and the
// transaction it rolls back keeps neither the domain row nor the event.
func TestEnqueueOnAFailedStatementReturnsItsError(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		earlier := errors.New("an earlier statement failed")
		err := db.Transaction(func(tx *gorm.DB) error {
			if err := tx.Create(&Account{Name: "ada"}).Error; err != nil {
				return err
			}
			failed := tx.Session(&gorm.Session{})
			failed.AddError(earlier)
			return outbox.Enqueue(failed, outbox.Message{Topic: "accounts", Key: "ada", Payload: "x"})
		})
		if !errors.Is(err, earlier) {
			t.Fatalf("Enqueue on a *gorm.DB with an error: %v, want that error", err)
		}
		if n := count(t, db, outbox.DefaultTableName); n != 0 {
			t.Fatalf("%d messages after the rollback, want 0", n)
		}
		if n := count(t, db, "accounts"); n != 0 {
			t.Fatalf("%d accounts after the rollback, want 0", n)
		}
	})
}
