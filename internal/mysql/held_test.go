package mysql_test

import (
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/internal/mysql"
	"github.com/gorm-outbox/outbox/internal/sqlstore"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// setup is a MariaDB database of the test's own with the plugin registered
// and n messages enqueued, one key each.
func setup(t *testing.T, n int) *gorm.DB {
	t.Helper()
	db := outboxtest.MariaDB(t, nil)
	if err := db.Use(outbox.Plugin()); err != nil {
		t.Fatal(err)
	}
	err := db.Transaction(func(tx *gorm.DB) error {
		for i := range n {
			if err := outbox.Enqueue(tx, outbox.Message{Topic: "t", Key: string(rune('a' + i)), Payload: "x"}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return db
}

// newStore is a store of the outbox table, as another publisher process
// would have.
func newStore(db *gorm.DB) *sqlstore.Store {
	return mysql.Open(db, sqlstore.Config{Table: outbox.DefaultTableName})
}

// A held claim shortens its connection's wait_timeout to the lease, so
// that the server ends the claim of a publisher that stops answering; the
// connection goes back to the pool with the session's own value (one the
// DSN set, here).
func TestHeldClaimPutsTheConnectionsTimeoutBack(t *testing.T) {
	db := setup(t, 3)
	sqlDB, err := db.DB()
	if err != nil {
		t.Fatal(err)
	}
	sqlDB.SetMaxOpenConns(1) // the claim's connection is the one read below
	const own = 1234
	if err := db.Exec("SET SESSION wait_timeout = ?", own).Error; err != nil {
		t.Fatal(err)
	}
	c, err := mysql.ClaimHeld(t.Context(), newStore(db), outbox.ClaimOptions{Limit: 10, Lease: 7 * time.Second})
	if err != nil || len(c.Messages()) != 3 {
		t.Fatalf("claim: %v", err)
	}
	var during int
	if err := c.Tx().Raw("SELECT @@SESSION.wait_timeout").Scan(&during).Error; err != nil {
		t.Fatal(err)
	}
	if err := c.Finish(nil, []outbox.Failure{{ID: c.Messages()[0].ID, Err: "x", NextAttemptAt: time.Now()}}); err != nil {
		t.Fatal(err)
	}
	var after int
	if err := db.Raw("SELECT @@SESSION.wait_timeout").Scan(&after).Error; err != nil {
		t.Fatal(err)
	}
	if during != 7 || after != own {
		t.Fatalf("wait_timeout during the claim %d (want 7), after it %d (want the session's %d)", during, after, own)
	}
}

// A publisher that stops answering (here: a claim never finished) holds
// its rows for the lease, then the server closes its connection and
// another publisher takes them.
func TestAnAbandonedHeldClaimEndsAfterTheLease(t *testing.T) {
	db := setup(t, 2)
	held, err := mysql.ClaimHeld(t.Context(), newStore(db), outbox.ClaimOptions{Limit: 10, Lease: time.Second})
	if err != nil || len(held.Messages()) != 2 {
		t.Fatalf("claim: %v", err)
	}
	other := newStore(db)
	c, err := mysql.ClaimHeld(t.Context(), other, outbox.ClaimOptions{Limit: 10, Lease: time.Minute})
	if err != nil || len(c.Messages()) != 0 {
		t.Fatalf("another publisher's claim while the rows are held: %d messages, %v; want none", len(c.Messages()), err)
	}
	c.Abandon()
	deadline := time.Now().Add(15 * time.Second)
	for {
		c, err := mysql.ClaimHeld(t.Context(), other, outbox.ClaimOptions{Limit: 10, Lease: time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		n := len(c.Messages())
		c.Abandon()
		if n == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the abandoned claim's rows were still held 15 s after its lease of 1 s")
		}
		time.Sleep(200 * time.Millisecond)
	}
	held.Abandon() // its connection is gone: nothing to roll back
}

// The exactly-once claims' turn (a named lock) is taken only by a claim
// whose transaction groups reach beyond its batch.
func TestExactlyOnceClaimTakesTheTurnOnlyForGroupsBeyondItsBatch(t *testing.T) {
	db := setup(t, 2) // two one-message transactions
	s := newStore(db)
	sqlDB, err := db.DB()
	if err != nil {
		t.Fatal(err)
	}
	other, err := sqlDB.Conn(t.Context()) // another process, in its turn
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	var got int
	if err := other.QueryRowContext(t.Context(), "SELECT GET_LOCK(?, 0)", mysql.WholeTurnName(s)).Scan(&got); err != nil || got != 1 {
		t.Fatalf("taking the turn: %d, %v", got, err)
	}
	c, err := mysql.ClaimWhole(t.Context(), s, outbox.ClaimOptions{Limit: 10, Lease: time.Minute})
	if err != nil || len(c.Messages()) != 2 {
		t.Fatalf("a claim of one-message transactions beside the turn's holder: %v", err)
	}
	c.Abandon()
	if err := db.Transaction(func(tx *gorm.DB) error {
		return outbox.Enqueue(tx, outbox.Message{Topic: "t", Key: "g", Payload: "1"}, outbox.Message{Topic: "t", Key: "g", Payload: "2"})
	}); err != nil {
		t.Fatal(err)
	}
	type claimed struct {
		n   int
		err error
	}
	out := make(chan claimed, 1)
	go func() {
		// Limit 3: the two one-message transactions and half of the group.
		c, err := mysql.ClaimWhole(t.Context(), s, outbox.ClaimOptions{Limit: 3, Lease: time.Minute})
		if err != nil {
			out <- claimed{err: err}
			return
		}
		out <- claimed{n: len(c.Messages())}
		c.Abandon()
	}()
	select {
	case r := <-out:
		t.Fatalf("a claim whose group reaches beyond its batch claimed %d messages without the turn: %v", r.n, r.err)
	case <-time.After(500 * time.Millisecond):
	}
	if _, err := other.ExecContext(t.Context(), "SELECT RELEASE_LOCK(?)", mysql.WholeTurnName(s)); err != nil {
		t.Fatal(err)
	}
	if r := <-out; r.err != nil || r.n != 4 {
		t.Fatalf("claimed %d messages once the turn was free, want all 4: %v", r.n, r.err)
	}
}
