package outbox_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/kafka"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// Exactly-once mode, against kfake over TCP, on every database. A reader
// with isolation.level=read_committed must see every committed event once
// and in its key's order, whatever the publishers went through.

func transactionalSender(t testing.TB, addrs []string, id string, opts ...kafka.TransactionalOption) *kafka.TransactionalSender {
	t.Helper()
	s, err := kafka.NewTransactionalSender(addrs, id, nil, opts...)
	if err != nil {
		t.Fatalf("kafka.NewTransactionalSender: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// enqueueTxnEvents commits n events over keys keys, a few a transaction,
// and returns their payloads (unique) in enqueue order.
func enqueueTxnEvents(t testing.TB, db *gorm.DB, topic string, n, keys int) []string {
	t.Helper()
	var payloads []string
	for start := 0; start < n; start += 7 {
		err := db.Transaction(func(tx *gorm.DB) error {
			var msgs []outbox.Message
			for i := start; i < min(start+7, n); i++ {
				p := fmt.Sprint("event-", i)
				msgs = append(msgs, outbox.Message{Topic: topic, Key: fmt.Sprint("key-", i%keys), Payload: p})
				payloads = append(payloads, p)
			}
			return outbox.Enqueue(tx, msgs...)
		})
		if err != nil {
			t.Fatalf("enqueue: %v", err)
		}
	}
	return payloads
}

// checkExactlyOnce reads topic with read_committed and checks that it holds
// each of payloads once, each key's in enqueue order.
func checkExactlyOnce(t testing.TB, addrs []string, topic string, payloads []string) {
	t.Helper()
	recs, err := outboxtest.ReadAllRecords(addrs, topic, len(payloads), 2*time.Second, time.Minute)
	if err != nil {
		t.Fatalf("reading %s: %v", topic, err)
	}
	pos := map[string]int{}
	for i, p := range payloads {
		pos[p] = i
	}
	seen := map[string]int{}
	last := map[string]int{}
	var dup, unknown, order int
	for _, r := range recs {
		p, ok := pos[string(r.Value)]
		if !ok {
			unknown++
			continue
		}
		seen[string(r.Value)]++
		if seen[string(r.Value)] > 1 {
			dup++
		}
		if l, ok := last[string(r.Key)]; ok && p < l {
			order++
		}
		last[string(r.Key)] = p
	}
	lost := len(payloads) - len(seen)
	if lost != 0 || dup != 0 || unknown != 0 || order != 0 {
		t.Fatalf("read_committed: lost=%d duplicates=%d unknown=%d order_violations=%d (of %d events, %d records)",
			lost, dup, unknown, order, len(payloads), len(recs))
	}
}

func waitUntilPublished(t testing.TB, db *gorm.DB, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		n := count(t, db, outbox.DefaultTableName, "state <> ?", outbox.StatePublished)
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d messages still not published after %v", n, within)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestExactlyOnceDeliversEachEventOnceInKeyOrder(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 3, "eo")
		ids := enqueueTxnEvents(t, db, "eo", 300, 12)
		sender := transactionalSender(t, addrs, "eo-"+uuid.NewString()[:8], kafka.WithSlots(4))
		pub, err := outbox.NewPublisher(db, sender, outbox.WithWorkers(3), outbox.WithBatchSize(40), outbox.WithPollInterval(20*time.Millisecond))
		if err != nil {
			t.Fatal(err)
		}
		if err := pub.Start(t.Context()); err != nil {
			t.Fatal(err)
		}
		waitUntilPublished(t, db, 30*time.Second)
		if err := pub.Stop(t.Context()); err != nil {
			t.Fatal(err)
		}
		checkExactlyOnce(t, addrs, "eo", ids)
		store, _ := outbox.StoreOf(db)
		slots, err := store.Slots(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		var commits int64
		for _, s := range slots {
			if s.Open || s.Owner != "" {
				t.Errorf("slot %s after Stop: open=%v owner=%q, want settled and free", s.TransactionalID, s.Open, s.Owner)
			}
			commits += s.Commits
		}
		if len(slots) != 4 || commits < 300/40 {
			t.Errorf("%d slots with %d commits, want 4 slots and at least %d commits", len(slots), commits, 300/40)
		}
	})
}

// A publisher that dies after its transaction committed, before it
// recorded the result: whoever takes its slot over must find the batch
// delivered, from the marker, and not send it again.
func TestExactlyOnceSettlesACommittedBatchWhosePublisherDied(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 3, "eo")
		ids := enqueueTxnEvents(t, db, "eo", 60, 5)
		id := "eo-" + uuid.NewString()[:8]
		// The first publisher's database goes away between the commit and
		// the record: a sender that commits, then makes the store fail, as
		// a crash at that instant would leave it.
		sender := transactionalSender(t, addrs, id, kafka.WithSlots(1))
		crashing := &crashAfterCommit{TransactionalSender: sender, db: db}
		pub, err := outbox.NewPublisher(db, crashing, outbox.WithWorkers(1), outbox.WithBatchSize(100), outbox.WithLease(time.Second))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := pub.PublishOnce(t.Context()); err == nil {
			t.Fatal("the batch recorded its result though the table was gone")
		}
		crashing.restore(t)
		if n := count(t, db, outbox.DefaultTableName, "state = ?", outbox.StatePublished); n != 0 {
			t.Fatalf("%d messages recorded published; the crash should have left none", n)
		}
		time.Sleep(1100 * time.Millisecond) // the dead publisher's slot lease
		heir := transactionalSender(t, addrs, id, kafka.WithSlots(1))
		pub2, err := outbox.NewPublisher(db, heir, outbox.WithWorkers(1), outbox.WithBatchSize(100))
		if err != nil {
			t.Fatal(err)
		}
		for range 3 {
			if _, err := pub2.PublishOnce(t.Context()); err != nil {
				t.Fatal(err)
			}
		}
		waitUntilPublished(t, db, 10*time.Second)
		checkExactlyOnce(t, addrs, "eo", ids)
	})
}

