package mysql_test

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/internal/mysql"
	"github.com/gorm-outbox/outbox/internal/sqlstore"
)

// queue enqueues, in order, n messages per key in keys, one transaction
// each, and returns their ids in id order.
func queue(t *testing.T, db *gorm.DB, n int, keys ...string) []uuid.UUID {
	t.Helper()
	var ids []uuid.UUID
	for range n {
		for _, k := range keys {
			m := outbox.Message{Topic: "t", Key: k, Payload: "x"}
			if err := db.Transaction(func(tx *gorm.DB) error { return outbox.Enqueue(tx, m) }); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := db.Table(outbox.DefaultTableName).Order("id").Pluck("id", &ids).Error; err != nil {
		t.Fatal(err)
	}
	return ids
}

// claimedIDs is what a held claim of limit messages by s takes, given back
// at once.
func claimedIDs(t *testing.T, s *sqlstore.Store, limit int) []uuid.UUID {
	t.Helper()
	c, err := mysql.ClaimHeld(t.Context(), s, outbox.ClaimOptions{Limit: limit, Lease: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Abandon()
	var ids []uuid.UUID
	for _, m := range c.Messages() {
		ids = append(ids, m.ID)
	}
	slices.SortFunc(ids, func(a, b uuid.UUID) int { return strings.Compare(a.String(), b.String()) })
	return ids
}

// A publisher that deletes what it published begins its walks on the
// primary key (see FirstWalkFrom); it must pick what the walk of the
// pending index picks: the due messages of keys that hold nothing, past
// dead messages older than the queue and between its rows, and behind a
// key whose oldest message waits for its retry.
func TestADeletingPublishersWalkPicksWhatThePendingIndexWalkPicks(t *testing.T) {
	db := setup(t, 0)
	ids := queue(t, db, 40, "a", "b", "c", "d")
	set := func(state string, next time.Time, which ...uuid.UUID) {
		t.Helper()
		err := db.Table(outbox.DefaultTableName).Where("id IN ?", which).
			Updates(map[string]any{"state": state, "next_attempt_at": next}).Error
		if err != nil {
			t.Fatal(err)
		}
	}
	now := time.Now().UTC()
	set("dead", now, ids[:5]...)               // older than the queue
	set("dead", now, ids[9], ids[14])          // between its rows
	set("pending", now.Add(time.Hour), ids[5]) // b's oldest, waiting for its retry
	keeping := mysql.Open(db, sqlstore.Config{Table: outbox.DefaultTableName})
	deleting := deletingStore(t, db)
	// 100: more than the walk's first read finds, so that it reads on,
	// leaving b out.
	for _, limit := range []int{1, 3, 7, 100} {
		want, got := claimedIDs(t, keeping, limit), claimedIDs(t, deleting, limit)
		if len(want) == 0 || !slices.Equal(got, want) {
			t.Fatalf("limit %d: the deleting publisher's claim took %v, the pending index walk %v", limit, got, want)
		}
		if slices.Contains(got, ids[5]) || slices.Contains(got, ids[9]) {
			t.Fatalf("limit %d: claimed a row waiting for its retry or a dead one: %v", limit, got)
		}
	}
}

// Dead messages stay in the table, so a walk of the primary key from the
// table's first row to its last would read every one of them at each
// claim: it reads from the first pending row to the last.
func TestADeletingPublishersWalkSkipsDeadMessagesOutsideTheQueue(t *testing.T) {
	db := setup(t, 0)
	const dead = 1000
	dying := func() {
		t.Helper()
		msgs := make([]outbox.Message, dead)
		for i := range msgs {
			msgs[i] = outbox.Message{Topic: "t", Key: "poison", Payload: "x"}
		}
		if err := db.Transaction(func(tx *gorm.DB) error { return outbox.Enqueue(tx, msgs...) }); err != nil {
			t.Fatal(err)
		}
		if err := db.Table(outbox.DefaultTableName).Where("message_key = 'poison'").Update("state", "dead").Error; err != nil {
			t.Fatal(err)
		}
	}
	dying()
	queue(t, db, 10, "a")
	dying()
	deleting := deletingStore(t, db)
	walk, args := deleting.WalkSQL(false, 100)
	if read := explainKeys(t, db, walk, args); !strings.HasPrefix(read, "PRIMARY") {
		t.Fatalf("the deleting publisher's walk reads %q, want the primary key", read)
	}
	var examined int64
	err := db.Connection(func(conn *gorm.DB) error {
		var name string
		var before int64
		if err := conn.Raw("SHOW SESSION STATUS LIKE 'Handler_read_next'").Row().Scan(&name, &before); err != nil {
			return err
		}
		var rows []map[string]any
		if err := conn.Raw(walk, args...).Scan(&rows).Error; err != nil {
			return err
		}
		if len(rows) != 10 {
			return fmt.Errorf("the walk read %d pending rows, want 10", len(rows))
		}
		if err := conn.Raw("SHOW SESSION STATUS LIKE 'Handler_read_next'").Row().Scan(&name, &examined); err != nil {
			return err
		}
		examined -= before
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if examined > 100 {
		t.Fatalf("the walk read %d rows for 10 pending messages between %d dead ones on each side", examined, dead)
	}
}

// deletingStore is the store of a publisher that deletes what it
// published, which has checked the server, as a publisher does as it
// starts.
func deletingStore(t *testing.T, db *gorm.DB) *sqlstore.Store {
	t.Helper()
	s := mysql.Open(db, sqlstore.Config{Table: outbox.DefaultTableName, DeletePublished: true})
	if err := s.CheckServer(t.Context()); err != nil {
		t.Fatal(err)
	}
	return s
}

// explainKeys is MySQL's plan's "key" column, row after row.
func explainKeys(t *testing.T, db *gorm.DB, sql string, args []any) string {
	t.Helper()
	var plan []map[string]any
	if err := db.Raw("EXPLAIN "+sql, args...).Scan(&plan).Error; err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, row := range plan {
		keys = append(keys, fmt.Sprint(row["key"]))
	}
	return strings.Join(keys, " ")
}
