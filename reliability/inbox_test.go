package reliability

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/IBM/sarama"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/inbox"
)

// consumerProcess is service B's process: an inbox consumer in the ledger's
// group, applying A's events to its database until SIGTERM.
func consumerProcess() int {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	db, err := processDB()
	if err != nil {
		log.Error("open", "error", err)
		return 2
	}
	if sqlDB, err := db.DB(); err == nil {
		sqlDB.SetMaxOpenConns(8) // three processes share the server with the others' tests
	}
	if err := db.Use(inbox.Plugin(inbox.WithoutMigration())); err != nil {
		log.Error("plugin", "error", err)
		return 2
	}
	cfg := sarama.NewConfig()
	cfg.Version = sarama.V3_6_0_0
	cfg.ClientID = fmt.Sprintf("ledger-%d", os.Getpid()) // the kill loop finds the process's member by it
	cfg.Consumer.Offsets.Initial = sarama.OffsetOldest
	cfg.Metadata.Retry.Backoff = 100 * time.Millisecond
	// A killed consumer's partitions move to the others within seconds,
	// so that the kill loop makes rebalance after rebalance.
	cfg.Consumer.Group.Session.Timeout = 2 * time.Second
	cfg.Consumer.Group.Heartbeat.Interval = 400 * time.Millisecond
	cfg.Consumer.Group.Rebalance.Timeout = 5 * time.Second
	cfg.Consumer.Group.Rebalance.Retry.Backoff = 200 * time.Millisecond
	c, err := inbox.NewBatchConsumer(db, strings.Split(os.Getenv("OUTBOX_REL_BROKERS"), ","), os.Getenv("OUTBOX_REL_GROUP"),
		[]string{os.Getenv("OUTBOX_REL_TOPIC")}, ApplyEvents, inbox.WithSaramaConfig(cfg), inbox.WithLogger(log))
	if err != nil {
		log.Error("consumer", "error", err)
		return 2
	}
	if err := c.Run(ctx); err != nil {
		log.Error("run", "error", err)
		return 1
	}
	return 0
}

// TestInboxEndToEnd chains two services through Kafka. Service A is the
// kill-loop scenario: writers commit (and roll back) events, publisher
// processes relay them and are SIGKILLed every 300 ms. Service B is three
// consumer processes in one consumer group, each applying the events to a
// ledger in a database of B's own through the inbox; one of them is
// SIGKILLed and restarted at random intervals, each soon after the group
// has settled from the last, so that it rebalances again and again. When A
// is drained and B has caught up, every event A committed must have been
// applied once, in its key's order, and nothing A rolled back.
func TestInboxEndToEnd(t *testing.T) {
	for _, dialect := range []string{"postgres", "mariadb"} {
		t.Run(dialect, func(t *testing.T) { runInbox(t, dialect) })
	}
}

// stableMembers returns the client ids of group's members when the group is
// stable, and nothing while it rebalances or cannot be described.
func stableMembers(ctx context.Context, cl *kgo.Client, group string) map[string]bool {
	req := kmsg.NewPtrDescribeGroupsRequest()
	req.Groups = []string{group}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	resp, err := req.RequestWith(ctx, cl)
	if err != nil || len(resp.Groups) != 1 || resp.Groups[0].ErrorCode != 0 || resp.Groups[0].State != "Stable" {
		return nil
	}
	ids := map[string]bool{}
	for _, m := range resp.Groups[0].Members {
		ids[m.ClientID] = true
	}
	return ids
}