// A held claim's rows are free as soon as its transaction ends, though
// its broker transaction committed: a publisher holding another slot must
// leave them out until their slot is settled from its marker, not send
// them again.
func TestExactlyOnceLeavesOutTheRowsOfAnUnsettledClaim(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 3, "eo")
		payloads := enqueueTxnEvents(t, db, "eo", 60, 5)
		id := "eo-" + uuid.NewString()[:8]
		crashing := &crashAfterCommit{TransactionalSender: transactionalSender(t, addrs, id, kafka.WithSlots(2)), db: db}
		const lease = 2 * time.Second
		dead, err := outbox.NewPublisher(db, crashing, outbox.WithWorkers(1), outbox.WithBatchSize(100), outbox.WithLease(lease))
		if err != nil {
			t.Fatal(err)
		}
		if !outbox.HoldsClaims(dead) {
			return // a lease claim stamps its rows: nothing is free to leave out
		}
		if _, err := dead.PublishOnce(t.Context()); err == nil {
			t.Fatal("the batch recorded its result though its transaction was killed")
		}
		started := time.Now()
		other, err := outbox.NewPublisher(db, transactionalSender(t, addrs, id, kafka.WithSlots(2)),
			outbox.WithWorkers(1), outbox.WithBatchSize(100), outbox.WithLease(lease))
		if err != nil {
			t.Fatal(err)
		}
		res, err := other.PublishOnce(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		if time.Since(started) >= lease {
			t.Fatalf("the check took %v, past the dead publisher's lease", time.Since(started))
		}
		if res.Claimed != 0 {
			t.Fatalf("another slot claimed %d messages of a claim whose slot is not settled; want 0", res.Claimed)
		}
		time.Sleep(lease) // the dead publisher's slot lease
		for range 3 {
			if _, err := other.PublishOnce(t.Context()); err != nil {
				t.Fatal(err)
			}
		}
		waitUntilPublished(t, db, 10*time.Second)
		checkExactlyOnce(t, addrs, "eo", payloads)
	})
}

