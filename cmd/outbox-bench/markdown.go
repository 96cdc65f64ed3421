package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// fullCommand regenerates docs/performance.md with every part at its
// default sizes: the command the file names for it, whatever run wrote it.
const fullCommand = "go run ./cmd/outbox-bench -only " + allParts + " -markdown docs/performance.md"

// allParts are every part of the benchmark, as -only names them.
const allParts = "drain,latency,enqueue,scaling,mariadb,inbox,exactly-once"

// figure is one result of the run, as -markdown writes it: the part that
// measured it, its name, its value and what it is, in one line.
type figure struct{ part, name, value, what string }

// figures are the run's results in the order they were printed; each part
// adds its own as it prints them.
var figures []figure

func record(part, name, what, format string, args ...any) {
	figures = append(figures, figure{part, name, fmt.Sprintf(format, args...), what})
}

// conditions are what a figure depends on besides the code: printed first,
// and written with the figures.
type conditions struct {
	cpus                      int
	goos, goarch, goVersion   string
	postgres, autovacuum      string
	outbox, gorm, pgx, sarama string
	machineSpeed              string
	settings                  string
	date                      time.Time
}

// commandLine is the command that ran this benchmark, as it would be typed
// from the repository's root; the DSNs are left out, as they may hold a
// password.
func commandLine(args []string) string {
	out := []string{"go", "run", "./cmd/outbox-bench"}
	for i := 0; i < len(args); i++ {
		a := args[i]
		name := strings.TrimLeft(a, "-")
		switch {
		case name == "dsn" || name == "mariadb-dsn":
			i++ // and its value
			continue
		case strings.HasPrefix(name, "dsn=") || strings.HasPrefix(name, "mariadb-dsn="):
			continue
		}
		out = append(out, a)
		if (name == "markdown") && i+1 < len(args) {
			i++
			out = append(out, relative(args[i]))
		}
	}
	return strings.Join(out, " ")
}

// relative is path from the working directory, where it is below it: the
// command as typed in the repository, not where this machine keeps it.
func relative(path string) string {
	wd, err := os.Getwd()
	if err != nil || !filepath.IsAbs(path) {
		return path
	}
	if rel, err := filepath.Rel(wd, path); err == nil && !strings.HasPrefix(rel, "..") {
		return rel
	}
	return path
}

// setFlags lists the flags given on the command line other than the DSNs
// and -markdown, with their values: a run with any of them is not the full
// benchmark, and its file says so.
func setFlags() []string {
	var out []string
	flag.Visit(func(f *flag.Flag) {
		switch {
		case f.Name == "dsn" || f.Name == "mariadb-dsn" || f.Name == "markdown":
		case f.Name == "only" && f.Value.String() == allParts: // what the full command sets
		default:
			out = append(out, fmt.Sprintf("-%s %s", f.Name, f.Value))
		}
	})
	return out
}

