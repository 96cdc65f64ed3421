package main_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gorm-outbox/outbox/outboxtest"
)

// The benchmark is run as the README says, with small sizes: every part
// must run to its end and print its lines. Its figures are not checked
// (timings are not pass/fail); a part that fails or stops printing is.
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

	expect(run("-n", "3000", "-quick", "-rounds", "1", "-seconds", "2", "-rates", "200,1500", "-enqueue-rounds", "1"),
		"conditions:", "machine speed:",
		"ceiling, database alone", "ceiling, broker alone", "publisher, 4 worker(s), WithDeleteOnPublish", "ratio to the lower ceiling:",
		"200/s (achieved", "wake-up", "poll only", "2 a transaction",
		"PipelinedPgx: domain row + one event", "overhead of one event:", "one transaction of 500 events:",
		"cores stolen by the hypervisor over the whole run:")

	expect(run("-scaling", "-depths", "2000,4000", "-published", "3000"),
		"the 2k drain 5 times", "2k rate, median of 5:",
		"4000 pending,        0 published kept:", "% of the 2k rate",
		"4000 pending,     3000 published kept:", "(wrote 3000 published rows",
		"database alone (DELETE ... SKIP LOCKED ... RETURNING), same depth:", "% of its 2k rate")
}