// A publisher frozen between its claim and the naming of the claim's rows
// past its lease has lost its transaction, and its rows may have gone to
// another publisher meanwhile: it must not send them when it wakes.
func TestExactlyOnceSendsNothingOnceTheClaimsTransactionEnded(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 3, "eo")
		payloads := enqueueTxnEvents(t, db, "eo", 60, 5)
		id := "eo-" + uuid.NewString()[:8]
		const lease = 2 * time.Second
		frozen, err := outbox.NewPublisher(db, transactionalSender(t, addrs, id, kafka.WithSlots(2)),
			outbox.WithWorkers(1), outbox.WithBatchSize(100), outbox.WithLease(lease))
		if err != nil {
			t.Fatal(err)
		}
		if !outbox.HoldsClaims(frozen) {
			return // a lease claim's rows are stamped in its own commit
		}
		other, err := outbox.NewPublisher(db, transactionalSender(t, addrs, id, kafka.WithSlots(2)),
			outbox.WithWorkers(1), outbox.WithBatchSize(100), outbox.WithLease(lease))
		if err != nil {
			t.Fatal(err)
		}
		var once atomic.Bool
		var otherErr error
		outbox.PauseBeforeNaming(frozen, func() {
			if !once.CompareAndSwap(false, true) {
				return
			}
			// Frozen past the lease: the database ends the claim's
			// transaction, and the other publisher, on the other slot,
			// claims its rows.
			otherErr = other.Start(context.Background())
			time.Sleep(lease + 1500*time.Millisecond)
		})
		defer func() { _ = other.Stop(context.Background()) }()
		if _, err := frozen.PublishOnce(t.Context()); err == nil {
			t.Fatal("the frozen publisher's batch went on though its transaction had ended")
		}
		if otherErr != nil {
			t.Fatal(otherErr)
		}
		waitUntilPublished(t, db, 10*time.Second)
		checkExactlyOnce(t, addrs, "eo", payloads)
	})
}

// crashAfterCommit lets its slot's first transaction commit and then
// takes the database away from the publisher, so that it cannot record
// it: where claims are held, it ends the claim's transaction by killing its
// connection, as a crash or a database restart would; on SQLite it renames
// the outbox table away.
type crashAfterCommit struct {
	*kafka.TransactionalSender
	db      *gorm.DB
	renamed atomic.Bool
}

func (c *crashAfterCommit) hasRenamed() bool { return c.renamed.Load() }

func (c *crashAfterCommit) OpenSlot(ctx context.Context, slot int) (outbox.SlotProducer, error) {
	p, err := c.TransactionalSender.OpenSlot(ctx, slot)
	if err != nil {
		return nil, err
	}
	return &crashingSlot{SlotProducer: p, c: c}, nil
}

type crashingSlot struct {
	outbox.SlotProducer
	c *crashAfterCommit
}

func (s *crashingSlot) SendInTransaction(ctx context.Context, token string, msgs []*outbox.OutboxMessage, ready func() error) error {
	err := s.SlotProducer.SendInTransaction(ctx, token, msgs, ready)
	if err == nil && s.c.renamed.CompareAndSwap(false, true) {
		if s.c.db.Dialector.Name() != "sqlite" {
			return killClaimTransactions(s.c.db)
		}
		if err := s.c.db.Migrator().RenameTable(outbox.DefaultTableName, "eo_away"); err != nil {
			return fmt.Errorf("renaming the table away: %w", err)
		}
	}
	return err
}