// writeMarkdown writes the run's figures to path as docs/performance.md
// has them: how to regenerate the file, the command and the conditions of
// this run, then one table row per figure.
func writeMarkdown(path string, c conditions, command string, changed []string, stolen float64) error {
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	p("# Performance\n\n")
	p("This file is written by the benchmark, `cmd/outbox-bench`; do not edit it by hand. Regenerate it with:\n\n")
	p("```sh\n%s\n```\n\n", fullCommand)
	p("It needs a PostgreSQL server (`-dsn`, or `OUTBOX_BENCH_DSN`; by default the tests' server at\n")
	p("`127.0.0.1:5432`) and, for its MariaDB and inbox parts, a MariaDB server (`-mariadb-dsn`, or\n")
	p("`OUTBOX_BENCH_MARIADB_DSN`; by default `127.0.0.1:3306`), and takes about a quarter of an hour on two cores.\n")
	p("The broker is kfake, in the benchmark's process, over TCP. The figures describe this library's\n")
	p("overhead and behaviour beside references measured in the same run on the same machine, not a\n")
	p("production Kafka cluster: compare ratios within a run, not rates across machines.\n\n")
	p("## This run\n\n")
	p("```sh\n%s\n```\n\n", command)
	if len(changed) > 0 {
		p("**Not the full benchmark:** this run set %s. Its figures show what the file holds, "+
			"not the library's performance; run the command above for those.\n\n", strings.Join(changed, ", "))
	}
	p("| condition | value |\n|---|---|\n")
	p("| date | %s |\n", c.date.UTC().Format("2006-01-02 15:04 MST"))
	p("| cores | %d (%s/%s); cores taken by the hypervisor over the run: %.2f |\n", c.cpus, c.goos, c.goarch, stolen)
	p("| machine speed | %s |\n", c.machineSpeed)
	p("| Go | %s |\n", c.goVersion)
	p("| PostgreSQL | %s (autovacuum %s) |\n", c.postgres, c.autovacuum)
	p("| outbox | %s |\n", c.outbox)
	p("| libraries | gorm %s, pgx %s, sarama %s |\n", c.gorm, c.pgx, c.sarama)
	p("| settings | %s |\n\n", c.settings)
	p("## Figures\n\n")
	p("| part | figure | value | what it is |\n|---|---|---|---|\n")
	for _, f := range figures {
		p("| %s | %s | %s | %s |\n", f.part, cell(f.name), cell(f.value), cell(f.what))
	}
	p("\n## How it measures\n\n")
	p("Every measurement starts after a `CHECKPOINT` and a Go GC, and every drain from a new table. Before\n")
	p("the rounds, not counted, the broker's log is filled to its retention, the database ceiling drains once\n")
	p("and each publisher pool drains 10,000 messages, so that no round pays for a cold start. The drain and\n")
	p("latency parts run each measurement once a round, the rounds interleaved (`-rounds`); the enqueue part\n")
	p("runs short rounds of each variant, every other round in reverse order (`-enqueue-rounds`). A drain\n")
	p("ends when every message is acknowledged and the stopped publisher has recorded every result. The\n")
	p("MariaDB part works in a database of its own; every measurement drains once before the rounds, not\n")
	p("counted, and every drain starts from a new table. The inbox part fills a topic of its own once; every\n")
	p("run reads all of it from its start with a new consumer group into emptied tables, timed from the\n")
	p("consumer's start (the group's join included) until the domain table holds every message's row, and\n")
	p("each consumer runs once before the rounds, not counted. The exactly-once part drains the drain part's\n")
	p("backlog with the at-least-once publisher and with the exactly-once one in every round, in alternating\n")
	p("order, each after a drain of 10,000 not counted; its latency runs time each event from its commit to its\n")
	p("arrival at a franz-go consumer reading with `isolation.level=read_committed`, in both modes, as the\n")
	p("latency part's lines time it to the producer's acknowledgement.\n\n")
	p("## Other measurements\n\n")
	p("| command | what it measures |\n|---|---|\n")
	p("| `go run ./cmd/outbox-bench -only drain -quick` | the two ceilings and one publisher line: to compare two versions of the code back to back |\n")
	p("| `go run ./cmd/outbox-bench -only mariadb` | the MariaDB part alone |\n")
	p("| `go run ./cmd/outbox-bench -only inbox -inbox-n 10000` | the inbox beside its ceiling, quickly |\n")
	p("| `go run ./cmd/outbox-bench -only exactly-once` | the exactly-once publisher beside the at-least-once one alone |\n")
	p("| `go test -run x -bench CommitToAck -benchtime 100x .` | commit to Kafka acknowledgement, one message at a time, on each database, with and without a wake-up |\n")
	p("| `go test -run x -bench HeldClaim -benchtime 200x -benchmem ./internal/postgres` | one held claim of 500 messages and its delete on PostgreSQL, with its allocations |\n")
	p("| `go test -run x -bench TelemetryWithoutProvider .` | what the metrics cost without a meter provider |\n")
	p("| `cmd/outbox-bench/pgbench/run.sh 5` | the enqueue part's transactions as plain SQL through pgbench, without Go |\n")
	return os.WriteFile(path, []byte(b.String()), 0o644)
}

// cell keeps a value inside its table cell.
func cell(s string) string {
	return strings.ReplaceAll(strings.TrimSuffix(strings.TrimSpace(s), ":"), "|", `\|`)
}
