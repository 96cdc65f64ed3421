package postgres_test

import (
	"maps"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/internal/postgres"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// Two stores of one table are two publisher processes: each knows only its
// own claims, so what keeps a key's order between them is the database's
// row locks.
func TestHeldClaimKeepsItsKeysFromOtherPublishers(t *testing.T) {
	t.Run("keep", func(t *testing.T) { testHeldClaimKeys(t, false) })
	t.Run("delete", func(t *testing.T) { testHeldClaimKeys(t, true) })
}

func testHeldClaimKeys(t *testing.T, deleteOnPublish bool) {
	eachBackend(t, func(t *testing.T, db *gorm.DB) {
		ctx := t.Context()
		a, b := newStore(db, deleteOnPublish), newStore(db, deleteOnPublish)
		err := db.Transaction(func(tx *gorm.DB) error {
			return outbox.Enqueue(tx,
				outbox.Message{Topic: "t", Key: "a", Payload: "1"},
				outbox.Message{Topic: "t", Key: "a", Payload: "2"},
				outbox.Message{Topic: "t", Key: "b", Payload: "1"},
				outbox.Message{Topic: "t", Key: "", Payload: "x"})
		})
		if err != nil {
			t.Fatal(err)
		}
		held, finishA, abandonA, err := postgres.ClaimHeld(ctx, a, outbox.ClaimOptions{Limit: 1, Lease: time.Minute})
		if err != nil || keysOf(held) != "a:1" {
			t.Fatalf("first claim: %q, %v", keysOf(held), err)
		}
		defer abandonA()
		// a:1 is locked, not stamped: another process reads it as
		// due, and must still hold a:2 back.
		got, finishB, _, err := postgres.ClaimHeld(ctx, b, outbox.ClaimOptions{Limit: 10, Lease: time.Minute})
		if err != nil || keysOf(got) != "b:1 :x" {
			t.Fatalf("other process's held claim: %q, %v", keysOf(got), err)
		}
		if err := finishB([]uuid.UUID{got[0].ID, got[1].ID}, nil); err != nil {
			t.Fatal(err)
		}
		// So must a leased claim, and this process's own next claim.
		if _, leased, err := b.Claim(ctx, outbox.ClaimOptions{Limit: 10, Lease: time.Minute}); err != nil || len(leased) != 0 {
			t.Fatalf("leased claim beside a held one: %q, %v", keysOf(leased), err)
		}
		if again, _, _, err := postgres.ClaimHeld(ctx, a, outbox.ClaimOptions{Limit: 10, Lease: time.Minute}); err != nil || len(again) != 0 {
			t.Fatalf("same process, second claim: %q, %v", keysOf(again), err)
		}
		// a:1 fails: its retry holds the key, unless KeySkip.
		retry := outbox.Failure{ID: held[0].ID, Err: "refused", NextAttemptAt: time.Now().Add(time.Hour)}
		if err := finishA(nil, []outbox.Failure{retry}); err != nil {
			t.Fatal(err)
		}
		if got, _, _, err := postgres.ClaimHeld(ctx, b, outbox.ClaimOptions{Limit: 10, Lease: time.Minute}); err != nil || len(got) != 0 {
			t.Fatalf("claimed behind a retry: %q, %v", keysOf(got), err)
		}
		got, _, abandon, err := postgres.ClaimHeld(ctx, b, outbox.ClaimOptions{Limit: 10, Lease: time.Minute, SkipFailedKeys: true})
		if err != nil || keysOf(got) != "a:2" {
			t.Fatalf("KeySkip: %q, %v", keysOf(got), err)
		}
		abandon()
		m := messages(t, db)
		published, rows := int64(2), 4
		if deleteOnPublish {
			published, rows = 0, 2
		}
		if len(m) != rows || m[0].Attempts != 1 || m[0].LastError != "refused" || m[1].State != outbox.StatePending ||
			string(m[1].Payload) != "2" || m[1].Attempts != 0 {
			t.Fatalf("rows after the claims: %+v", m)
		}
		if n := count(t, db, outbox.DefaultTableName, "state = ?", outbox.StatePublished); n != published {
			t.Fatalf("%d published, want %d", n, published)
		}
	})
}

// A publisher that stops answering mid-send frees its rows after the lease:
// PostgreSQL ends its idle transaction, and its results, written too late,
// are refused rather than recorded over another claim's.
func TestHeldClaimEndsAfterTheLease(t *testing.T) {
	eachBackend(t, func(t *testing.T, db *gorm.DB) {
		ctx := t.Context()
		a, b := newStore(db, false), newStore(db, false)
		if err := db.Transaction(func(tx *gorm.DB) error {
			return outbox.Enqueue(tx, outbox.Message{Topic: "t", Key: "k", Payload: "1"})
		}); err != nil {
			t.Fatal(err)
		}
		lease := 300 * time.Millisecond
		held, finish, abandon, err := postgres.ClaimHeld(ctx, a, outbox.ClaimOptions{Limit: 1, Lease: lease})
		if err != nil || len(held) != 1 {
			t.Fatalf("claim: %d, %v", len(held), err)
		}
		defer abandon()
		var got []*outbox.OutboxMessage
		deadline := time.Now().Add(10 * time.Second)
		for len(got) == 0 && time.Now().Before(deadline) {
			time.Sleep(lease / 3)
			var finishB func([]uuid.UUID, []outbox.Failure) error
			got, finishB, _, err = postgres.ClaimHeld(ctx, b, outbox.ClaimOptions{Limit: 1, Lease: time.Minute})
			if err != nil {
				t.Fatal(err)
			}
			if len(got) == 1 {
				if err := finishB(nil, []outbox.Failure{{ID: got[0].ID, Err: "second claim", NextAttemptAt: time.Now()}}); err != nil {
					t.Fatal(err)
				}
			}
		}
		if len(got) != 1 {
			t.Fatalf("the row was not free 10 s after a lease of %v", lease)
		}
		if err := finish([]uuid.UUID{held[0].ID}, nil); err == nil {
			t.Fatal("the expired claim recorded its result")
		}
		m := messages(t, db)
		if len(m) != 1 || m[0].State != outbox.StatePending || m[0].LastError != "second claim" {
			t.Fatalf("row after the expired claim: %+v", m)
		}
	})
}

// A held claim's transaction ends after the lease if idle, plans its
// statements for their id lists, walks along the pending index whatever
// the statistics say, and commits as the server says (synchronous_commit
// is not its to change); no setting outlives it on the pooled connection.
func TestHeldClaimSettingsAreItsOwn(t *testing.T) {
	eachBackend(t, func(t *testing.T, db *gorm.DB) {
		ctx := t.Context()
		store := newStore(db, false)
		if err := db.Transaction(func(tx *gorm.DB) error {
			return outbox.Enqueue(tx, outbox.Message{Topic: "t", Key: "k", Payload: "1"})
		}); err != nil {
			t.Fatal(err)
		}
		sqlDB, err := db.DB()
		if err != nil {
			t.Fatal(err)
		}
		sqlDB.SetMaxOpenConns(1) // the read after the claim is on the claim's connection
		opts := outbox.ClaimOptions{Limit: 1, Lease: 90 * time.Second}
		for name, want := range map[string]string{"idle_in_transaction_session_timeout": "90s",
			"plan_cache_mode": "force_custom_plan", "enable_seqscan": "off", "enable_bitmapscan": "off"} {
			n, got, err := postgres.HeldClaimSetting(ctx, store, opts, name)
			if err != nil || n != 1 || got != want {
				t.Fatalf("%s in a claim of %d: %q, %v; want %q", name, n, got, err, want)
			}
			var after string
			if err := db.Raw("SELECT current_setting(?)", name).Scan(&after).Error; err != nil || after == want {
				t.Fatalf("%s after the claim: %q, %v", name, after, err)
			}
		}
		var server string
		if err := db.Raw("SELECT current_setting('synchronous_commit')").Scan(&server).Error; err != nil {
			t.Fatal(err)
		}
		if n, got, err := postgres.HeldClaimSetting(ctx, store, opts, "synchronous_commit"); err != nil || n != 1 || got != server {
			t.Fatalf("synchronous_commit in a claim of %d: %q, %v; want the server's %q", n, got, err, server)
		}
	})
}

// The lease API's results on PostgreSQL are planned for their id lists:
// pgx caches prepared statements, and PostgreSQL switches a statement run
// five times to a generic plan, which for "id = ANY($1)" can be a scan of
// the whole table (chosen while it was nearly empty).
func TestLeaseResultsAreNeverGenericPlans(t *testing.T) {
	eachBackend(t, func(t *testing.T, db *gorm.DB) {
		ctx := t.Context()
		store := newStore(db, false)
		sqlDB, err := db.DB()
		if err != nil {
			t.Fatal(err)
		}
		sqlDB.SetMaxOpenConns(1) // pg_prepared_statements shows the session's own
		for i := range 8 {
			if err := db.Transaction(func(tx *gorm.DB) error {
				return outbox.Enqueue(tx, outbox.Message{Topic: "t", Key: "k", Payload: "1"})
			}); err != nil {
				t.Fatal(err)
			}
			token, msgs, err := store.Claim(ctx, outbox.ClaimOptions{Limit: 1, Lease: time.Minute})
			if err != nil || len(msgs) != 1 {
				t.Fatalf("claim %d: %d messages, %v", i, len(msgs), err)
			}
			if err := store.Release(ctx, token, []uuid.UUID{msgs[0].ID}); err != nil {
				t.Fatal(err)
			}
			token, msgs, err = store.Claim(ctx, outbox.ClaimOptions{Limit: 1, Lease: time.Minute})
			if err != nil || len(msgs) != 1 {
				t.Fatalf("claim %d after release: %d messages, %v", i, len(msgs), err)
			}
			if err := store.MarkPublished(ctx, token, []uuid.UUID{msgs[0].ID}); err != nil {
				t.Fatal(err)
			}
		}
		var plans []struct {
			Statement                 string
			GenericPlans, CustomPlans int
		}
		if err := db.Raw("SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements WHERE statement LIKE '%ANY(%' AND statement NOT LIKE '%pg_prepared%'").
			Scan(&plans).Error; err != nil {
			t.Fatal(err)
		}
		custom := 0
		for _, p := range plans {
			if p.GenericPlans > 0 {
				t.Errorf("%d generic plans for %s", p.GenericPlans, p.Statement)
			}
			custom += p.CustomPlans
		}
		// Only pgx's extended protocol caches prepared statements.
		if cached := !strings.Contains(t.Name(), "simple") && !strings.Contains(t.Name(), "libpq"); cached && custom < 16 {
			t.Fatalf("%d custom plans of cached statements with an id list, want at least 16: %+v", custom, plans)
		}
	})
}

// A held claim locks its picked rows by the addresses its walk read. An
// address that holds another row since, or a row changed since the walk
// (its new version is elsewhere), is not locked: its key is busy, the
// rest of the batch goes on.
func TestHeldClaimLocksOnlyTheRowsPickedAtTheirAddresses(t *testing.T) {
	eachBackend(t, func(t *testing.T, db *gorm.DB) {
		ctx := t.Context()
		s := newStore(db, false)
		rows := enqueueLabelled(t, db, "a:1 a:2 b:1 c:1") // c:1 is not among the picked rows
		msgs := []*outbox.OutboxMessage{&rows[0], &rows[1], &rows[2]}
		addresses := func() map[uuid.UUID]string {
			var got []struct {
				ID   uuid.UUID
				Ctid string
			}
			if err := db.Raw("SELECT id, CAST(ctid AS text) AS ctid FROM " + outbox.DefaultTableName).Scan(&got).Error; err != nil {
				t.Fatal(err)
			}
			refs := map[uuid.UUID]string{}
			for _, r := range got {
				refs[r.ID] = r.Ctid
			}
			return refs
		}
		lock := func(refs map[uuid.UUID]string) string {
			t.Helper()
			locked, err := postgres.LockPicked(ctx, s, msgs, refs)
			if err != nil {
				t.Fatal(err)
			}
			return labelsOf(rows, locked)
		}
		refs := addresses()
		if got := lock(refs); got != "a:1 a:2 b:1" {
			t.Fatalf("locked %q with the walk's addresses, want all three", got)
		}
		// a:1's address holds c:1 instead: c:1 is locked, but not sent;
		// a:1 is not locked, nor a:2 behind it.
		swapped := maps.Clone(refs)
		swapped[rows[0].ID] = refs[rows[3].ID]
		if got := lock(swapped); got != "b:1" {
			t.Fatalf("locked %q with a:1's address holding c:1, want only b:1", got)
		}
		// b:1 changed after the walk read its address: its new version is elsewhere.
		if err := db.Exec("UPDATE "+outbox.DefaultTableName+" SET last_error = 'changed' WHERE id = ?", rows[2].ID).Error; err != nil {
			t.Fatal(err)
		}
		if addresses()[rows[2].ID] == refs[rows[2].ID] {
			t.Fatal("the update left b:1 at its address; the test needs it moved")
		}
		if got := lock(refs); got != "a:1 a:2" {
			t.Fatalf("locked %q with b:1 changed since the walk, want a:1 a:2", got)
		}
		// Without addresses, by id: b:1 is the same row, changed or not.
		if got := lock(nil); got != "a:1 a:2 b:1" {
			t.Fatalf("locked %q by id, want all three", got)
		}
	})
}

// A walk leaves the rows this process has in flight out in SQL (they are
// locked by its other claims), through pgx itself and through
// database/sql (lib/pq) alike. Their keys are not marked busy here, so a
// walk that read them would pick them.
func TestWalkLeavesOutTheRowsInFlight(t *testing.T) {
	eachBackend(t, func(t *testing.T, db *gorm.DB) {
		rows := enqueueLabelled(t, db, "a:1 b:1 c:1 d:1")
		s := newStore(db, false)
		picked, err := postgres.WalkPicks(t.Context(), s, []uuid.UUID{rows[0].ID, rows[2].ID})
		if err != nil {
			t.Fatal(err)
		}
		if got := labelsOf(rows, picked); got != "b:1 d:1" {
			t.Fatalf("the walk picked %q with a:1 and c:1 in flight, want b:1 d:1", got)
		}
	})
}

// enqueueLabelled commits one message on topic t for each "key:payload"
// of labels, in order, and returns the outbox's rows in id order.
func enqueueLabelled(t *testing.T, db *gorm.DB, labels string) []outbox.OutboxMessage {
	t.Helper()
	var msgs []outbox.Message
	for _, l := range strings.Fields(labels) {
		key, payload, _ := strings.Cut(l, ":")
		msgs = append(msgs, outbox.Message{Topic: "t", Key: key, Payload: payload})
	}
	if err := db.Transaction(func(tx *gorm.DB) error { return outbox.Enqueue(tx, msgs...) }); err != nil {
		t.Fatal(err)
	}
	return messages(t, db)
}

// labelsOf names the rows of ids as "key:payload", in the order of ids.
func labelsOf(rows []outbox.OutboxMessage, ids []uuid.UUID) string {
	var labels []string
	for _, id := range ids {
		for _, r := range rows {
			if r.ID == id {
				labels = append(labels, r.Key+":"+string(r.Payload))
			}
		}
	}
	return strings.Join(labels, " ")
}

// BenchmarkHeldClaim measures one held claim of 500 messages and its
// results (deleted) on PostgreSQL, one claim at a time: the walk, the
// lock, the delete and the commit, with their Go side. Its allocations
// per claim do not depend on the machine's speed, which changes the
// drain's rates by a third from one minute to the next:
//
//	go test -run x -bench HeldClaim -benchtime 200x -benchmem ./internal/postgres
func BenchmarkHeldClaim(b *testing.B) {
	const batch = 500
	db := setup(b, outboxtest.Postgres(b, nil), outbox.WithDeleteOnPublish())
	s := newStore(db, true)
	ctx := b.Context()
	payload := []byte(strings.Repeat("x", 200))
	for done := 0; done < b.N*batch; done += 5000 {
		err := db.Transaction(func(tx *gorm.DB) error {
			var msgs []*outbox.OutboxMessage
			for i := done; i < min(done+5000, b.N*batch); i++ {
				now := time.Now().UTC()
				msgs = append(msgs, &outbox.OutboxMessage{ID: uuid.Must(uuid.NewV7()), Topic: "bench", Key: "k" + strconv.Itoa(i%10000),
					Payload: payload, Headers: outbox.Headers{}, State: outbox.StatePending, NextAttemptAt: now, CreatedAt: now})
			}
			return s.Save(ctx, tx, msgs...)
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	opts := outbox.ClaimOptions{Limit: batch, Lease: time.Minute}
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		msgs, finish, _, err := postgres.ClaimHeld(ctx, s, opts)
		if err != nil {
			b.Fatal(err)
		}
		if len(msgs) != batch {
			b.Fatalf("claimed %d messages, want %d", len(msgs), batch)
		}
		published := make([]uuid.UUID, len(msgs))
		for i, m := range msgs {
			published[i] = m.ID
		}
		if err := finish(published, nil); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	if left := count(b, db, outbox.DefaultTableName); left != 0 {
		b.Fatalf("%d messages left after the claims", left)
	}
}

// A held claim walks along the pending index even when the statistics
// were taken while the table was empty: PostgreSQL would otherwise read
// every pending row through a bitmap and sort them, for each claim, a
// cost that grows with the backlog the publisher is draining.
func TestHeldClaimWalksThePendingIndexWhateverTheStatistics(t *testing.T) {
	eachBackend(t, func(t *testing.T, db *gorm.DB) {
		s := newStore(db, false)
		enqueue := func(n int) {
			t.Helper()
			if err := db.Transaction(func(tx *gorm.DB) error {
				msgs := make([]outbox.Message, n)
				for i := range msgs {
					msgs[i] = outbox.Message{Topic: "t", Key: "k" + strconv.Itoa(i), Payload: "x"}
				}
				return outbox.Enqueue(tx, msgs...)
			}); err != nil {
				t.Fatal(err)
			}
		}
		if err := db.Exec("ANALYZE " + outbox.DefaultTableName).Error; err != nil { // empty
			t.Fatal(err)
		}
		enqueue(5000) // a backlog the statistics do not know of
		walk, args, setup := postgres.HeldWalkSQL(s, 600)
		plan := func(withSetup bool) (read string) {
			t.Helper()
			if err := db.Transaction(func(tx *gorm.DB) error {
				if withSetup {
					if err := tx.Exec(setup).Error; err != nil {
						return err
					}
				}
				read = indexRead(t, tx, walk, args)
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			return read
		}
		index := "Index Scan using idx_" + outbox.DefaultTableName + "_pending"
		if plain := plan(false); strings.Contains(plain, index) && !strings.Contains(plain, "Sort") {
			t.Fatalf("without the claim's settings PostgreSQL already walks the index; the test needs it not to:\n%s", plain)
		}
		if planned := plan(true); !strings.Contains(planned, index) || strings.Contains(planned, "Sort") || strings.Contains(planned, "Bitmap") {
			t.Fatalf("a claim's walk with stale statistics:\n%s\nwant an ordered scan of the pending index", planned)
		}
	})
}

// The exactly-once claims' turn keeps claims whose groups reach beyond
// their batch from dropping each other's groups; it costs every claim a
// wait, so a claim of one-message transactions does without it.
func TestExactlyOnceClaimTakesTheTurnOnlyForGroupsBeyondItsBatch(t *testing.T) {
	eachBackend(t, func(t *testing.T, db *gorm.DB) {
		ctx := t.Context()
		s := newStore(db, false)
		sqlDB, err := db.DB()
		if err != nil {
			t.Fatal(err)
		}
		other, err := sqlDB.Conn(ctx) // another process, in its turn
		if err != nil {
			t.Fatal(err)
		}
		defer other.Close()
		if _, err := other.ExecContext(ctx, "SELECT pg_advisory_lock($1)", postgres.WholeTurnKey(s)); err != nil {
			t.Fatal(err)
		}
		released := false
		release := func() {
			if !released {
				released = true
				if _, err := other.ExecContext(ctx, "SELECT pg_advisory_unlock($1)", postgres.WholeTurnKey(s)); err != nil {
					t.Fatal(err)
				}
			}
		}
		defer release()
		// A claim runs beside the test, which waits for its messages or
		// its error, at most for as long as the claim may take.
		type claimed struct {
			msgs []*outbox.OutboxMessage
			err  error
		}
		var running sync.WaitGroup
		defer running.Wait()
		claim := func(opts outbox.ClaimOptions) chan claimed {
			out := make(chan claimed, 1)
			running.Go(func() {
				c, err := postgres.ClaimWhole(ctx, s, opts)
				if err != nil {
					out <- claimed{err: err}
					return
				}
				msgs := c.Messages()
				ids := make([]uuid.UUID, len(msgs))
				for i, m := range msgs {
					ids[i] = m.ID
				}
				out <- claimed{msgs, c.Finish(ids, nil)}
			})
			return out
		}
		for _, p := range []string{"1", "2"} {
			if err := db.Transaction(func(tx *gorm.DB) error {
				return outbox.Enqueue(tx, outbox.Message{Topic: "t", Key: "k" + p, Payload: p})
			}); err != nil {
				t.Fatal(err)
			}
		}
		select {
		case got := <-claim(outbox.ClaimOptions{Limit: 10, Lease: time.Minute}):
			if got.err != nil || len(got.msgs) != 2 {
				t.Fatalf("claimed %d one-message transactions, want 2: %v", len(got.msgs), got.err)
			}
		case <-time.After(10 * time.Second):
			release() // lets the claim end before the test does
			t.Fatal("a claim of one-message transactions waited for the turn")
		}
		if err := db.Transaction(func(tx *gorm.DB) error {
			return outbox.Enqueue(tx, outbox.Message{Topic: "t", Key: "g", Payload: "1"},
				outbox.Message{Topic: "t", Key: "g", Payload: "2"}, outbox.Message{Topic: "t", Key: "h", Payload: "3"})
		}); err != nil {
			t.Fatal(err)
		}
		out := claim(outbox.ClaimOptions{Limit: 2, Lease: time.Minute})
		select {
		case got := <-out:
			t.Fatalf("a claim whose group reaches beyond its batch claimed %d messages without the turn: %v", len(got.msgs), got.err)
		case <-time.After(500 * time.Millisecond):
		}
		release()
		got := <-out
		if got.err != nil || len(got.msgs) != 3 {
			t.Fatalf("claimed %d messages of a three-message transaction, want all: %v", len(got.msgs), got.err)
		}
	})
}