// killClaimTransactions kills the connections of the transactions that
// hold rows of the outbox table (the test's own schema or database).
func killClaimTransactions(db *gorm.DB) error {
	var ids []int64
	var kill string
	switch db.Dialector.Name() {
	case "postgres":
		kill = "SELECT pg_terminate_backend(?)"
		err := db.Raw("SELECT DISTINCT pid FROM pg_locks WHERE relation = CAST(? AS regclass) AND pid <> pg_backend_pid()",
			outbox.DefaultTableName).Scan(&ids).Error
		if err != nil {
			return fmt.Errorf("finding the claim's transaction: %w", err)
		}
	default:
		kill = "KILL ?"
		err := db.Raw("SELECT t.trx_mysql_thread_id FROM information_schema.innodb_trx t JOIN information_schema.processlist p" +
			" ON p.id = t.trx_mysql_thread_id WHERE p.db = DATABASE() AND t.trx_mysql_thread_id <> CONNECTION_ID()").Scan(&ids).Error
		if err != nil {
			return fmt.Errorf("finding the claim's transaction: %w", err)
		}
	}
	if len(ids) == 0 {
		return errors.New("no transaction holds the claim's rows")
	}
	for _, id := range ids {
		if err := db.Exec(kill, id).Error; err != nil {
			return fmt.Errorf("killing the claim's transaction: %w", err)
		}
	}
	return nil
}

func (c *crashAfterCommit) restore(t testing.TB) {
	t.Helper()
	if c.renamed.Load() && c.db.Dialector.Name() == "sqlite" {
		if err := c.db.Migrator().RenameTable("eo_away", outbox.DefaultTableName); err != nil {
			t.Fatal(err)
		}
	}
}

// A publisher whose database write fails after its transaction committed,
// and which goes on running: before its slot sends anything else, it must
// settle the committed batch, neither sending it again nor leaving it
// claimed.
func TestExactlyOnceSettlesACommittedBatchBeforeTheSlotMovesOn(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 3, "eo")
		payloads := enqueueTxnEvents(t, db, "eo", 120, 6)
		crashing := &crashAfterCommit{TransactionalSender: transactionalSender(t, addrs, "eo-"+uuid.NewString()[:8], kafka.WithSlots(1)), db: db}
		pub, err := outbox.NewPublisher(db, crashing, outbox.WithWorkers(1), outbox.WithBatchSize(30),
			outbox.WithPollInterval(20*time.Millisecond), outbox.WithMaxPause(100*time.Millisecond))
		if err != nil {
			t.Fatal(err)
		}
		if err := pub.Start(t.Context()); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = pub.Stop(context.Background()) }()
		waitFor(t, "the first commit", func() bool { return crashing.hasRenamed() })
		time.Sleep(300 * time.Millisecond) // a few failed records and retries
		crashing.restore(t)
		waitUntilPublished(t, db, 20*time.Second)
		if err := pub.Stop(t.Context()); err != nil {
			t.Fatal(err)
		}
		checkExactlyOnce(t, addrs, "eo", payloads)
	})
}

// A claim that reached the database but whose commit's reply was lost
// looks failed to its publisher, yet its slot names it pending and its rows
// are claimed. The publisher must settle it before claiming again: the next
// claim would name another claim pending, and these rows would stay claimed
// for the claim's lease.
func TestExactlyOnceSettlesAClaimWhoseCommitLooksFailed(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 3, "eo")
		payloads := enqueueTxnEvents(t, db, "eo", 120, 6)
		pub, err := outbox.NewPublisher(db, transactionalSender(t, addrs, "eo-"+uuid.NewString()[:8], kafka.WithSlots(1)),
			outbox.WithWorkers(1), outbox.WithBatchSize(30),
			outbox.WithPollInterval(20*time.Millisecond), outbox.WithMaxPause(100*time.Millisecond))
		if err != nil {
			t.Fatal(err)
		}
		var claims atomic.Int32
		outbox.FailCommittedClaims(pub, func() error {
			if claims.Add(1) == 1 {
				return errors.New("driver: bad connection (simulated: the commit's reply lost)")
			}
			return nil
		})
		if err := pub.Start(t.Context()); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = pub.Stop(context.Background()) }()
		waitUntilPublished(t, db, 20*time.Second)
		if err := pub.Stop(t.Context()); err != nil {
			t.Fatal(err)
		}
		checkExactlyOnce(t, addrs, "eo", payloads)
	})
}

