package outbox_test

import (
	"cmp"
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
)

// A claim stamps what its walk picked; a row that changed in between (here
// published by another connection, as the late result of a claim that had
// expired would be) is not stamped, and the claim must not return it. The
// change is injected by a GORM callback on the walk's read: there is no
// other way to land a write between the two statements.
func TestClaimReturnsOnlyWhatItStamped(t *testing.T) {
	eachDBWith(t, func(f features) bool { return f.processes }, func(t *testing.T, db *gorm.DB) {
		store, _ := outbox.StoreOf(db)
		ctx := t.Context()
		err := db.Transaction(func(tx *gorm.DB) error {
			return outbox.Enqueue(tx,
				outbox.Message{Topic: "t", Key: "a", Payload: "first"},
				outbox.Message{Topic: "t", Key: "b", Payload: "second"},
				outbox.Message{Topic: "t", Key: "c", Payload: "third"})
		})
		if err != nil {
			t.Fatal(err)
		}
		other := db.Session(&gorm.Session{NewDB: true})
		var injected atomic.Bool
		err = db.Callback().Row().After("gorm:row").Register("test:publish_behind_the_walk", func(tx *gorm.DB) {
			if !strings.Contains(tx.Statement.SQL.String(), "CASE WHEN") || injected.Swap(true) {
				return
			}
			// Another connection: the claim's transaction is still open.
			if err := other.Exec("UPDATE "+outbox.DefaultTableName+" SET state = 'published' WHERE payload = ?", []byte("second")).Error; err != nil {
				t.Errorf("injecting the change: %v", err)
			}
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = db.Callback().Row().Remove("test:publish_behind_the_walk") })

		token, msgs, err := store.Claim(ctx, outbox.ClaimOptions{Limit: 10, Lease: time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		if !injected.Load() {
			t.Fatal("the walk's read did not run through the row callback; the test injected nothing")
		}
		if got := keysOf(msgs); got != "a:first c:third" {
			t.Fatalf("claim returned %q, want only the rows it stamped: a:first c:third", got)
		}
		for _, m := range msgs {
			if m.ClaimToken == nil || *m.ClaimToken != token || !m.NextAttemptAt.After(time.Now()) {
				t.Errorf("message %s: token %v next attempt %v, want the claim's token and lease", m.Key, m.ClaimToken, m.NextAttemptAt)
			}
		}
	})
}

// A transaction that has enqueued and stays open holds its new row's lock.
// Recording the results of a batch whose ids lie on both sides of that row
// must not wait for it: on MariaDB under REPEATABLE READ it did, for as
// long as the transaction stayed open, and a lease ran out meanwhile.
func TestRecordingDoesNotWaitForAnOpenEnqueuingTransaction(t *testing.T) {
	eachDBWith(t, func(f features) bool { return f.processes }, func(t *testing.T, db *gorm.DB) {
		store, _ := outbox.StoreOf(db)
		recordBesideAnOpenEnqueue(t, db, func(ctx context.Context) (int, error) {
			token, msgs, err := store.Claim(t.Context(), outbox.ClaimOptions{Limit: 50, Lease: time.Minute})
			if err != nil {
				return 0, err
			}
			return len(msgs), store.MarkPublished(ctx, token, idsOf(msgs))
		})
	})
}

// recordBesideAnOpenEnqueue commits 25 messages, opens a transaction that
// enqueues one and stays open, commits 100 more, and runs claimAndRecord,
// which must claim 50 messages (25 on each side of the open one) and record
// them published without waiting for the open transaction.
func recordBesideAnOpenEnqueue(t *testing.T, db *gorm.DB, claimAndRecord func(ctx context.Context) (claimed int, err error)) {
	t.Helper()
	enqueueN(t, db, "t", 25)
	open, release := make(chan struct{}), make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- db.Transaction(func(tx *gorm.DB) error {
			if err := outbox.Enqueue(tx, outbox.Message{Topic: "t", Key: "open", Payload: "x"}); err != nil {
				return err
			}
			close(open)
			<-release
			return nil
		})
	}()
	<-open
	enqueueN(t, db, "t", 100)
	// Far longer than the statements need; a wait for the open
	// transaction would last until release.
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	claimed, err := claimAndRecord(ctx)
	close(release)
	if err != nil || claimed != 50 {
		t.Fatalf("claiming 50 and recording them beside the open transaction: %d claimed, %v", claimed, err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if n := count(t, db, outbox.DefaultTableName, "state = ?", outbox.StatePublished); n != 50 {
		t.Fatalf("%d published, want 50", n)
	}
}

func idsOf(msgs []*outbox.OutboxMessage) []uuid.UUID {
	ids := make([]uuid.UUID, len(msgs))
	for i, m := range msgs {
		ids[i] = m.ID
	}
	return ids
}

// A row that another transaction has locked, for whatever reason, may be
// in a claim: a claim leaves it, and the rest of its key, for later. A
// claim that took the key's next message instead (as SKIP LOCKED over the
// queue does on InnoDB, which locks the rows a statement merely scans)
// would send it first; one that waited for the lock would stall its
// publisher. Both the publisher's claim and Store.Claim are held to it.
func TestClaimsLeaveAKeyWhoseOldestRowIsLocked(t *testing.T) {
	eachDBWith(t, func(f features) bool { return f.processes }, func(t *testing.T, db *gorm.DB) {
		store, _ := outbox.StoreOf(db)
		err := db.Transaction(func(tx *gorm.DB) error {
			return outbox.Enqueue(tx,
				outbox.Message{Topic: "t", Key: "a", Payload: "1"},
				outbox.Message{Topic: "t", Key: "a", Payload: "2"},
				outbox.Message{Topic: "t", Key: "b", Payload: "1"})
		})
		if err != nil {
			t.Fatal(err)
		}
		oldest := messages(t, db)[0]
		locked, release := make(chan error, 1), make(chan struct{})
		go func() {
			locked <- db.Transaction(func(tx *gorm.DB) error {
				var id []byte
				if err := tx.Raw("SELECT id FROM "+outbox.DefaultTableName+" WHERE id = ? FOR UPDATE", oldest.ID).Row().Scan(&id); err != nil {
					return err
				}
				locked <- nil
				<-release
				return nil
			})
		}()
		if err := <-locked; err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		defer cancel()
		msgs, _, end, err := outbox.ClaimBatch(ctx, store, outbox.ClaimOptions{Limit: 10, Lease: time.Minute})
		if err != nil {
			close(release)
			t.Fatalf("publisher's claim beside a locked row: %v", err)
		}
		got := keysOf(msgs)
		end()
		_, leased, err := store.Claim(ctx, outbox.ClaimOptions{Limit: 10, Lease: time.Minute})
		close(release)
		if err != nil {
			t.Fatalf("Store.Claim beside a locked row: %v", err)
		}
		if got != "b:1" {
			t.Errorf("publisher's claim took %q with a:1 locked, want b:1", got)
		}
		if got := keysOf(leased); got != "b:1" {
			t.Errorf("Store.Claim took %q with a:1 locked, want b:1", got)
		}
		if err := <-locked; err != nil {
			t.Fatal(err)
		}
	})
}

// The publisher's claim records its results while a transaction that has
// enqueued stays open (see TestRecordingDoesNotWaitForAnOpenEnqueuingTransaction).
func TestPublisherClaimDoesNotWaitForAnOpenEnqueuingTransaction(t *testing.T) {
	eachDBWith(t, func(f features) bool { return f.processes }, func(t *testing.T, db *gorm.DB) {
		store, _ := outbox.StoreOf(db)
		recordBesideAnOpenEnqueue(t, db, func(ctx context.Context) (int, error) {
			msgs, record, end, err := outbox.ClaimBatch(ctx, store, outbox.ClaimOptions{Limit: 50, Lease: time.Minute})
			if err != nil {
				return 0, err
			}
			defer end()
			return len(msgs), record(idsOf(msgs), nil)
		})
	})
}

// A message committed a moment ago is due at once: the claim's clock, kept
// in milliseconds, must not leave it for the next poll.
func TestClaimTakesAMessageCommittedAMomentAgo(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		store, _ := outbox.StoreOf(db)
		for i := range 20 {
			err := db.Transaction(func(tx *gorm.DB) error {
				return outbox.Enqueue(tx, outbox.Message{Topic: "t", Key: fmt.Sprint("k", i), Payload: "x"})
			})
			if err != nil {
				t.Fatal(err)
			}
			token, msgs, err := store.Claim(t.Context(), outbox.ClaimOptions{Limit: 10, Lease: time.Minute})
			if err != nil || len(msgs) != 1 {
				t.Fatalf("claim %d right after the commit: %d messages, %v; want 1", i, len(msgs), err)
			}
			if err := store.MarkPublished(t.Context(), token, []uuid.UUID{msgs[0].ID}); err != nil {
				t.Fatal(err)
			}
		}
	})
}

// Past its first read, the walk leaves the rows of keys it already found
// busy in the database. Keys may hold any character.
func TestClaimWalkSkipsBusyKeysInTheDatabase(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		store, _ := outbox.StoreOf(db)
		odd := `we"ird,{key}\ 'x'`
		enqueue := func(key string, n int) {
			t.Helper()
			enqueueKeyed(t, db, "t", n, func(int) string { return key })
		}
		enqueue(odd, 1)
		if _, held, err := store.Claim(t.Context(), outbox.ClaimOptions{Limit: 1, Lease: time.Minute}); err != nil || len(held) != 1 {
			t.Fatalf("holding the odd key: %d, %v", len(held), err)
		}
		enqueue(odd, 200) // all behind the held one: busy
		enqueue("b", 3)

		// The exclusion itself, on this database.
		if n, err := outbox.CountKeysNotIn(store, odd); err != nil || n != 3 {
			t.Fatalf("rows whose key is not the odd one: %d, %v; want 3", n, err)
		}
		if n, err := outbox.CountKeysNotIn(store, "b", "unused"); err != nil || n != 201 {
			t.Fatalf("rows whose key is not b: %d, %v; want 201", n, err)
		}

		var excluding atomic.Int32
		err := db.Callback().Row().After("gorm:row").Register("test:see_exclusion", func(tx *gorm.DB) {
			sql := tx.Statement.SQL.String()
			if strings.Contains(sql, "CASE WHEN") && (strings.Contains(sql, "NOT IN") || strings.Contains(sql, "<> ALL")) {
				excluding.Add(1)
			}
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = db.Callback().Row().Remove("test:see_exclusion") })
		_, msgs, err := store.Claim(t.Context(), outbox.ClaimOptions{Limit: 10, Lease: time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		if got := keysOf(msgs); got != "b:m0 b:m1 b:m2" {
			t.Fatalf("claim behind a busy key took %q, want b:m0 b:m1 b:m2", got)
		}
		if excluding.Load() == 0 {
			t.Error("the walk read past its first window without leaving the busy key to the database")
		}
	})
}

// With the published rows of a busy day in front of a few pending ones,
// MariaDB's optimizer read "state = 'pending' ORDER BY id LIMIT n" along
// the primary key, through every published row (seconds a claim on a
// large table), instead of along the pending index. On every database the
// claim's walk, and Stats' search for the oldest pending message, must
// read the pending index.
func TestReadsOfPendingRowsUseThePendingIndex(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		enqueueN(t, db, "orders", 20000)
		// All but the newest 200 published, as a publisher that keeps
		// published rows leaves them; then fresh statistics.
		err := db.Exec("UPDATE outbox_messages SET state = 'published', published_at = created_at " +
			"WHERE id IN (SELECT id FROM (SELECT id FROM outbox_messages ORDER BY id LIMIT 19800) oldest)").Error
		if err != nil {
			t.Fatal(err)
		}
		analyze := map[string]string{"mysql": "ANALYZE TABLE outbox_messages"}[db.Dialector.Name()]
		if err := db.Exec(cmp.Or(analyze, "ANALYZE outbox_messages")).Error; err != nil {
			t.Fatal(err)
		}
		store, err := outbox.StoreOf(db)
		if err != nil {
			t.Fatal(err)
		}
		sql, args := outbox.WalkSQL(store, 64)
		if read := indexRead(t, db, sql, args); !strings.Contains(read, "idx_outbox_messages_pending") {
			t.Errorf("the claim's walk reads %q, want the pending index", read)
		}

		// Stats' query, as GORM runs it.
		var oldestSQL string
		var oldestArgs []any
		err = db.Callback().Query().After("gorm:query").Register("test:oldest", func(tx *gorm.DB) {
			if q := tx.Statement.SQL.String(); strings.Contains(q, "created_at") && strings.Contains(q, "LIMIT") {
				oldestSQL, oldestArgs = q, tx.Statement.Vars
			}
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = db.Callback().Query().Remove("test:oldest") })
		if _, err := store.Stats(t.Context(), 0); err != nil {
			t.Fatal(err)
		}
		if oldestSQL == "" {
			t.Fatal("Stats ran no query for the oldest pending message")
		}
		if read := indexRead(t, db, oldestSQL, oldestArgs); !strings.Contains(read, "idx_outbox_messages_pending") {
			t.Errorf("Stats' oldest pending message is read with %q, want the pending index", read)
		}
	})
}

// indexRead is what a database's plan for sql says it reads: MySQL's "key"
// column, PostgreSQL's and SQLite's plan text.
func indexRead(t *testing.T, db *gorm.DB, sql string, args []any) string {
	t.Helper()
	explain := map[string]string{"sqlite": "EXPLAIN QUERY PLAN "}[db.Dialector.Name()]
	var plan []map[string]any
	if err := db.Raw(cmp.Or(explain, "EXPLAIN ")+sql, args...).Scan(&plan).Error; err != nil {
		t.Fatal(err)
	}
	var read []string
	for _, row := range plan {
		for col, v := range row {
			if col == "key" || col == "QUERY PLAN" || col == "detail" {
				read = append(read, fmt.Sprint(v))
			}
		}
	}
	return strings.Join(read, " ")
}
