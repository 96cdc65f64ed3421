package reliability

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"gorm.io/driver/mysql"
	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/kafka"
	"github.com/gorm-outbox/outbox/outboxtest"
	"github.com/gorm-outbox/outbox/pgxpipeline"
)

var long = flag.Bool("reliability.long", false, "run each scenario for a minute instead of a few seconds")

// The test binary is also the publisher process and the inbox scenario's
// consumer process: the suite starts copies of itself with
// OUTBOX_REL_ROLE=publisher or consumer, and kills them.
func TestMain(m *testing.M) {
	switch os.Getenv("OUTBOX_REL_ROLE") {
	case "publisher":
		os.Exit(publisherProcess())
	case "consumer":
		os.Exit(consumerProcess())
	}
	started := time.Now()
	code := m.Run()
	if code == 0 && *markdown != "" {
		if err := writeMarkdown(*markdown, started); err != nil {
			fmt.Fprintln(os.Stderr, "writing", *markdown+":", err)
			code = 1
		}
	}
	os.Exit(code)
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil {
		return v
	}
	return def
}

// processDB opens the database a publisher or consumer process is given.
func processDB() (*gorm.DB, error) {
	dialector := postgres.Open(os.Getenv("OUTBOX_REL_DSN"))
	if os.Getenv("OUTBOX_REL_DIALECT") == "mariadb" {
		dialector = mysql.Open(os.Getenv("OUTBOX_REL_DSN"))
	}
	return gorm.Open(dialector, &gorm.Config{Logger: logger.Discard})
}

func publisherProcess() int {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	db, err := processDB()
	if err != nil {
		log.Error("open", "error", err)
		return 2
	}
	opts := []outbox.PluginOption{outbox.WithoutMigration()}
	if os.Getenv("OUTBOX_REL_DELETE") == "1" {
		opts = append(opts, outbox.WithDeleteOnPublish())
	}
	if err := db.Use(outbox.Plugin(opts...)); err != nil {
		log.Error("plugin", "error", err)
		return 2
	}
	cfg := kafka.NewConfig()
	cfg.Net.DialTimeout, cfg.Net.ReadTimeout, cfg.Net.WriteTimeout = time.Second, 5*time.Second, 5*time.Second
	cfg.Metadata.Retry.Backoff = 100 * time.Millisecond
	brokers := strings.Split(os.Getenv("OUTBOX_REL_BROKERS"), ",")
	var sender interface {
		outbox.Sender
		Close() error
	}
	if os.Getenv("OUTBOX_REL_EXACTLY_ONCE") == "1" {
		// Exactly-once mode: every process of the scenario shares the
		// slots of one transactional id. The sender needs no broker yet.
		if sender, err = kafka.NewTransactionalSender(brokers, "reliability", cfg, kafka.WithSlots(envInt("OUTBOX_REL_SLOTS", kafka.DefaultSlots))); err != nil {
			log.Error("transactional sender", "error", err)
			return 2
		}
	}
	for sender == nil { // the broker may be away when this process starts
		s, err := kafka.NewSender(brokers, cfg)
		if err == nil {
			sender = s
			break
		}
		select {
		case <-ctx.Done():
			return 0
		case <-time.After(200 * time.Millisecond):
		}
	}
	defer sender.Close()
	pub, err := outbox.NewPublisher(db, sender,
		outbox.WithWorkers(envInt("OUTBOX_REL_WORKERS", 2)),
		outbox.WithBatchSize(envInt("OUTBOX_REL_BATCH", 50)),
		outbox.WithLease(time.Duration(envInt("OUTBOX_REL_LEASE_MS", 10000))*time.Millisecond),
		outbox.WithPollInterval(20*time.Millisecond),
		outbox.WithMaxPause(time.Second),
		outbox.WithRetryPolicy(outbox.RetryPolicy{MaxAttempts: envInt("OUTBOX_REL_MAX_ATTEMPTS", 3), MinBackoff: 50 * time.Millisecond, MaxBackoff: 300 * time.Millisecond}),
		outbox.WithLogger(log))
	if err != nil {
		log.Error("publisher", "error", err)
		return 2
	}
	if err := pub.Run(ctx); err != nil {
		log.Error("run", "error", err)
		return 1
	}
	return 0
}

// fleet is the publisher (or consumer) processes of a scenario.
type fleet struct {
	t       *testing.T
	name    string // "publisher" or "consumer"
	env     []string
	mu      sync.Mutex
	running []*exec.Cmd
	kills   int
	pauses  int // processes stopped with a claim in flight
	missed  int // processes stopped and continued at once: their claim had settled
}