func runInbox(t *testing.T, dialect string) {
	duration := 15 * time.Second
	if *long {
		duration = time.Minute
	}
	const (
		topic, group          = "reliability", "ledger"
		publishers, workers   = 3, 2
		batch, consumers      = 20, 3
		partitions            = 6
		publisherKillEvery    = 300 * time.Millisecond
		minKillGap, maxJitter = 300 * time.Millisecond, 1200 * time.Millisecond
	)
	// B has a database (a schema on PostgreSQL) of its own, as a second
	// service would: its tables and A's cannot be mistaken for each other,
	// and the check reads each side from where that service keeps it.
	adb, adsn := openDatabase(t, dialect)
	bdb, bdsn := openDatabase(t, dialect)
	if err := adb.Use(outbox.Plugin()); err != nil {
		t.Fatal(err)
	}
	w := Workload{DB: adb, Topic: topic, Keys: 40, Writers: 8, Duration: duration, RollbackEvery: 7, Amounts: true}
	if err := w.Setup(); err != nil {
		t.Fatal(err)
	}
	if err := bdb.Use(inbox.Plugin()); err != nil {
		t.Fatal(err)
	}
	if err := SetupLedger(bdb, w.AggregateKeys()); err != nil {
		t.Fatal(err)
	}
	// kfake refuses session timeouts under 6 s unless told otherwise.
	proxy := startBroker(t, topic, partitions, map[string]string{"group.min.session.timeout.ms": "1000"})

	pubs := &fleet{t: t, name: "publisher", env: []string{
		"OUTBOX_REL_ROLE=publisher", "OUTBOX_REL_DSN=" + adsn, "OUTBOX_REL_DIALECT=" + dialect, "OUTBOX_REL_BROKERS=" + proxy.Addr(),
		"OUTBOX_REL_WORKERS=" + strconv.Itoa(workers), "OUTBOX_REL_BATCH=" + strconv.Itoa(batch),
	}}
	for range publishers {
		pubs.start()
	}
	t.Cleanup(pubs.stop)
	cons := &fleet{t: t, name: "consumer", env: []string{
		"OUTBOX_REL_ROLE=consumer", "OUTBOX_REL_DSN=" + bdsn, "OUTBOX_REL_DIALECT=" + dialect, "OUTBOX_REL_BROKERS=" + proxy.Addr(),
		"OUTBOX_REL_TOPIC=" + topic, "OUTBOX_REL_GROUP=" + group,
	}}
	for range consumers {
		cons.start()
	}
	t.Cleanup(cons.stop)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan WorkloadResult)
	go func() { done <- w.Run(ctx) }()

	// A's kill loop runs while the writers do; B's until A is drained, so
	// that B consumes its backlog through rebalances too.
	start := time.Now()
	stopKilling := make(chan struct{})
	var once sync.Once
	stopKills := func() { once.Do(func() { close(stopKilling) }) }
	var faults sync.WaitGroup
	defer func() { stopKills(); faults.Wait() }() // before the fleets stop, on a failure too
	faults.Add(2)
	go func() {
		defer faults.Done()
		for time.Since(start) < duration {
			select {
			case <-stopKilling:
				return
			case <-time.After(publisherKillEvery):
				pubs.killOne()
			}
		}
	}()
	admin, err := kgo.NewClient(kgo.SeedBrokers(proxy.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	go func() {
		defer faults.Done()
		for {
			select {
			case <-stopKilling:
				return
			case <-time.After(minKillGap + rand.N(maxJitter)):
			}
			// Only a member of the group as it stands is killed: kfake
			// never expires a new member that dies waiting for the answer
			// to its first JoinGroup, and the group would then keep
			// assigning it partitions that nobody consumes.
			for {
				members := stableMembers(ctx, admin, group)
				if cons.killOneOf(func(pid int) bool { return members[fmt.Sprintf("ledger-%d", pid)] }) {
					break
				}
				select {
				case <-stopKilling:
					return
				case <-time.After(100 * time.Millisecond):
				}
			}
		}
	}()
	result := <-done
	if result.Committed == 0 {
		t.Fatalf("the workload committed nothing (%d transactions failed)", result.Failed)
	}
	drain(t, adb)
	stopKills()
	faults.Wait()
	pubs.stop()
	drained := time.Now()

	// B catches up: wait until it has applied as many events as A
	// published, failing only when it stops making progress.
	var published, behind int64
	if err := adb.Table(outbox.DefaultTableName).Where("topic = ? AND state = ?", topic, outbox.StatePublished).
		Count(&published).Error; err != nil {
		t.Fatal(err)
	}
	const stall = 60 * time.Second
	best, lastProgress := int64(-1), time.Now()
	for {
		var n int64
		err := bdb.Model(&Posting{}).Distinct("message_id").Count(&n).Error
		if err == nil && best < 0 {
			behind = published - n
		}
		if err == nil && n >= published {
			break
		}
		if err == nil && n > best {
			best, lastProgress = n, time.Now()
		}
		if time.Since(lastProgress) > stall {
			t.Errorf("%d of %d events applied, none for %v (err %v)", best, published, stall, err)
			break
		}
		time.Sleep(250 * time.Millisecond) // the count reads every posting: not too often
	}
	caughtUp := time.Since(drained)
	cons.stop()

	arep, err := Check(context.Background(), adb, []string{proxy.Addr()}, topic)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := CheckInbox(context.Background(), adb, bdb, topic, group)
	if err != nil {
		t.Fatal(err)
	}
	rep.Scenario = dialect + "/inbox-end-to-end"
	report(rep.String())
	arep.Scenario = "service-A"
	t.Logf("A: transactions: %d committed, %d rolled back, %d failed; publisher kills: %d; %s",
		result.Committed, result.RolledBack, result.Failed, pubs.kills, arep)
	t.Logf("B: consumer kills: %d; %d events behind when A was drained, caught up %v later; phantoms=%d unbalanced=%d unsettled=%d",
		cons.kills, behind, caughtUp.Round(time.Millisecond), rep.Phantoms, rep.Unbalanced, rep.Unsettled)

	if rep.Lost != 0 || rep.AppliedTwice != 0 || rep.OrderViolations != 0 {
		t.Errorf("lost=%d applied_twice=%d order_violations=%d: all must be 0", rep.Lost, rep.AppliedTwice, rep.OrderViolations)
	}
	if rep.Phantoms != 0 {
		t.Errorf("B applied %d events that A never committed (rolled back)", rep.Phantoms)
	}
	if rep.Unbalanced != 0 {
		t.Errorf("%d accounts' balances or counts differ from their committed events", rep.Unbalanced)
	}
	if rep.Unsettled != 0 {
		t.Errorf("%d of B's inbox records are not applied (parked, held or waiting)", rep.Unsettled)
	}
	// B's loss is A's when the events never reached Kafka: say which.
	if arep.Lost != 0 || arep.Phantoms != 0 || arep.OrderViolations != 0 || arep.Partial != 0 {
		t.Errorf("service A: lost=%d phantoms=%d order_violations=%d partial=%d: all must be 0",
			arep.Lost, arep.Phantoms, arep.OrderViolations, arep.Partial)
	}
}
