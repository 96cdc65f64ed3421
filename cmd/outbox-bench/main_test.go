package main_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gorm-outbox/outbox/outboxtest"
)

// The benchmark is run as docs/performance.md says, with small sizes:
// every part must run to its end and print its lines, and -markdown must
// write them. Its figures are not checked (timings are not pass/fail); a
// part that fails or stops printing is.
func TestBenchmarkRunsEveryPart(t *testing.T) {
	outboxtest.Postgres(t, nil) // fails on CI, skips elsewhere, without a server
	binary := filepath.Join(t.TempDir(), "outbox-bench")
	if out, err := exec.Command("go", "build", "-o", binary, ".").CombinedOutput(); err != nil {
		t.Fatalf("building the benchmark: %v\n%s", err, out)
	}
	run := func(args ...string) string {
		t.Helper()
		cmd := exec.Command(binary, append([]string{"-dsn", outboxtest.PostgresDSN()}, args...)...)
		cmd.Env = append(os.Environ(), "OUTBOX_BENCH_CPUPROFILE=")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("outbox-bench %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	expect := func(out string, lines ...string) {
		t.Helper()
		for _, l := range lines {
			if !strings.Contains(out, l) {
				t.Errorf("output lacks %q:\n%s", l, out)
			}
		}
	}

	expect(run("-ddl"), `CREATE TABLE IF NOT EXISTS "outbox_messages"`, "WITH (fillfactor = 50)", `"idx_outbox_messages_pending"`)

	markdown := filepath.Join(t.TempDir(), "performance.md")
	expect(run("-n", "3000", "-quick", "-rounds", "1", "-seconds", "2", "-rates", "200,1500", "-enqueue-rounds", "1", "-markdown", markdown),
		"conditions:", "machine speed:",
		"ceiling, database alone", "ceiling, broker alone", "publisher, 4 worker(s), WithDeleteOnPublish", "ratio to the lower ceiling:",
		"200/s (achieved", "wake-up", "poll only", "2 a transaction",
		"pgxpipeline: domain row + one event", "overhead of one event:", "one transaction of 500 events:",
		"cores stolen by the hypervisor over the whole run:", "figures written to "+markdown)
	// -markdown writes what docs/performance.md holds: how to regenerate
	// it, this run's command without its DSN, the conditions, a row per
	// figure, and a warning that a run with small sizes is not the benchmark.
	expect(readFile(t, markdown),
		"# Performance\n", "Regenerate it with:", "go run ./cmd/outbox-bench -only drain,latency,enqueue,scaling,mariadb,inbox,exactly-once -markdown docs/performance.md",
		"go run ./cmd/outbox-bench -n 3000 -quick -rounds 1 -seconds 2 -rates 200,1500 -enqueue-rounds 1 -markdown "+markdown+"\n",
		"**Not the full benchmark:** this run set -enqueue-rounds 1, -n 3000, -quick true, -rates 200,1500, -rounds 1, -seconds 2.",
		"| date | ", "| cores | ", "| Go | go1.", "| PostgreSQL | ", "| machine speed | sha256 ", "| settings | backlog 3000, batch 500",
		"| part | figure | value | what it is |\n|---|---|---|---|\n",
		"| drain, 3k pending | ceiling, database alone (DELETE ... SKIP LOCKED ... RETURNING) | ",
		"| drain, 3k pending | publisher, 4 worker(s), WithDeleteOnPublish: claim, send, delete, ratio to the lower ceiling | ",
		"| latency | 200/s, wake-up | p50 ", "| latency | 1500/s, poll only | p50 ",
		"| enqueue | pgxpipeline: domain row + one event | ", "% time per transaction",
		"| enqueue | one transaction of 500 events | ")
	if out := readFile(t, markdown); strings.Contains(out, outboxtest.PostgresDSN()) || strings.Contains(out, "-dsn host") {
		t.Errorf("the markdown names the DSN:\n%s", out)
	}

	_, mariadbDSN := outboxtest.MariaDBDatabase(t, nil)
	expect(run("-only", "mariadb", "-mariadb-dsn", mariadbDSN, "-mariadb-n", "2000", "-rounds", "1", "-mariadb-depths", "1000,2000", "-markdown", markdown),
		"5. MariaDB ", "innodb_buffer_pool_size", "MariaDB alone, delete, 4 workers:", "simplest relay, keep, 4 workers:",
		"publisher, delete, 2 workers:", "publisher, keep, 4 workers:", "× the simplest relay (target: at least 0.7×)", "× MariaDB alone (target: at least 0.6×)",
		"1000 pending (the base, medians of 5): publisher ", "; simplest relay ", "2000 pending: publisher ", "% of its 1k rate, ", "µs CPU/msg, ", "% of its 1k's (", "in this process), history list ", "; MariaDB alone ",
		"history list ", " at its end", "the publisher at ", "× MariaDB alone's rate at this depth",
		"(target for the publisher: at least 80% of its rate)")
	expect(readFile(t, markdown),
		"| MariaDB drain, 2k pending | server | ", "| MariaDB drain, 2k pending | publisher, delete, 4 workers, ratios | ",
		"| MariaDB scaling | 1k pending (the base) | ", "| MariaDB scaling | 2k pending | ")
	if out := readFile(t, markdown); strings.Contains(out, mariadbDSN) {
		t.Errorf("the markdown names the MariaDB DSN:\n%s", out)
	}

	expect(run("-only", "inbox", "-mariadb-dsn", mariadbDSN, "-inbox-n", "2000", "-rounds", "1", "-markdown", markdown),
		"6. inbox: 2000 messages of 200 B in 6 partitions, batch 100", "   PostgreSQL ", "   MariaDB ",
		"ceiling, bare consumer group, one multi-row INSERT a batch:", "inbox, NewBatchConsumer, one multi-row INSERT a batch:",
		"inbox, NewConsumer, one INSERT a message:", "× the ceiling (target: at least 0.7×); each round to its own ceiling: ",
		"× the ceiling (for information: the same rows, one statement each)")
	expect(readFile(t, markdown),
		"| inbox, PostgreSQL, 2k messages | setup | PostgreSQL ", "| inbox, MariaDB, 2k messages | setup | MariaDB ",
		"| inbox, PostgreSQL, 2k messages | ceiling, bare consumer group, one multi-row INSERT a batch | ",
		"| inbox, PostgreSQL, 2k messages | inbox, NewBatchConsumer, one multi-row INSERT a batch, ratio to the ceiling | ",
		"| inbox, MariaDB, 2k messages | inbox, NewConsumer, one INSERT a message, ratio to the ceiling | ")

	expect(run("-only", "exactly-once", "-n", "2000", "-rounds", "1", "-seconds", "2", "-exactly-once-rate", "200", "-markdown", markdown),
		"7. exactly-once: at-least-once (kafka.NewSender) beside exactly-once (kafka.NewTransactionalSender, 4 slots)",
		"drain of 2000 pending messages", "   at-least-once: ", "   exactly-once: ", " msg/s  (",
		"exactly-once / at-least-once: ", "(target: at least 0.6×); each round's pair: ",
		"latency at 200/s: commit to a consumer reading with isolation.level=read_committed", "p50 ", "(achieved ",
		"exactly-once p99 / at-least-once p99: ", "(target: at most 2×)")
	expect(readFile(t, markdown),
		"| exactly-once, drain of 2k pending | at-least-once | ", "| exactly-once, drain of 2k pending | exactly-once | ",
		"| exactly-once, drain of 2k pending | exactly-once / at-least-once | ",
		"| exactly-once, latency at 200/s | at-least-once | p50 ", "| exactly-once, latency at 200/s | exactly-once | p50 ",
		"| exactly-once, latency at 200/s | exactly-once p99 / at-least-once p99 | ")

	expect(run("-scaling", "-depths", "2000,4000", "-published", "3000", "-markdown", markdown),
		"the 2k drain 5 times", "2k rate, median of 5:",
		"4000 pending,        0 published kept:", "% of the 2k rate",
		"4000 pending,     3000 published kept:", "(wrote 3000 published rows",
		"database alone (DELETE ... SKIP LOCKED ... RETURNING), same depth:", "% of its 2k rate")
	expect(readFile(t, markdown),
		"| scaling | 2k pending (the base) | ", "| scaling | 4k pending, 0 published kept | ", "| scaling | 4k pending, 3k published kept | ",
		"% of the 2k rate; database alone ")
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