func (f *fleet) start() {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), f.env...)
	cmd.Stderr = os.Stderr
	dieWithParent(cmd)
	if err := cmd.Start(); err != nil {
		f.t.Fatalf("starting a %s: %v", f.name, err)
	}
	f.mu.Lock()
	f.running = append(f.running, cmd)
	f.mu.Unlock()
}

// killOne SIGKILLs a random process of the fleet and starts another.
func (f *fleet) killOne() { f.killOneOf(func(int) bool { return true }) }

// killOneOf SIGKILLs a random one of the processes whose pid may accepts,
// and starts another; false if may accepts none.
func (f *fleet) killOneOf(may func(pid int) bool) bool {
	f.mu.Lock()
	var candidates []int
	for i, cmd := range f.running {
		if may(cmd.Process.Pid) {
			candidates = append(candidates, i)
		}
	}
	if len(candidates) == 0 {
		f.mu.Unlock()
		return false
	}
	i := candidates[rand.N(len(candidates))]
	cmd := f.running[i]
	f.running = append(f.running[:i], f.running[i+1:]...)
	f.kills++
	f.mu.Unlock()
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	f.start()
	return true
}

// pauseInFlight SIGSTOPs, for d, a process that holds a claim in flight
// (one of the pids holders reads: a batch between its claim and its
// settlement), then SIGCONTs it. A process that, once stopped, no longer
// holds one is continued at once and another is tried, for up to within.
// false: no process was caught with a claim in flight.
func (f *fleet) pauseInFlight(d, within time.Duration, holders func() map[int]bool) bool {
	for deadline := time.Now().Add(within); time.Now().Before(deadline); {
		var target *exec.Cmd
		held := holders()
		f.mu.Lock()
		for _, cmd := range f.running {
			if held[cmd.Process.Pid] {
				target = cmd
				break
			}
		}
		f.mu.Unlock()
		if target == nil {
			time.Sleep(2 * time.Millisecond)
			continue
		}
		_ = target.Process.Signal(syscall.SIGSTOP)
		if !holders()[target.Process.Pid] { // settled in the meantime
			_ = target.Process.Signal(syscall.SIGCONT)
			f.mu.Lock()
			f.missed++
			f.mu.Unlock()
			continue
		}
		time.Sleep(d)
		_ = target.Process.Signal(syscall.SIGCONT)
		f.mu.Lock()
		f.pauses++
		f.mu.Unlock()
		return true
	}
	return false
}

// stop stops every process gracefully (SIGTERM) and waits for it.
func (f *fleet) stop() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, cmd := range f.running {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Process.Signal(syscall.SIGCONT) // one left stopped by a failed test
	}
	for _, cmd := range f.running {
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-done
			f.t.Errorf("a %s did not stop within 30s of SIGTERM", f.name)
		}
	}
	f.running = nil
}

// openDatabase returns a PostgreSQL schema or a MariaDB database of the
// test's own, and its DSN for other processes.
func openDatabase(t *testing.T, dialect string) (*gorm.DB, string) {
	if dialect == "mariadb" {
		return outboxtest.MariaDBDatabase(t, nil)
	}
	return outboxtest.PostgresSchema(t, nil)
}

// startBroker starts a kfake broker with topic's partitions behind the
// fault proxy (kfake advertises the proxy's address), with configs beside
// the suite's maximum message size; both close when the test ends.
func startBroker(t *testing.T, topic string, partitions int, configs map[string]string) *Proxy {
	var proxy *Proxy
	cfgs := map[string]string{"message.max.bytes": "65536"}
	maps.Copy(cfgs, configs)
	opts := []kfake.Opt{kfake.NumBrokers(1), kfake.SeedTopics(int32(partitions), topic),
		kfake.BrokerConfigs(cfgs),
		kfake.ListenFn(func(network, address string) (net.Listener, error) {
			ln, err := net.Listen(network, address)
			if err != nil {
				return nil, err
			}
			if proxy, err = NewProxy(ln.Addr().String()); err != nil {
				return nil, err
			}
			return AdvertisedListener{Listener: ln, Advertised: proxy.ln.Addr()}, nil
		})}
	cluster, err := kfake.NewCluster(opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cluster.Close(); proxy.Close() })
	return proxy
}

