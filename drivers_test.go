package outbox_test

import (
	"strings"
	"testing"

	_ "github.com/lib/pq" // the other PostgreSQL driver, for the paths that do without pgx
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/internal/testdb"
)

var (
	postgresPipelined = testdb.PostgresPipelined
	postgresLibPQ     = testdb.PostgresLibPQ
)

// Through PipelinedPgx the enqueue's INSERT reaches PostgreSQL with the
// COMMIT: its error is the commit's, and nothing of the transaction stays.
func TestPipelinedPgxSendsTheEventWithTheCommit(t *testing.T) {
	db := setup(t, postgresPipelined(t, nil))
	sqlDB, err := db.DB()
	if err != nil {
		t.Fatal(err)
	}
	sqlDB.SetMaxOpenConns(1) // every transaction below on the same connection
	store, err := outbox.StoreOf(db)
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	if err := db.Transaction(func(tx *gorm.DB) error {
		if err := outbox.Enqueue(tx, outbox.Message{Topic: "t", Key: "k", Payload: "1"}); err != nil {
			return err
		}
		// The transaction reads its own event: the INSERT goes first.
		var n int64
		if err := tx.Table(outbox.DefaultTableName).Count(&n).Error; err != nil || n != 1 {
			t.Errorf("inside the transaction: %d events, %v", n, err)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	first := messages(t, db)[0]

	// The same id again: a duplicate key, which only the server can find.
	var saveErr error
	err = db.Transaction(func(tx *gorm.DB) error {
		if err := tx.Create(&Account{Name: "lost"}).Error; err != nil {
			return err
		}
		saveErr = store.Save(ctx, tx, &first)
		return saveErr
	})
	if saveErr != nil {
		t.Fatalf("Save did not leave its INSERT for the commit: %v", saveErr)
	}
	if err == nil || !strings.Contains(err.Error(), "duplicate key") {
		t.Fatalf("commit of a duplicate event: %v, want the duplicate key error", err)
	}
	var lost int64
	if err := db.Model(&Account{}).Where("name = ?", "lost").Count(&lost).Error; err != nil || lost != 0 {
		t.Fatalf("%d domain rows of the failed transaction committed (%v)", lost, err)
	}
	// The connection is usable again.
	if err := db.Transaction(func(tx *gorm.DB) error {
		return outbox.Enqueue(tx, outbox.Message{Topic: "t", Key: "k", Payload: "2"})
	}); err != nil {
		t.Fatal(err)
	}
	if n := len(messages(t, db)); n != 2 {
		t.Fatalf("%d events, want 2", n)
	}
}

// A statement prepared before, and run after an enqueue (GORM's PrepareStmt
// reuses them, a savepoint's among them), comes after the waiting INSERT.
func TestPipelinedPgxSendsWaitingStatementsBeforeAPreparedOne(t *testing.T) {
	db := postgresPipelined(t, nil)
	sqlDB, err := db.DB()
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	if _, err := sqlDB.ExecContext(ctx, "CREATE TABLE waits (v int)"); err != nil {
		t.Fatal(err)
	}
	tx, err := sqlDB.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	count, err := tx.PrepareContext(ctx, "SELECT count(*) FROM waits")
	if err != nil {
		t.Fatal(err)
	}
	defer count.Close()
	if _, err := tx.ExecContext(ctx, outbox.WaitMark+"INSERT INTO waits VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	var n int
	if err := count.QueryRowContext(ctx).Scan(&n); err != nil || n != 1 {
		t.Fatalf("a prepared statement after a waiting INSERT counted %d rows (%v), want 1", n, err)
	}
}
