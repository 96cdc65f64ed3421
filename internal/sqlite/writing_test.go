package sqlite

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	gsqlite "github.com/glebarez/sqlite"
	"github.com/google/uuid"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/gorm-outbox/outbox/internal/sqlstore"
)

// On SQLite the store's writes take turns in the process; one waiting for
// its turn must give up when its context ends, as a stopping publisher's
// does.
func TestWriteTurnHonoursTheContext(t *testing.T) {
	db, err := gorm.Open(gsqlite.Open(filepath.Join(t.TempDir(), "turn.db")), &gorm.Config{Logger: logger.Discard})
	if err != nil {
		t.Fatal(err)
	}
	store := Open(db, sqlstore.Config{Table: "outbox_messages"})
	if err := store.Migrate(t.Context()); err != nil {
		t.Fatal(err)
	}
	done, err := store.Dialect().(*dialect).writing(t.Context()) // another write's turn
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	result := make(chan error, 1)
	go func() { result <- store.MarkPublished(ctx, "token", []uuid.UUID{uuid.New()}) }()
	select {
	case err := <-result:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("a write waiting for its turn past its context's deadline returned %v", err)
		}
	case <-time.After(5 * time.Second):
		done()
		t.Fatal("a write waited for its turn after its context ended")
	}
	done()
	if err := store.MarkPublished(t.Context(), "token", []uuid.UUID{uuid.New()}); err != nil {
		t.Fatalf("after the turn ended: %v", err)
	}
}
