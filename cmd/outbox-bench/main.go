// Command outbox-bench measures the outbox against PostgreSQL and a kfake
// broker over TCP, each result beside a reference measured in the same run,
// because only ratios taken together mean anything on a shared machine:
//
//  1. drain: messages per second to relay a backlog, beside the database
//     alone (one DELETE ... SKIP LOCKED ... RETURNING per batch, nothing
//     sent) and the broker alone (the same sarama settings, no database),
//     and beside a relay that holds a transaction across each send (no
//     lease, no per-key order across workers);
//
//  2. latency: commit-to-acknowledgement p50, p99 and max at steady enqueue
//     rates, with the wake-up (NOTIFY) and with polling only, over
//     interleaved rounds (past 1,000 events a second, several events a
//     transaction, so that the writers reach the rate);
//
//  3. enqueue: transactions per second of a one-row domain transaction
//     with and without one event, at 8 writers, through pgx's driver and
//     through pgxpipeline; and one 500-event transaction;
//
//  4. scaling (-scaling): drain throughput at 10k, 100k and 1M pending,
//     and with 10M published rows retained, each beside the database
//     ceiling's drain of the same depth;
//
//  5. mariadb: the drain on MariaDB beside the simplest correct relay and
//     MariaDB alone (the relay's loop without the send), published rows
//     deleted and kept, and the drain of 1M pending beside 10k;
//
//  6. inbox: messages a second that the inbox applies from a preloaded
//     topic, with a batch handler and with a per-message one, beside a bare
//     sarama consumer group writing the same rows in the same batches
//     without deduplication, on PostgreSQL and on MariaDB;
//
//  7. exactly-once: the drain of part 1's backlog and the latency at
//     1,000 events a second, each by the at-least-once publisher and by the
//     exactly-once one (kafka.NewTransactionalSender), interleaved; the
//     latency to a consumer reading with isolation.level=read_committed.
//
//     go run ./cmd/outbox-bench                    # parts 1-3, 4 to 5 minutes
//     go run ./cmd/outbox-bench -scaling           # part 4 alone, 2.5 to 15 minutes
//     go run ./cmd/outbox-bench -scaling -depths 10000,100000 -published 200000
//     go run ./cmd/outbox-bench -only drain -n 1000000
//     go run ./cmd/outbox-bench -only drain -quick  # the ceilings and one publisher line, to compare changes
//     go run ./cmd/outbox-bench -only mariadb                 # part 5 alone, about 5 minutes
//     go run ./cmd/outbox-bench -only inbox                   # part 6 alone, about 4 minutes
//     go run ./cmd/outbox-bench -only exactly-once            # part 7 alone, about 2 minutes
//     go run ./cmd/outbox-bench -only drain,latency,enqueue,scaling,mariadb,inbox,exactly-once -markdown docs/performance.md
//     cmd/outbox-bench/pgbench/run.sh              # part 3's SQL through pgbench, without Go
//
// It prints its conditions first. Every part works in a schema of its own,
// dropped at the end. -markdown FILE also writes the figures, the command
// and the conditions as markdown (docs/performance.md is that file).
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strings"
	"time"

	"github.com/google/uuid"
	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/inbox"
)

type settings struct {
	dsn           string
	n             int
	batch         int
	workers       int
	payloadBytes  int
	keys          int
	rates         []int
	seconds       int
	enqueueRounds int
	writers       int
	rounds        int
	quick         bool
	depths        []int // the scaling part's backlogs, the first its base
	published     int   // published rows kept in the scaling part's last step
	mariadbDSN    string
	mariadbN      int   // the MariaDB part's backlog
	mariadbDepths []int // the MariaDB part's scaling backlogs, the first its base
	inboxN        int   // messages the inbox part's consumers apply a run
	inboxBatch    int   // the inbox part's batch size, both sides
	// exactlyOnceRate is the events a second of the exactly-once part's
	// latency runs.
	exactlyOnceRate int
}