// Held claims take a second connection to name their rows in the slot:
// a pool with too few for the workers would leave every worker waiting for
// one, so the publisher refuses it and says what to change.
func TestExactlyOnceRefusesAPoolTooSmallForItsWorkers(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		sqlDB, err := db.DB()
		if err != nil {
			t.Fatal(err)
		}
		sqlDB.SetMaxOpenConns(4)
		_, addrs := outboxtest.Kafka(t, 1, "eo")
		sender := transactionalSender(t, addrs, "eo-"+uuid.NewString()[:8])
		_, err = outbox.NewPublisher(db, sender, outbox.WithWorkers(2))
		held := db.Dialector.Name() != "sqlite"
		if held && (err == nil || !strings.Contains(err.Error(), "SetMaxOpenConns")) {
			t.Fatalf("4 connections for 2 workers: got %v, want an error naming SetMaxOpenConns", err)
		}
		if !held && err != nil {
			t.Fatalf("SQLite's lease claims need one connection: got %v", err)
		}
		sqlDB.SetMaxOpenConns(5)
		if _, err := outbox.NewPublisher(db, sender, outbox.WithWorkers(2)); err != nil {
			t.Fatalf("5 connections for 2 workers: %v", err)
		}
	})
}

// A slots table made before the slots named their claim's rows gets the
// column at the mode's first start.
func TestExactlyOnceAddsTheClaimsRowsColumnToAnOlderSlotsTable(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 3, "eo")
		slots := outbox.SlotTableName(outbox.DefaultTableName)
		ts := "timestamp"
		if db.Dialector.Name() == "mysql" {
			ts = "datetime(3)"
		}
		err := db.Exec("CREATE TABLE " + slots + " (transactional_id varchar(255) PRIMARY KEY, owner varchar(128), lease_until " + ts + " NOT NULL," +
			" pending varchar(36), commits bigint NOT NULL DEFAULT 0, aborts bigint NOT NULL DEFAULT 0, takeovers bigint NOT NULL DEFAULT 0," +
			" last_error varchar(1000) NOT NULL DEFAULT '', updated_at " + ts + " NOT NULL)").Error
		if err != nil {
			t.Fatal(err)
		}
		payloads := enqueueTxnEvents(t, db, "eo", 30, 3)
		pub, err := outbox.NewPublisher(db, transactionalSender(t, addrs, "eo-"+uuid.NewString()[:8], kafka.WithSlots(1)), outbox.WithWorkers(1))
		if err != nil {
			t.Fatal(err)
		}
		for range 3 {
			if _, err := pub.PublishOnce(t.Context()); err != nil {
				t.Fatal(err)
			}
		}
		if !db.Migrator().HasColumn(slots, "pending_ids") {
			t.Fatal("the slots table has no pending_ids column")
		}
		waitUntilPublished(t, db, 5*time.Second)
		checkExactlyOnce(t, addrs, "eo", payloads)
	})
}

// The index of transaction groups is read by exactly-once claims only. On
// MariaDB and MySQL, without partial indexes, it would hold an entry for
// every row, so the plugin's table lacks it and exactly-once mode creates
// it when it starts.
func TestExactlyOnceCreatesTheGroupIndexItReads(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		const index = "idx_outbox_messages_tx_group"
		mysql := db.Dialector.Name() == "mysql"
		if has := db.Migrator().HasIndex(outbox.DefaultTableName, index); has == mysql {
			t.Fatalf("before exactly-once mode, index %s present: %v; want %v", index, has, !mysql)
		}
		_, addrs := outboxtest.Kafka(t, 3, "eo")
		payloads := enqueueTxnEvents(t, db, "eo", 20, 3)
		pub, err := outbox.NewPublisher(db, transactionalSender(t, addrs, "eo-"+uuid.NewString()[:8], kafka.WithSlots(1)))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := pub.PublishOnce(t.Context()); err != nil {
			t.Fatal(err)
		}
		if !db.Migrator().HasIndex(outbox.DefaultTableName, index) {
			t.Fatalf("exactly-once mode ran without index %s", index)
		}
		checkExactlyOnce(t, addrs, "eo", payloads)
	})
}

