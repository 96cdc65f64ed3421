package outbox_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// age rewrites when a message was created (and published), as if time had passed.
func age(t *testing.T, db *gorm.DB, key string, by time.Duration) {
	t.Helper()
	var msgs []outbox.OutboxMessage
	if err := db.Table(outbox.DefaultTableName).Where("message_key = ?", key).Find(&msgs).Error; err != nil {
		t.Fatal(err)
	}
	for _, m := range msgs {
		upd := map[string]any{"created_at": m.CreatedAt.Add(-by).UTC()}
		if m.PublishedAt != nil {
			upd["published_at"] = m.PublishedAt.Add(-by).UTC()
		}
		if err := db.Table(outbox.DefaultTableName).Where("id = ?", m.ID).Updates(upd).Error; err != nil {
			t.Fatal(err)
		}
	}
}

func setState(t *testing.T, db *gorm.DB, key string, s outbox.State) {
	t.Helper()
	upd := map[string]any{"state": s}
	if s == outbox.StatePublished {
		upd["published_at"] = time.Now().UTC()
	}
	if err := db.Table(outbox.DefaultTableName).Where("message_key = ?", key).Updates(upd).Error; err != nil {
		t.Fatal(err)
	}
}

func enqueueKey(t *testing.T, db *gorm.DB, key string, n int) {
	t.Helper()
	err := db.Transaction(func(tx *gorm.DB) error {
		for i := range n {
			if err := outbox.Enqueue(tx, outbox.Message{Topic: "r", Key: key, Payload: fmt.Sprint(i)}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestCleanupDeletesOnlyOldFinishedMessages(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		store, _ := outbox.StoreOf(db)
		enqueueKey(t, db, "old-published", 25)
		setState(t, db, "old-published", outbox.StatePublished)
		age(t, db, "old-published", 8*24*time.Hour)
		enqueueKey(t, db, "new-published", 3)
		setState(t, db, "new-published", outbox.StatePublished)
		enqueueKey(t, db, "old-pending", 4) // never delivered: never deleted
		age(t, db, "old-pending", 30*24*time.Hour)
		enqueueKey(t, db, "old-dead", 2)
		setState(t, db, "old-dead", outbox.StateDead)
		age(t, db, "old-dead", 30*24*time.Hour)

		var progress []int64
		n, err := store.Cleanup(context.Background(), outbox.RetentionPolicy{Published: 7 * 24 * time.Hour, BatchSize: 10},
			func(total int64) { progress = append(progress, total) })
		if err != nil || n != 25 {
			t.Fatalf("deleted %d, %v; want the 25 old published", n, err)
		}
		if fmt.Sprint(progress) != "[10 20 25]" {
			t.Errorf("progress %v, want batches of 10", progress)
		}
		left := map[string]int{}
		for _, m := range messages(t, db) {
			left[m.Key]++
		}
		if fmt.Sprint(left) != "map[new-published:3 old-dead:2 old-pending:4]" {
			t.Fatalf("left %v", left)
		}
		// Dead ones go only when the policy says so.
		n, err = store.Cleanup(context.Background(), outbox.RetentionPolicy{Dead: 14 * 24 * time.Hour}, nil)
		if err != nil || n != 2 {
			t.Fatalf("dead cleanup deleted %d, %v", n, err)
		}
		if c := count(t, db, outbox.DefaultTableName, "state = ?", outbox.StatePending); c != 4 {
			t.Fatalf("%d pending left, want 4", c)
		}
	})
}

func TestCleanupRunsOneAtATime(t *testing.T) {
	eachDBWith(t, func(f features) bool { return f.processes }, func(t *testing.T, db *gorm.DB) {
		store, _ := outbox.StoreOf(db)
		enqueueKey(t, db, "p", 5)
		setState(t, db, "p", outbox.StatePublished)
		age(t, db, "p", 8*24*time.Hour)
		// Another process's cleanup holds the lock: this one skips its turn.
		release, err := outbox.HoldCleanupLock(store)
		if err != nil {
			t.Fatalf("holding the cleanup lock: %v", err)
		}
		_, err = store.Cleanup(context.Background(), outbox.RetentionPolicy{}, nil)
		release()
		if !errors.Is(err, outbox.ErrCleanupRunning) {
			t.Fatalf("cleanup under another's lock = %v, want ErrCleanupRunning", err)
		}
		if n, err := store.Cleanup(context.Background(), outbox.RetentionPolicy{}, nil); err != nil || n != 5 {
			t.Fatalf("after the lock was released: %d, %v", n, err)
		}
	})
}

func TestPublisherRunsTheCleanup(t *testing.T) {
	db := setup(t, outboxtest.SQLite(t, nil))
	enqueueKey(t, db, "old", 3)
	setState(t, db, "old", outbox.StatePublished)
	age(t, db, "old", time.Hour)
	pub, err := outbox.NewPublisher(db, outbox.SenderFunc(func(context.Context, []*outbox.OutboxMessage) error { return nil }),
		outbox.WithLogger(discardLogger()), outbox.WithRetention(outbox.RetentionPolicy{Published: time.Minute}, 20*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	if err := pub.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = pub.Stop(context.Background()) }()
	waitFor(t, "the scheduled cleanup", func() bool { return count(t, db, outbox.DefaultTableName) == 0 })
}

func TestStatsFindStuckMessages(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		store, _ := outbox.StoreOf(db)
		st, err := store.Stats(context.Background(), 3)
		if err != nil || st.OldestPendingAge != 0 || len(st.Counts) != 0 {
			t.Fatalf("empty table: %+v, %v", st, err)
		}
		enqueueKey(t, db, "a", 2)
		age(t, db, "a", time.Hour)
		enqueueKey(t, db, "b", 1)
		enqueueKey(t, db, "dead", 1)
		setState(t, db, "dead", outbox.StateDead)
		db.Table(outbox.DefaultTableName).Where("message_key = ?", "dead").Update("attempts", 3)
		db.Table(outbox.DefaultTableName).Where("message_key = ?", "b").Update("attempts", 1)
		// A claim whose lease ran out: its publisher died.
		if _, _, err := store.Claim(context.Background(), outbox.ClaimOptions{Limit: 1, Lease: time.Millisecond}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(5 * time.Millisecond)
		st, err = store.Stats(context.Background(), 3)
		if err != nil {
			t.Fatal(err)
		}
		if st.Counts[outbox.StatePending] != 3 || st.Counts[outbox.StateDead] != 1 {
			t.Errorf("counts %v", st.Counts)
		}
		if st.OldestPendingAge < 59*time.Minute || st.OldestPendingAge > 61*time.Minute {
			t.Errorf("oldest pending age %v, want about an hour", st.OldestPendingAge)
		}
		if st.Retrying != 1 || st.OverBudget != 1 || st.ExpiredClaims != 1 {
			t.Errorf("retrying %d over budget %d expired claims %d, want 1 each", st.Retrying, st.OverBudget, st.ExpiredClaims)
		}
	})
}
