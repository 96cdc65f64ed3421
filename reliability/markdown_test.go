package reliability

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"sort"
	"strings"
	"sync"
	"time"
)

var markdown = flag.String("reliability.markdown", "",
	"after a run in which every scenario passed, write its scenario lines, with the command and the conditions, to this markdown file (docs/reliability.md)")

// reported are the scenario lines of this run, for the markdown file.
var reported struct {
	sync.Mutex
	lines []string
}

func remember(line string) {
	reported.Lock()
	defer reported.Unlock()
	reported.lines = append(reported.lines, line)
}

// writeMarkdown writes the run's figures to path: the current ones only,
// with the command that produced them and the machine's conditions.
func writeMarkdown(path string, started time.Time) error {
	reported.Lock()
	lines := append([]string(nil), reported.lines...)
	reported.Unlock()
	sort.SliceStable(lines, func(i, j int) bool { return scenarioOf(lines[i]) < scenarioOf(lines[j]) })

	mode, per := "short", "a few seconds of load per scenario"
	if *long {
		mode, per = "long", "a minute of load per scenario"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "# Reliability figures\n\n")
	fmt.Fprintf(&b, "This file is written by the reliability suite; do not edit it by hand. It holds the last %s run\n", mode)
	fmt.Fprintf(&b, "(%s) in which every scenario passed. Regenerate it from the repository's root with:\n\n", per)
	cmd := "go test -count=1 -timeout 100m ./reliability -reliability.long -reliability.markdown \"$PWD/docs/reliability.md\""
	if !*long {
		cmd = "go test -count=1 ./reliability -reliability.markdown \"$PWD/docs/reliability.md\""
	}
	fmt.Fprintf(&b, "```sh\n%s\n```\n\n", cmd)
	fmt.Fprintf(&b, "What each scenario does, and what the suite fails on, is in [operating.md](operating.md#reliability-suite).\n\n")
	fmt.Fprintf(&b, "| condition | value |\n|---|---|\n")
	fmt.Fprintf(&b, "| date | %s UTC |\n", started.UTC().Format("2006-01-02 15:04"))
	fmt.Fprintf(&b, "| duration | %s |\n", time.Since(started).Round(time.Second))
	fmt.Fprintf(&b, "| cores | %d (%s/%s) |\n", runtime.NumCPU(), runtime.GOOS, runtime.GOARCH)
	fmt.Fprintf(&b, "| Go | %s |\n", runtime.Version())
	if out, err := exec.Command("git", "rev-parse", "--short", "HEAD").Output(); err == nil {
		rev := strings.TrimSpace(string(out))
		if dirty, err := exec.Command("git", "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(dirty) > 0 {
			rev += ", with uncommitted changes"
		}
		fmt.Fprintf(&b, "| outbox | %s |\n", rev)
	}
	names := map[string]bool{}
	for _, l := range lines {
		names[scenarioOf(l)] = true
	}
	fmt.Fprintf(&b, "| scenarios | %d |\n", len(names))
	fmt.Fprintf(&b, "| broker | kfake, over TCP, behind a fault-injecting proxy |\n\n")

	rows := map[string]map[string]string{}
	var outboxOrder, inboxOrder []string
	for _, l := range lines {
		name := scenarioOf(l)
		if rows[name] == nil {
			rows[name] = map[string]string{}
		}
		fields := rows[name]
		for _, f := range strings.Fields(l) {
			if k, v, ok := strings.Cut(f, "="); ok && k != "scenario" {
				if k == "applied" {
					inboxOrder = append(inboxOrder, name)
				}
				if k == "committed" {
					outboxOrder = append(outboxOrder, name)
				}
				fields[k] = v
			}
		}
	}
	if len(outboxOrder) > 0 {
		table(&b, rows, outboxOrder, []string{"committed", "delivered", "lost", "duplicates", "order_violations", "dead", "partial_groups", "takeovers", "resumed_after_broker_returned"})
		fmt.Fprintf(&b, "\nduplicates: messages delivered more than once, each with the same `outbox-message-id`; the bound is one batch per worker per fault,\n")
		fmt.Fprintf(&b, "and none in the `exactly-once-*` scenarios, whose topic is read with isolation.level=read_committed. partial_groups\n")
		fmt.Fprintf(&b, "(exactly-once only, where each writer's transaction enqueues 2 to 5 events over 2 to 4 aggregates): committed database\n")
		fmt.Fprintf(&b, "transactions whose events were not all delivered, or not all in one Kafka transaction (one `outbox-transaction` header);\n")
		fmt.Fprintf(&b, "the bound is none. takeovers (exactly-once only): slots taken over from a holder whose lease ran out, its producer fenced.\n")
	}
	if len(inboxOrder) > 0 {
		if len(outboxOrder) > 0 {
			b.WriteString("\n")
		}
		fmt.Fprintf(&b, "The inbox scenario chains a second service to the kill-loop scenario: three inbox consumer processes in one\n")
		fmt.Fprintf(&b, "consumer group, one SIGKILLed and restarted at random intervals, apply the events to a ledger in a database\n")
		fmt.Fprintf(&b, "of their own.\n\n")
		table(&b, rows, inboxOrder, []string{"applied", "lost", "applied_twice", "order_violations"})
		fmt.Fprintf(&b, "\napplied: committed events applied by the consumers; lost: committed events never applied; applied_twice:\n")
		fmt.Fprintf(&b, "applications beyond the first of an event; order_violations: events applied after a later one of their key.\n")
	}
	return os.WriteFile(path, []byte(b.String()), 0o644)
}

// table writes the scenarios named in order, one row each, with the
// values of cols.
func table(b *strings.Builder, rows map[string]map[string]string, order, cols []string) {
	fmt.Fprintf(b, "| scenario | %s |\n|---|%s\n", strings.Join(cols, " | "), strings.Repeat("---|", len(cols)))
	for _, name := range order {
		vals := make([]string, len(cols))
		for i, c := range cols {
			vals[i] = rows[name][c]
		}
		fmt.Fprintf(b, "| %s | %s |\n", name, strings.Join(vals, " | "))
	}
}

func scenarioOf(line string) string {
	for _, f := range strings.Fields(line) {
		if v, ok := strings.CutPrefix(f, "scenario="); ok {
			return v
		}
	}
	return ""
}