// drain waits until every committed message is published or dead. A long
// run can leave a backlog bigger than a fixed wait allows, so the drain
// fails only when it stops making progress.
func drain(t *testing.T, db *gorm.DB) {
	const stall = 60 * time.Second
	best, lastProgress := int64(-1), time.Now()
	for {
		var pending int64
		err := db.Table(outbox.DefaultTableName).Where("state = ?", outbox.StatePending).Count(&pending).Error
		if err == nil && pending == 0 {
			return
		}
		if err == nil && (best < 0 || pending < best) {
			best, lastProgress = pending, time.Now()
		}
		if time.Since(lastProgress) > stall {
			t.Fatalf("%d messages still pending, none published for %v (err %v)", pending, stall, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

type scenario struct {
	name       string
	dialects   []string // the databases it runs on; nil: both
	dialect    string   // postgres or mariadb
	publishers int
	workers    int
	batch      int
	killEvery  time.Duration
	// pauseFor SIGSTOPs, one after another, publishers caught with a
	// claim in flight, for that long each.
	pauseFor   time.Duration
	outage     bool // cut the broker off for a few seconds
	dbRestart  bool // restart the database (a private instance)
	poison     bool // mix in messages over the broker's maximum size
	lateCommit bool // a transaction that commits long after later ones were published
	pipelined  bool // the writers enqueue through pgxpipeline.DriverName (PostgreSQL)
	// exactlyOnce runs the publishers with a kafka.TransactionalSender,
	// holding their slots under lease, and the writers' transactions each
	// enqueue events over several aggregates; the suite then fails on any
	// duplicate and any transaction not delivered whole in one Kafka
	// transaction.
	exactlyOnce bool
	lease       time.Duration // the publishers' WithLease; 0: the suite's default
	// brokerLatency delays each chunk through the broker's proxy, either
	// way, while the faults run.
	brokerLatency time.Duration
	// deletes runs the publishers WithDeleteOnPublish; the check reads the
	// committed events from the copy KeepCommitted makes of each.
	deletes bool
}

// claimHolders are the pids of the publisher processes that hold a slot
// with a claim in flight (a batch between its claim and its settlement),
// read from the slots table, whose owners are "<host>/<pid>/<worker>".
func claimHolders(db *gorm.DB) map[int]bool {
	var owners []string
	db.Table(outbox.SlotTableName(outbox.DefaultTableName)).Where("pending IS NOT NULL AND owner IS NOT NULL").Pluck("owner", &owners)
	pids := map[int]bool{}
	for _, o := range owners {
		if parts := strings.Split(o, "/"); len(parts) >= 3 {
			if pid, err := strconv.Atoi(parts[len(parts)-2]); err == nil {
				pids[pid] = true
			}
		}
	}
	return pids
}

// exactlyOnceLease is the slot lease of the exactly-once scenarios: short,
// so that a slot whose holder was killed or stopped is taken over, and its
// claim settled, within the scenario.
const exactlyOnceLease = time.Second

// postgresOnly marks the scenarios of PostgreSQL's own features: the
// pipelined pgx driver, and postgres-restart (which exactly-once-database-restart
// runs on both databases).
var postgresOnly = []string{"postgres"}

func TestReliability(t *testing.T) {
	scenarios := []scenario{
		{name: "concurrent-enqueuers", publishers: 1, workers: 2, batch: 50},
		{name: "publishers-4", publishers: 4, workers: 2, batch: 50},
		{name: "kill-loop", publishers: 3, workers: 2, batch: 20, killEvery: 300 * time.Millisecond},
		{name: "broker-outage", publishers: 2, workers: 2, batch: 50, outage: true},
		{name: "postgres-restart", dialects: postgresOnly, publishers: 2, workers: 2, batch: 50, dbRestart: true},
		{name: "poison", publishers: 2, workers: 2, batch: 50, poison: true},
		{name: "late-commit", publishers: 2, workers: 2, batch: 50, lateCommit: true},
		// Published rows deleted: on MariaDB the claims walk the primary
		// key, past the dead messages the poison leaves among the pending.
		{name: "delete-on-publish-kill-loop", publishers: 3, workers: 2, batch: 20, killEvery: 300 * time.Millisecond,
			poison: true, deletes: true},
		// The events' INSERTs sent with the COMMITs: a commit that fails
		// (the restart) must take its events with it.
		{name: "pipelined-enqueuers", dialects: postgresOnly, publishers: 2, workers: 2, batch: 50, pipelined: true},
		{name: "pipelined-restart", dialects: postgresOnly, publishers: 2, workers: 2, batch: 50, dbRestart: true, pipelined: true},
		// Exactly-once mode: each batch in one Kafka transaction, whose
		// slot a taker-over fences and settles from its marker.
		{name: "exactly-once-kill-loop", publishers: 3, workers: 2, batch: 20, killEvery: 300 * time.Millisecond,
			exactlyOnce: true, lease: exactlyOnceLease},
		// Stopped for longer than its lease, a publisher wakes as a zombie
		// whose slots were taken over: its transactions must be fenced.
		{name: "exactly-once-pause-loop", publishers: 3, workers: 2, batch: 20, pauseFor: 3 * time.Second,
			brokerLatency: 3 * time.Millisecond, exactlyOnce: true, lease: exactlyOnceLease},
		{name: "exactly-once-broker-outage", publishers: 2, workers: 2, batch: 50, outage: true,
			exactlyOnce: true, lease: exactlyOnceLease},
		{name: "exactly-once-database-restart", publishers: 2, workers: 2, batch: 50, dbRestart: true,
			exactlyOnce: true, lease: exactlyOnceLease},
	}
	for _, dialect := range []string{"postgres", "mariadb"} {
		for _, sc := range scenarios {
			if sc.dialects != nil && !slices.Contains(sc.dialects, dialect) {
				continue
			}
			sc.dialect = dialect
			t.Run(dialect+"/"+sc.name, func(t *testing.T) { run(t, sc) })
		}
	}
}

// privateServer is a database instance of the scenario's own, which it
// may stop and start again without disturbing the shared servers.
type privateServer interface {
	DSN() string
	Stop() error
	Start() error
}

// startPrivateServer starts a private instance of dialect's server,
// removed when the test ends.
func startPrivateServer(t *testing.T, dialect string) privateServer {
	if dialect == "mariadb" {
		s, err := StartMariaDB()
		if err != nil {
			outboxtest.Unavailable(t, "a private MariaDB (mariadb-install-db, mariadbd)", err)
		}
		t.Cleanup(s.Remove)
		return s
	}
	s, err := StartPostgres()
	if err != nil {
		outboxtest.Unavailable(t, "a private PostgreSQL (initdb, pg_ctl)", err)
	}
	t.Cleanup(s.Remove)
	return s
}

// report prints a scenario's line, and appends it to the file named by
// OUTBOX_RELIABILITY_REPORT, so that CI shows it even when go test hides
// the output of passing packages.
func report(line string) {
	fmt.Println(line)
	remember(line)
	if path := os.Getenv("OUTBOX_RELIABILITY_REPORT"); path != "" {
		if f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644); err == nil {
			fmt.Fprintln(f, line)
			f.Close()
		}
	}
}

func run(t *testing.T, sc scenario) {
	duration := 4 * time.Second
	if *long {
		duration = time.Minute
	}
	const topic = "reliability"
	var (
		db     *gorm.DB
		dsn    string
		server privateServer
	)
	if sc.dbRestart {
		server = startPrivateServer(t, sc.dialect)
		dsn = server.DSN()
		dialector := postgres.Open(dsn)
		if sc.dialect == "mariadb" {
			dialector = mysql.Open(dsn)
		}
		var err error
		if db, err = gorm.Open(dialector, &gorm.Config{Logger: logger.Discard}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if sqlDB, err := db.DB(); err == nil {
				sqlDB.Close()
			}
		})
	} else {
		db, dsn = openDatabase(t, sc.dialect)
	}
	if err := db.Use(outbox.Plugin()); err != nil {
		t.Fatal(err)
	}
	if sc.deletes {
		if err := KeepCommitted(db); err != nil {
			t.Fatal(err)
		}
	}
	writers := db
	if sc.pipelined {
		var err error
		if writers, err = gorm.Open(postgres.New(postgres.Config{DriverName: pgxpipeline.DriverName, DSN: dsn}),
			&gorm.Config{Logger: logger.Discard}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if sqlDB, err := writers.DB(); err == nil {
				sqlDB.Close()
			}
		})
		if err := writers.Use(outbox.Plugin(outbox.WithoutMigration())); err != nil {
			t.Fatal(err)
		}
	}
	// In exactly-once mode the writers' transactions span several
	// aggregates: each must reach a read_committed consumer whole, in one
	// Kafka transaction.
	w := Workload{DB: writers, Topic: topic, Keys: 40, Writers: 8, Duration: duration, RollbackEvery: 7, MultiKey: sc.exactlyOnce}
	if sc.poison {
		w.PoisonEvery, w.PoisonBytes = 97, 100_000
	}
	if err := w.Setup(); err != nil {
		t.Fatal(err)
	}

	proxy := startBroker(t, topic, 4, nil)
	addrs := []string{proxy.Addr()}

	f := &fleet{t: t, name: "publisher", env: []string{
		"OUTBOX_REL_ROLE=publisher", "OUTBOX_REL_DSN=" + dsn, "OUTBOX_REL_DIALECT=" + sc.dialect, "OUTBOX_REL_BROKERS=" + proxy.Addr(),
		"OUTBOX_REL_WORKERS=" + strconv.Itoa(sc.workers), "OUTBOX_REL_BATCH=" + strconv.Itoa(sc.batch),
	}}
	if sc.lease > 0 {
		f.env = append(f.env, "OUTBOX_REL_LEASE_MS="+strconv.FormatInt(sc.lease.Milliseconds(), 10))
	}
	if sc.deletes {
		f.env = append(f.env, "OUTBOX_REL_DELETE=1")
	}
	if sc.exactlyOnce {
		// A slot per worker and two more: a restarted process finds one
		// free at once only while its predecessor's leases have not all
		// run out, so that takeovers happen.
		f.env = append(f.env, "OUTBOX_REL_EXACTLY_ONCE=1", "OUTBOX_REL_SLOTS="+strconv.Itoa(sc.publishers*sc.workers+2))
	}
	for range sc.publishers {
		f.start()
	}
	t.Cleanup(f.stop)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan WorkloadResult)
	go func() { done <- w.Run(ctx) }()

	var faults sync.WaitGroup
	var resumedIn time.Duration
	start := time.Now()
	switch {
	case sc.killEvery > 0:
		faults.Add(1)
		go func() {
			defer faults.Done()
			for time.Since(start) < duration {
				time.Sleep(sc.killEvery)
				f.killOne()
			}
		}()
	case sc.pauseFor > 0:
		// A broker a few milliseconds away: a batch's broker transaction
		// takes long enough that a pause often stops a process inside it.
		proxy.SetLatency(sc.brokerLatency)
		faults.Add(1)
		go func() {
			defer faults.Done()
			defer proxy.SetLatency(0)
			for time.Since(start) < duration {
				time.Sleep(200 * time.Millisecond)
				f.pauseInFlight(sc.pauseFor, time.Second, func() map[int]bool { return claimHolders(db) })
			}
		}()
	case sc.outage:
		faults.Add(1)
		go func() {
			defer faults.Done()
			time.Sleep(duration / 4)
			proxy.SetDown(true)
			time.Sleep(3 * time.Second)
			// Resumed when the broker acknowledges again: a message is marked published.
			published := func() int64 {
				var n int64
				db.Table(outbox.DefaultTableName).Where("state = ?", outbox.StatePublished).Count(&n)
				return n
			}
			before := published()
			proxy.SetDown(false)
			up := time.Now()
			for published() == before && time.Since(up) < 30*time.Second {
				time.Sleep(10 * time.Millisecond)
			}
			resumedIn = time.Since(up)
		}()
	case sc.dbRestart:
		faults.Add(1)
		go func() {
			defer faults.Done()
			time.Sleep(duration / 3)
			if err := server.Stop(); err != nil {
				t.Error(err)
			}
			time.Sleep(time.Second)
			if err := server.Start(); err != nil {
				t.Error(err)
			}
		}()
	case sc.lateCommit:
		faults.Add(1)
		go func() {
			defer faults.Done()
			// Enqueued (and given its id) now, committed after later ids were published.
			err := db.Transaction(func(tx *gorm.DB) error {
				if err := outbox.Enqueue(tx, outbox.Message{Topic: topic, Key: "late", Payload: `{"k":"late","v":1}`}); err != nil {
					return err
				}
				time.Sleep(duration / 2)
				return nil
			})
			if err != nil {
				t.Error(err)
			}
		}()
	}
	result := <-done
	faults.Wait()
	if result.Committed == 0 {
		t.Fatalf("the workload committed nothing (%d transactions failed)", result.Failed)
	}

	drain(t, db)
	f.stop()

	rep, err := Check(context.Background(), db, addrs, topic)
	if err != nil {
		t.Fatal(err)
	}
	rep.Scenario = sc.dialect + "/" + sc.name
	report(rep.String())
	t.Logf("transactions: %d committed, %d rolled back, %d failed; publisher kills: %d; pauses with a claim in flight: %d (%d more stopped and continued at once)",
		result.Committed, result.RolledBack, result.Failed, f.kills, f.pauses, f.missed)

	if rep.Lost != 0 || rep.Phantoms != 0 || rep.OrderViolations != 0 || rep.Partial != 0 {
		t.Errorf("lost=%d phantoms=%d order_violations=%d partial=%d: all must be 0", rep.Lost, rep.Phantoms, rep.OrderViolations, rep.Partial)
	}
	// A duplicate is a message whose send had begun when its publisher died
	// or its connection was cut: at most a batch per worker per fault. In
	// exactly-once mode there is none.
	bound := f.kills * sc.workers * sc.batch
	if sc.outage || sc.dbRestart {
		bound = sc.publishers * sc.workers * sc.batch
	}
	if sc.exactlyOnce {
		bound = 0
		if rep.Takeovers < 0 {
			t.Error("the publishers ran in exactly-once mode, yet there is no slots table")
		}
		// The loops must have done what they are for: slots taken over
		// from a killed or stopped holder, its producer fenced.
		if sc.pauseFor > 0 && f.pauses == 0 {
			t.Error("no publisher was stopped with a claim in flight")
		}
		if (sc.killEvery > 0 || f.pauses > 0) && rep.Takeovers == 0 {
			t.Errorf("no slot was taken over in %d kills and %d pauses", f.kills, f.pauses)
		}
		t.Logf("committed database transactions of several events: %d; delivered in part or over several Kafka transactions: %d", rep.Groups, rep.PartialGroups)
		if rep.Groups == 0 {
			t.Error("no committed database transaction enqueued several events")
		}
		if rep.PartialGroups != 0 {
			t.Errorf("partial_groups=%d: every committed database transaction must be delivered whole, in one Kafka transaction", rep.PartialGroups)
		}
	}
	if rep.Duplicates > bound {
		t.Errorf("duplicates=%d over the bound of %d", rep.Duplicates, bound)
	}
	var poison int64
	db.Table(outbox.DefaultTableName).Where("length(payload) > 65536").Count(&poison)
	if rep.Dead != int(poison) {
		t.Errorf("dead=%d, want the %d poison messages; their errors: %s", rep.Dead, poison, lastErrors(db, "state = 'dead' AND length(payload) <= 65536"))
	}
	if sc.poison && poison == 0 {
		t.Error("the poison scenario wrote no poison message")
	}
	if sc.deletes {
		var kept int64
		if err := db.Table(outbox.DefaultTableName).Where("state <> ?", outbox.StateDead).Count(&kept).Error; err != nil {
			t.Fatal(err)
		}
		if kept != 0 || rep.Delivered == 0 {
			t.Errorf("the publishers that delete what they published left %d rows that are not dead, and delivered %d", kept, rep.Delivered)
		}
	}
	if sc.outage {
		var charged int64
		db.Table(outbox.DefaultTableName).Where("attempts > 0").Count(&charged)
		if charged != 0 {
			t.Errorf("the outage charged %d messages an attempt; their errors: %s", charged, lastErrors(db, "attempts > 0"))
		}
		report(fmt.Sprintf("scenario=%s/%s resumed_after_broker_returned=%s", sc.dialect, sc.name, resumedIn.Round(time.Millisecond)))
		if resumedIn > 10*time.Second {
			t.Errorf("publishing resumed %v after the broker returned; the bound is 10s", resumedIn)
		}
	}
	if sc.lateCommit {
		var n int64
		db.Table(outbox.DefaultTableName).Where("message_key = 'late' AND state = ?", outbox.StatePublished).Count(&n)
		if n != 1 {
			t.Error("the late-committing message was not published")
		}
	}
}

// lastErrors lists the most frequent last errors of the outbox rows that
// match where, with their counts: what a failed check needs to be read.
func lastErrors(db *gorm.DB, where string) string {
	var rows []struct {
		LastError string
		N         int64
	}
	err := db.Table(outbox.DefaultTableName).Select("last_error, count(*) AS n").Where(where).
		Group("last_error").Order("n DESC").Limit(3).Scan(&rows).Error
	if err != nil {
		return "(reading them failed: " + err.Error() + ")"
	}
	var out []string
	for _, r := range rows {
		out = append(out, fmt.Sprintf("%d× %q", r.N, r.LastError))
	}
	return strings.Join(out, "; ")
}
