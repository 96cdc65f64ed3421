package sqlstore_test

import (
	"testing"
	"time"

	"github.com/google/uuid"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/internal/core"
	"github.com/gorm-outbox/outbox/internal/mysql"
	"github.com/gorm-outbox/outbox/internal/postgres"
	"github.com/gorm-outbox/outbox/internal/sqlite"
	"github.com/gorm-outbox/outbox/internal/sqlstore"
	"github.com/gorm-outbox/outbox/outboxtest"
)

var databases = []struct {
	name string
	open func(testing.TB, *gorm.Config) *gorm.DB
	// store is the outbox table's store on db, as a process of its own has
	// it: its claims in flight are its own.
	store func(db *gorm.DB) *sqlstore.Store
}{
	{"postgres", outboxtest.Postgres, func(db *gorm.DB) *sqlstore.Store {
		return postgres.Open(db, sqlstore.Config{Table: outbox.DefaultTableName}, 0)
	}},
	{"mariadb", outboxtest.MariaDB, func(db *gorm.DB) *sqlstore.Store {
		return mysql.Open(db, sqlstore.Config{Table: outbox.DefaultTableName})
	}},
	{"sqlite", outboxtest.SQLite, func(db *gorm.DB) *sqlstore.Store {
		return sqlite.Open(db, sqlstore.Config{Table: outbox.DefaultTableName})
	}},
}

func noGuard(*gorm.DB) error { return nil }

// An exactly-once claim walks before its turn. A process that claims the
// same rows in between (here, between the walk and the turn of another
// process's claim) must leave that claim with nothing: neither the rows it
// holds (sent twice) nor the later message of their key (sent out of order).
func TestGuardedClaimTakesNothingThatAnotherProcessClaimedAfterItsWalk(t *testing.T) {
	for _, d := range databases {
		t.Run(d.name, func(t *testing.T) {
			db := d.open(t, nil)
			if err := db.Use(outbox.Plugin()); err != nil {
				t.Fatal(err)
			}
			for _, payload := range []string{"first", "second"} {
				err := db.Transaction(func(tx *gorm.DB) error {
					return outbox.Enqueue(tx, outbox.Message{Topic: "orders", Key: "k", Payload: []byte(payload)})
				})
				if err != nil {
					t.Fatal(err)
				}
			}
			a, b := d.store(db), d.store(db)
			opts := core.ClaimOptions{Limit: 10, Lease: time.Hour}
			var taken []*core.OutboxMessage
			sqlstore.AfterGuardedWalk(a, func() {
				var err error
				// One message only: the other is behind it, on the same key.
				taken, err = b.ClaimGuarded(t.Context(), "b-token", core.ClaimOptions{Limit: 1, Lease: time.Hour}, noGuard)
				if err != nil {
					t.Errorf("the other process's claim: %v", err)
				}
			})
			got, err := a.ClaimGuarded(t.Context(), "a-token", opts, noGuard)
			if len(taken) != 1 || string(taken[0].Payload) != "first" {
				t.Fatalf("the other process claimed %d messages, want the first one", len(taken))
			}
			for _, m := range got {
				t.Errorf("claimed %q, which the other process holds or which waits behind it", m.Payload)
			}
			if err != nil && len(got) > 0 {
				t.Fatal(err)
			}
			// Once the other process is done with the first, the second goes.
			if err := b.SettleIDs(db, "b-token", []uuid.UUID{taken[0].ID}, true); err != nil {
				t.Fatal(err)
			}
			sqlstore.AfterGuardedWalk(a, nil)
			got, err = a.ClaimGuarded(t.Context(), "a-token-2", opts, noGuard)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != 1 || string(got[0].Payload) != "second" {
				t.Fatalf("after the first was published, claimed %d messages, want the second", len(got))
			}
		})
	}
}

// Two claims of one process: the second walks while the first, which
// picked the oldest message of k1, waits for its turn. A transaction of
// the second's batch has a later message of k1: the second claim must not
// take the first's message to complete it (claims would take each other's
// rows, and batches grow without bound); the transaction waits.
func TestGuardedClaimLeavesRowsItsProcessHasInFlight(t *testing.T) {
	for _, d := range databases {
		t.Run(d.name, func(t *testing.T) {
			db := d.open(t, nil)
			if err := db.Use(outbox.Plugin()); err != nil {
				t.Fatal(err)
			}
			commit := func(msgs ...outbox.Message) {
				t.Helper()
				if err := db.Transaction(func(tx *gorm.DB) error { return outbox.Enqueue(tx, msgs...) }); err != nil {
					t.Fatal(err)
				}
			}
			commit(outbox.Message{Topic: "orders", Key: "k1", Payload: []byte("alone")})
			commit(outbox.Message{Topic: "orders", Key: "k2", Payload: []byte("group-k2")},
				outbox.Message{Topic: "orders", Key: "k1", Payload: []byte("group-k1")})
			s := d.store(db)
			var second []*core.OutboxMessage
			sqlstore.AfterGuardedWalk(s, func() {
				sqlstore.AfterGuardedWalk(s, nil)
				var err error
				second, err = s.ClaimGuarded(t.Context(), "second", core.ClaimOptions{Limit: 10, Lease: time.Hour}, noGuard)
				if err != nil {
					t.Errorf("the second claim: %v", err)
				}
			})
			first, err := s.ClaimGuarded(t.Context(), "first", core.ClaimOptions{Limit: 1, Lease: time.Hour}, noGuard)
			if err != nil {
				t.Fatal(err)
			}
			for _, m := range second {
				t.Errorf("the second claim took %q", m.Payload)
			}
			if len(first) != 1 || string(first[0].Payload) != "alone" {
				t.Fatalf("the first claim took %d messages, want the one it picked", len(first))
			}
		})
	}
}