func main() {
	var s settings
	flag.StringVar(&s.dsn, "dsn", envOr("OUTBOX_BENCH_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test sslmode=disable"), "PostgreSQL DSN")
	flag.IntVar(&s.n, "n", 100_000, "messages in the drained backlog")
	flag.IntVar(&s.batch, "batch", 500, "publisher batch size (and the database ceiling's)")
	flag.IntVar(&s.workers, "workers", 4, "publisher workers (and ceiling goroutines)")
	flag.IntVar(&s.payloadBytes, "payload", 200, "payload bytes")
	flag.IntVar(&s.keys, "keys", 10_000, "distinct message keys")
	rates := flag.String("rates", "1000,5000", "steady enqueue rates for the latency part, per second")
	flag.IntVar(&s.seconds, "seconds", 5, "duration of each latency and enqueue measurement")
	flag.IntVar(&s.enqueueRounds, "enqueue-rounds", 10, "enqueue part: rounds of each variant")
	idle := flag.Int("idle", 0, "every pool's MaxIdleConns (0: max(workers, writers)+2; 2 is database/sql's default)")
	flag.IntVar(&s.rounds, "rounds", 3, "rounds of the drain and latency parts, interleaved (the drain prints medians, the latency percentiles over every round)")
	flag.BoolVar(&s.quick, "quick", false, "drain part: only the two ceilings and the publisher with -workers workers and WithDeleteOnPublish (for comparing changes back to back)")
	flag.IntVar(&s.writers, "writers", 8, "concurrent writers (latency and enqueue parts)")
	only := flag.String("only", "drain,latency,enqueue", "parts to run: drain, latency, enqueue, scaling, mariadb, inbox, exactly-once")
	scaling := flag.Bool("scaling", false, "run the backlog-scaling part (10k, 100k, 1M pending; 10M published)")
	depths := flag.String("depths", "10000,100000,1000000", "scaling part: pending backlogs drained; the first is the base of the ratios, the second is drained again behind -published rows")
	flag.IntVar(&s.published, "published", 10_000_000, "published rows retained in the last scaling step")
	flag.StringVar(&s.mariadbDSN, "mariadb-dsn", envOr("OUTBOX_BENCH_MARIADB_DSN", "root@tcp(127.0.0.1:3306)/test?parseTime=true"), "MariaDB DSN (the part works in a database of its own, created and dropped on this server)")
	flag.IntVar(&s.mariadbN, "mariadb-n", 50_000, "mariadb part: messages in the drained backlog")
	mariadbDepths := flag.String("mariadb-depths", "10000,1000000", "mariadb part: pending backlogs the publisher drains for the scaling figures; the first is the base of the ratios")
	flag.IntVar(&s.inboxN, "inbox-n", 50_000, "inbox part: messages in the topic, applied by every run")
	flag.IntVar(&s.inboxBatch, "inbox-batch", inbox.DefaultBatchSize, "inbox part: messages a transaction at most (inbox.WithBatchSize), the ceiling's too")
	flag.IntVar(&s.exactlyOnceRate, "exactly-once-rate", 1000, "exactly-once part: steady enqueue rate of its latency runs, per second")
	ddl := flag.Bool("ddl", false, "print the outbox table's PostgreSQL DDL and exit (for pgbench/run.sh)")
	markdown := flag.String("markdown", "", "also write the figures, with this run's command and conditions, to this markdown file (docs/performance.md)")
	flag.Parse()
	if *ddl {
		stmts, err := outbox.DDL("postgres", outbox.DefaultTableName)
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(strings.Join(stmts, ";\n") + ";")
		return
	}
	if *idle > 0 {
		idleConns = *idle
	} else {
		idleConns = max(s.workers, s.writers) + 2 // + the publisher's LISTEN, + one spare
	}
	if s.rounds < 1 {
		log.Fatalf("-rounds must be at least 1, got %d", s.rounds)
	}
	if s.inboxN < 1 || s.inboxBatch < 1 {
		log.Fatalf("-inbox-n and -inbox-batch must be positive, got %d and %d", s.inboxN, s.inboxBatch)
	}
	if s.exactlyOnceRate < 1 {
		log.Fatalf("-exactly-once-rate must be positive, got %d", s.exactlyOnceRate)
	}
	if s.enqueueRounds < 1 {
		log.Fatalf("-enqueue-rounds must be at least 1, got %d", s.enqueueRounds)
	}
	if s.seconds < 2 {
		log.Fatalf("-seconds must be at least 2 (each latency run leaves its first second out), got %d", s.seconds)
	}
	s.rates = positives("rate", *rates)
	s.depths = positives("depth", *depths)
	s.mariadbDepths = positives("mariadb-depth", *mariadbDepths)
	parts := map[string]bool{}
	for _, p := range strings.Split(*only, ",") {
		parts[strings.TrimSpace(p)] = true
	}
	if *scaling {
		parts = map[string]bool{"scaling": true}
	}
	if f := os.Getenv("OUTBOX_BENCH_CPUPROFILE"); f != "" {
		out, err := os.Create(f)
		if err != nil {
			log.Fatal(err)
		}
		if err := pprof.StartCPUProfile(out); err != nil {
			log.Fatal(err)
		}
		defer pprof.StopCPUProfile()
	}
	if err := run(s, parts, *markdown); err != nil {
		log.Fatal(err)
	}
}