// The markers are bounded: one committed offset per slot, whatever the
// number of transactions.
func TestExactlyOnceKeepsOneMarkerPerSlot(t *testing.T) {
	db := setup(t, outboxtest.Postgres(t, nil))
	_, addrs := outboxtest.Kafka(t, 3, "eo")
	enqueueTxnEvents(t, db, "eo", 200, 10)
	id := "eo-" + uuid.NewString()[:8]
	pub, err := outbox.NewPublisher(db, transactionalSender(t, addrs, id, kafka.WithSlots(2)), outbox.WithBatchSize(10))
	if err != nil {
		t.Fatal(err)
	}
	for range 25 {
		if _, err := pub.PublishOnce(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
	waitUntilPublished(t, db, 10*time.Second)
	cl, err := kgo.NewClient(kgo.SeedBrokers(addrs...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	offsets := 0
	for slot := range 2 {
		req := kmsg.NewPtrOffsetFetchRequest()
		req.Group = fmt.Sprintf("%s-%d", id, slot)
		resp, err := req.RequestWith(t.Context(), cl)
		if err != nil {
			t.Fatal(err)
		}
		for _, tp := range resp.Topics {
			for _, p := range tp.Partitions {
				if p.Offset >= 0 {
					offsets++
					if tp.Topic != id+"-markers" || p.Partition != 0 {
						t.Errorf("a marker on %s/%d, want only %s-markers/0", tp.Topic, p.Partition, id)
					}
				}
			}
		}
	}
	if offsets < 1 || offsets > 2 {
		t.Errorf("%d committed markers after 20 transactions over 2 slots, want one per slot used", offsets)
	}
}

// recordingSender records which messages each committed broker
// transaction held.
type recordingSender struct {
	*kafka.TransactionalSender
	mu  sync.Mutex
	txn map[string]int // payload -> transaction number
	n   int
}

func (r *recordingSender) OpenSlot(ctx context.Context, slot int) (outbox.SlotProducer, error) {
	p, err := r.TransactionalSender.OpenSlot(ctx, slot)
	if err != nil {
		return nil, err
	}
	return &recordingSlot{SlotProducer: p, r: r}, nil
}

type recordingSlot struct {
	outbox.SlotProducer
	r *recordingSender
}

func (s *recordingSlot) SendInTransaction(ctx context.Context, token string, msgs []*outbox.OutboxMessage, ready func() error) error {
	err := s.SlotProducer.SendInTransaction(ctx, token, msgs, ready)
	if err == nil {
		s.r.mu.Lock()
		s.r.n++
		for _, m := range msgs {
			s.r.txn[string(m.Payload)] = s.r.n
		}
		s.r.mu.Unlock()
	}
	return err
}

// One database transaction, one Kafka transaction: the events a
// transaction enqueued over several keys go in one broker transaction,
// even when there are more of them than a batch holds.
func TestExactlyOnceSendsADatabaseTransactionInOneKafkaTransaction(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 3, "eo")
		var payloads []string
		for i := range 12 {
			err := db.Transaction(func(tx *gorm.DB) error {
				for j := range 5 { // one Enqueue call per event: grouped by the transaction, not the call
					p := fmt.Sprintf("tx-%02d-event-%d", i, j)
					payloads = append(payloads, p)
					if err := outbox.Enqueue(tx, outbox.Message{Topic: "eo", Key: fmt.Sprint("key-", (i+j)%4), Payload: p}); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		}
		rec := &recordingSender{TransactionalSender: transactionalSender(t, addrs, "eo-"+uuid.NewString()[:8], kafka.WithSlots(3)), txn: map[string]int{}}
		pub, err := outbox.NewPublisher(db, rec, outbox.WithWorkers(2), outbox.WithBatchSize(3), outbox.WithPollInterval(20*time.Millisecond))
		if err != nil {
			t.Fatal(err)
		}
		if err := pub.Start(t.Context()); err != nil {
			t.Fatal(err)
		}
		waitUntilPublished(t, db, 30*time.Second)
		if err := pub.Stop(t.Context()); err != nil {
			t.Fatal(err)
		}
		checkExactlyOnce(t, addrs, "eo", payloads)
		rec.mu.Lock()
		defer rec.mu.Unlock()
		for i := range 12 {
			first := rec.txn[fmt.Sprintf("tx-%02d-event-0", i)]
			for j := 1; j < 5; j++ {
				if got := rec.txn[fmt.Sprintf("tx-%02d-event-%d", i, j)]; got != first {
					t.Errorf("database transaction %d: event 0 in Kafka transaction %d, event %d in %d", i, first, j, got)
				}
			}
		}
	})
}

// Two database transactions whose keys interleave (the first enqueues a
// on k1 then b on k2, the second c on k2 then d on k1, so that each key's
// order puts one transaction before the other) cannot go one after the
// other: they go together, in one Kafka transaction, each key in order,
// even with a batch of one message.
func TestExactlyOnceSendsInterleavedTransactionsTogether(t *testing.T) {
	eachDBWith(t, func(f features) bool { return f.processes }, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 3, "eo")
		step := make([]chan struct{}, 4)
		for i := range step {
			step[i] = make(chan struct{})
		}
		enqueue := func(tx *gorm.DB, key, payload string) error {
			return outbox.Enqueue(tx, outbox.Message{Topic: "eo", Key: key, Payload: payload})
		}
		errs := make(chan error, 2)
		go func() {
			errs <- db.Transaction(func(tx *gorm.DB) error {
				if err := enqueue(tx, "k1", "a"); err != nil {
					return err
				}
				close(step[0])
				<-step[1]
				if err := enqueue(tx, "k2", "b"); err != nil {
					return err
				}
				close(step[2])
				<-step[3]
				return nil
			})
		}()
		go func() {
			errs <- db.Transaction(func(tx *gorm.DB) error {
				<-step[0]
				if err := enqueue(tx, "k2", "c"); err != nil {
					return err
				}
				close(step[1])
				<-step[2]
				if err := enqueue(tx, "k1", "d"); err != nil {
					return err
				}
				close(step[3])
				return nil
			})
		}()
		for range 2 {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
		rec := &recordingSender{TransactionalSender: transactionalSender(t, addrs, "eo-"+uuid.NewString()[:8], kafka.WithSlots(1)), txn: map[string]int{}}
		pub, err := outbox.NewPublisher(db, rec, outbox.WithBatchSize(1))
		if err != nil {
			t.Fatal(err)
		}
		for range 5 {
			if _, err := pub.PublishOnce(t.Context()); err != nil {
				t.Fatal(err)
			}
		}
		waitUntilPublished(t, db, 5*time.Second)
		recs := outboxtest.ReadAll(t, addrs, "eo", 4, 2*time.Second)
		byKey := map[string]string{}
		for _, r := range recs {
			byKey[string(r.Key)] += string(r.Value)
		}
		if byKey["k1"] != "ad" || byKey["k2"] != "cb" {
			t.Errorf("per key: %v, want k1=ad and k2=cb", byKey)
		}
		rec.mu.Lock()
		defer rec.mu.Unlock()
		if rec.n != 1 {
			t.Errorf("%d Kafka transactions (%v), want the two database transactions in one", rec.n, rec.txn)
		}
	})
}

// A message whose key has an older message in flight never goes ahead of
// it, even when its transaction's other events pull it into a batch, and
// even when that older message was first met as a member of another group.
func TestExactlyOnceKeepsKeyOrderBehindAMessageInFlight(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 3, "eo")
		tx := func(events ...[2]string) {
			t.Helper()
			err := db.Transaction(func(tx *gorm.DB) error {
				for _, e := range events {
					if err := outbox.Enqueue(tx, outbox.Message{Topic: "eo", Key: e[0], Payload: e[1]}); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		}
		tx([2]string{"k3", "e"}, [2]string{"k1", "a"}) // G1: e, then a on k1
		tx([2]string{"k2", "d"}, [2]string{"k1", "b"}) // G2: d, then b on k1, after a
		// a is in flight in another publisher's claim.
		held := db.Table(outbox.DefaultTableName).Where("payload = ?", []byte("a")).
			Updates(map[string]any{"claim_token": "elsewhere", "next_attempt_at": time.Now().Add(time.Hour).UTC()})
		if held.Error != nil || held.RowsAffected != 1 {
			t.Fatalf("holding a: %v (%d rows)", held.Error, held.RowsAffected)
		}
		rec := &recordingSender{TransactionalSender: transactionalSender(t, addrs, "eo-"+uuid.NewString()[:8], kafka.WithSlots(1)), txn: map[string]int{}}
		pub, err := outbox.NewPublisher(db, rec, outbox.WithBatchSize(10))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := pub.PublishOnce(t.Context()); err != nil {
			t.Fatal(err)
		}
		rec.mu.Lock()
		sent := fmt.Sprint(rec.txn)
		rec.mu.Unlock()
		if rec.txn["b"] != 0 || rec.txn["d"] != 0 || rec.txn["e"] != 0 {
			t.Fatalf("sent %v while a, before b on k1, is in flight: b must wait, and d with it; e waits for a, of its transaction", sent)
		}
		released := db.Table(outbox.DefaultTableName).Where("payload = ?", []byte("a")).
			Updates(map[string]any{"claim_token": nil, "next_attempt_at": time.Now().UTC()})
		if released.Error != nil {
			t.Fatal(released.Error)
		}
		for range 3 {
			if _, err := pub.PublishOnce(t.Context()); err != nil {
				t.Fatal(err)
			}
		}
		waitUntilPublished(t, db, 5*time.Second)
		byKey := map[string]string{}
		for _, r := range outboxtest.ReadAll(t, addrs, "eo", 4, 2*time.Second) {
			byKey[string(r.Key)] += string(r.Value)
		}
		if byKey["k1"] != "ab" {
			t.Errorf("k1 delivered %q, want ab", byKey["k1"])
		}
	})
}

// A slot of another transactional id left with a batch in flight is a
// stuck state that needs someone, so the sweeper logs it at error level;
// once, not at every lease, until the stranded slots change.
func TestExactlyOnceLogsASlotStrandedByAnotherPublisherOnce(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 1, "eo")
		var logs syncBuffer
		pub, err := outbox.NewPublisher(db, transactionalSender(t, addrs, "eo-"+uuid.NewString()[:8], kafka.WithSlots(1)),
			outbox.WithWorkers(1), outbox.WithLease(100*time.Millisecond),
			outbox.WithLogger(slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelError}))))
		if err != nil {
			t.Fatal(err)
		}
		if err := pub.Start(t.Context()); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = pub.Stop(t.Context()) }()
		slots := outbox.SlotTableName(outbox.DefaultTableName)
		for deadline := time.Now().Add(10 * time.Second); !db.Migrator().HasTable(slots); time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal("the publisher created no slots table")
			}
		}
		past := time.Now().Add(-time.Hour).UTC()
		err = db.Table(slots).Create(map[string]any{"transactional_id": "another-0", "lease_until": past, "pending": uuid.NewString(), "updated_at": past}).Error
		if err != nil {
			t.Fatal(err)
		}
		const stranded = "slots that are not this publisher's"
		for deadline := time.Now().Add(10 * time.Second); !strings.Contains(logs.String(), stranded); time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("no error about the stranded slot in 10 s; logged: %s", logs.String())
			}
		}
		time.Sleep(time.Second) // ten leases
		if err := pub.Stop(t.Context()); err != nil {
			t.Fatal(err)
		}
		if n := strings.Count(logs.String(), stranded); n != 1 {
			t.Fatalf("the stranded slot was logged %d times, want once:\n%s", n, logs.String())
		}
	})
}