// positives parses a flag's comma-separated list of positive numbers.
func positives(what, list string) []int {
	var out []int
	for _, f := range strings.Split(list, ",") {
		var v int
		if _, err := fmt.Sscan(f, &v); err != nil || v <= 0 {
			log.Fatalf("bad %s %q: a positive number is needed", what, f)
		}
		out = append(out, v)
	}
	return out
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func run(s settings, parts map[string]bool, markdown string) error {
	ctx := context.Background()
	admin, err := gorm.Open(postgres.Open(s.dsn), &gorm.Config{Logger: logger.Discard})
	if err != nil {
		return err
	}
	cond := printConditions(admin, s)
	// The hypervisor's share over the whole run, last: a run to set beside
	// another should have taken about as much.
	start := cpuNow()
	if err := runParts(ctx, admin, s, parts); err != nil {
		return err
	}
	stolen := cpuNow().since(start).stolenCores()
	fmt.Printf("\ncores stolen by the hypervisor over the whole run: %.2f of %d\n", stolen, runtime.NumCPU())
	if markdown == "" {
		return nil
	}
	if err := writeMarkdown(markdown, cond, commandLine(os.Args[1:]), setFlags(), stolen); err != nil {
		return fmt.Errorf("writing %s: %w", markdown, err)
	}
	fmt.Printf("figures written to %s\n", markdown)
	return nil
}

// runParts runs the parts asked for, in their order.
func runParts(ctx context.Context, admin *gorm.DB, s settings, parts map[string]bool) error {
	if parts["drain"] {
		if err := withSchema(admin, s.dsn, func(db *gorm.DB, dsn string) error { return drainPart(ctx, db, dsn, s) }); err != nil {
			return fmt.Errorf("drain: %w", err)
		}
	}
	if parts["latency"] {
		if err := latencyPart(ctx, admin, s); err != nil {
			return fmt.Errorf("latency: %w", err)
		}
	}
	if parts["enqueue"] {
		if err := withSchema(admin, s.dsn, func(db *gorm.DB, dsn string) error { return enqueuePart(ctx, db, dsn, s) }); err != nil {
			return fmt.Errorf("enqueue: %w", err)
		}
	}
	if parts["scaling"] {
		if err := scalingPart(ctx, admin, s); err != nil {
			return fmt.Errorf("scaling: %w", err)
		}
	}
	if parts["mariadb"] {
		if err := mariadbPart(ctx, s); err != nil {
			return fmt.Errorf("mariadb: %w", err)
		}
	}
	if parts["inbox"] {
		if err := inboxPart(ctx, admin, s); err != nil {
			return fmt.Errorf("inbox: %w", err)
		}
	}
	if parts["exactly-once"] {
		if err := exactlyOncePart(ctx, admin, s); err != nil {
			return fmt.Errorf("exactly-once: %w", err)
		}
	}
	return nil
}

// printConditions prints what the figures depend on besides the code, and
// returns it for -markdown.
func printConditions(admin *gorm.DB, s settings) conditions {
	var pgVersion, autovacuum string
	admin.Raw("SHOW server_version").Scan(&pgVersion)
	admin.Raw("SHOW autovacuum").Scan(&autovacuum)
	deps := map[string]string{}
	version := "(devel)"
	if bi, ok := debug.ReadBuildInfo(); ok {
		if bi.Main.Version != "" {
			version = bi.Main.Version
		}
		for _, d := range bi.Deps {
			deps[d.Path] = d.Version
		}
	}
	revision := ""
	for _, s := range bi().Settings {
		if s.Key == "vcs.revision" {
			revision = s.Value[:min(12, len(s.Value))]
		}
	}
	if revision == "" { // go run stamps no revision: ask git, from the work tree it ran in
		if out, err := exec.Command("git", "describe", "--always", "--dirty").Output(); err == nil {
			revision = strings.TrimSpace(string(out))
		}
	}
	if revision != "" {
		version += " " + revision
	}
	checkpoint := "yes"
	if err := admin.Exec("CHECKPOINT").Error; err != nil {
		checkpoint = "no (" + err.Error() + ")"
	}
	checkpoints = checkpoint == "yes"
	host, _ := os.Hostname()
	c := conditions{cpus: runtime.NumCPU(), goos: runtime.GOOS, goarch: runtime.GOARCH, goVersion: runtime.Version(),
		postgres: pgVersion, autovacuum: autovacuum, outbox: version,
		gorm: deps["gorm.io/gorm"], pgx: deps["github.com/jackc/pgx/v5"], sarama: deps["github.com/IBM/sarama"],
		settings: fmt.Sprintf("backlog %d, batch %d, workers %d, payload %d B, keys %d, writers %d, rounds %d, %d s a latency run, "+
			"%d enqueue rounds, scaling depths %v behind %d published, pool MaxIdleConns %d, CHECKPOINT before each measurement: %s",
			s.n, s.batch, s.workers, s.payloadBytes, s.keys, s.writers, s.rounds, s.seconds, s.enqueueRounds, s.depths, s.published, idleConns, checkpoint),
		date: time.Now()}
	fmt.Printf("conditions: host=%s cpus=%d %s/%s %s postgresql=%s outbox=%s\n",
		host, c.cpus, c.goos, c.goarch, c.goVersion, pgVersion, version)
	fmt.Printf("            gorm=%s pgx=%s sarama=%s kafka=kfake %s (in this process, over TCP; topics of %d partitions, segment.bytes=%s, retention.bytes=%s)\n",
		c.gorm, c.pgx, c.sarama, deps["github.com/twmb/franz-go/pkg/kfake"],
		benchPartitions, benchSegmentBytes, benchRetentionBytes)
	fmt.Printf("            batch=%d workers=%d payload=%dB keys=%d writers=%d pool: MaxIdleConns=%d (database/sql's default: 2)\n",
		s.batch, s.workers, s.payloadBytes, s.keys, s.writers, idleConns)
	fmt.Printf("            a CHECKPOINT and a Go GC before each measurement: %s; autovacuum=%s\n", checkpoint, autovacuum)
	c.machineSpeed = machineSpeed(admin)
	fmt.Printf("            machine speed: %s\n", c.machineSpeed)
	return c
}

func bi() *debug.BuildInfo {
	if b, ok := debug.ReadBuildInfo(); ok {
		return b
	}
	return &debug.BuildInfo{}
}

// withSchema runs fn on a *gorm.DB whose search_path is a new schema,
// dropped afterwards; dsn reaches the same schema.
func withSchema(admin *gorm.DB, baseDSN string, fn func(db *gorm.DB, dsn string) error) error {
	schema := "bench_" + strings.ReplaceAll(uuid.NewString(), "-", "")[:12]
	if err := admin.Exec("CREATE SCHEMA " + schema).Error; err != nil {
		return err
	}
	defer admin.Exec("DROP SCHEMA " + schema + " CASCADE")
	dsn := baseDSN + " search_path=" + schema
	db, closeDB, err := open(dsn)
	if err != nil {
		return err
	}
	defer closeDB()
	return fn(db, dsn)
}

// settle brings the machine to the same state before each measurement: a
// CHECKPOINT, so that none pays for a checkpoint that the WAL of the runs
// before it forced (PostgreSQL starts one every max_wal_size/2 or so of
// WAL, which the drain part writes in seconds), and a collected Go heap
// (the previous run's broker keeps its log in memory).
func settle(db *gorm.DB) {
	if checkpoints {
		db.Exec("CHECKPOINT")
	}
	runtime.GC()
}

// checkpoints says whether settle's CHECKPOINT is allowed (a superuser or
// pg_checkpoint): printConditions tries one and prints the answer.
var checkpoints bool

// idleConns is every pool's MaxIdleConns: enough for the busiest part's
// goroutines, so that no measurement pays for connections database/sql
// closes and opens again (its default keeps 2 idle).
var idleConns = 2

// open opens a *gorm.DB of its own on dsn: to the outbox, another process.
func open(dsn string) (*gorm.DB, func(), error) {
	return openWith(postgres.Open(dsn))
}

// openWith is open with a dialector of the caller's (another driver).
func openWith(dialector gorm.Dialector) (*gorm.DB, func(), error) {
	db, err := gorm.Open(dialector, &gorm.Config{Logger: logger.Discard})
	if err != nil {
		return nil, nil, err
	}
	if sqlDB, err := db.DB(); err == nil {
		sqlDB.SetMaxIdleConns(idleConns)
	}
	return db, func() {
		if sqlDB, err := db.DB(); err == nil {
			sqlDB.Close()
		}
	}, nil
}
