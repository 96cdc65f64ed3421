package main_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/kafka"
	"github.com/gorm-outbox/outbox/outboxtest"
)

var binary string

// The command is tested as users run it: a built binary, its output and exit code.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "outbox-cmd")
	if err != nil {
		panic(err)
	}
	binary = filepath.Join(dir, "outbox")
	if out, err := exec.Command("go", "build", "-o", binary, ".").CombinedOutput(); err != nil {
		panic(fmt.Sprintf("building the command: %v\n%s", err, out))
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

type result struct {
	stdout, stderr string
	code           int
}

func runCmd(t *testing.T, dsn, stdin string, args ...string) result {
	t.Helper()
	return runCmdEnv(t, []string{"OUTBOX_DSN=" + dsn}, stdin, args...)
}

// runCmdEnv runs the command with env added to the test's environment.
func runCmdEnv(t *testing.T, env []string, stdin string, args ...string) result {
	t.Helper()
	cmd := exec.Command(binary, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errOut strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	code := 0
	if ee := (*exec.ExitError)(nil); errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return result{out.String(), errOut.String(), code}
}

// backends give a populated outbox and the DSN that reaches it.
var backends = []struct {
	name string
	open func(t *testing.T) (*gorm.DB, string)
}{
	{"postgres", func(t *testing.T) (*gorm.DB, string) { return outboxtest.PostgresSchema(t, nil) }},
	{"mariadb", func(t *testing.T) (*gorm.DB, string) {
		db, dsn := outboxtest.MariaDBDatabase(t, nil)
		return db, strings.Replace(dsn, "?parseTime=true&loc=UTC", "", 1) // the command adds parseTime itself
	}},
	{"sqlite", func(t *testing.T) (*gorm.DB, string) {
		path := filepath.Join(t.TempDir(), "app.db")
		db, err := gorm.Open(sqliteDialector(path), &gorm.Config{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s, _ := db.DB(); s.Close() })
		return db, path
	}},
}

// populate writes 3 pending (topic a), 2 published (b), 2 dead (c) messages.
func populate(t *testing.T, db *gorm.DB) map[string][]outbox.OutboxMessage {
	t.Helper()
	if err := db.Use(outbox.Plugin()); err != nil {
		t.Fatal(err)
	}
	for i, topic := range []string{"a", "a", "a", "b", "b", "c", "c"} {
		err := db.Transaction(func(tx *gorm.DB) error {
			return outbox.Enqueue(tx, outbox.Message{Topic: topic, Key: fmt.Sprint("k", i), Payload: fmt.Sprintf(`{"n":%d}`, i),
				Headers: map[string]string{"type": topic + ".happened"}})
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	old := time.Now().Add(-48 * time.Hour).UTC()
	db.Table(outbox.DefaultTableName).Where("topic = 'b'").Updates(map[string]any{"state": outbox.StatePublished, "published_at": old, "created_at": old})
	db.Table(outbox.DefaultTableName).Where("topic = 'c'").Updates(map[string]any{"state": outbox.StateDead, "attempts": 10, "last_error": "broker said no"})
	store, _ := outbox.StoreOf(db)
	byTopic := map[string][]outbox.OutboxMessage{}
	msgs, _ := store.List(t.Context(), outbox.ListOptions{})
	for _, m := range msgs {
		byTopic[m.Topic] = append(byTopic[m.Topic], m)
	}
	return byTopic
}

func TestCommand(t *testing.T) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) {
			db, dsn := b.open(t)
			msgs := populate(t, db)

			r := runCmd(t, dsn, "", "status")
			if r.code != 0 || !strings.Contains(r.stdout, "pending            3") || !strings.Contains(r.stdout, "dead               2   2 over the attempt budget") {
				t.Fatalf("status: %+v", r)
			}
			r = runCmd(t, dsn, "", "status", "--json")
			var st map[string]any
			if err := json.Unmarshal([]byte(r.stdout), &st); err != nil || st["pending"] != 3.0 || st["published"] != 2.0 || st["dead"] != 2.0 {
				t.Fatalf("status --json: %v %+v", err, r)
			}

			r = runCmd(t, dsn, "", "list", "--state", "dead")
			if r.code != 0 || strings.Count(r.stdout, "\n") != 3 || !strings.Contains(r.stdout, "broker said no") || strings.Contains(r.stdout, `{"n"`) {
				t.Fatalf("list --state dead: %+v", r)
			}
			r = runCmd(t, dsn, "", "list", "--topic", "a", "--newest", "--limit", "2", "--payload")
			lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
			if r.code != 0 || len(lines) != 3 || !strings.Contains(lines[1], msgs["a"][2].ID.String()) || !strings.Contains(lines[1], `{"n":2}`) || !strings.Contains(r.stderr, "--page 2") {
				t.Fatalf("list --newest --limit 2: %+v", r)
			}
			r = runCmd(t, dsn, "", "list", "--topic", "a", "--limit", "2", "--page", "2")
			if r.code != 0 || strings.Count(r.stdout, "\n") != 2 || !strings.Contains(r.stdout, msgs["a"][2].ID.String()) {
				t.Fatalf("list page 2: %+v", r)
			}
			r = runCmd(t, dsn, "", "list", "--older-than", "0s")
			if r.code != 0 || strings.Count(r.stdout, "\n") != 8 { // created before now: all 7
				t.Fatalf("list --older-than 0s: %+v", r)
			}
			r = runCmd(t, dsn, "", "list", "--older-than", "24h")
			if r.code != 0 || strings.Count(r.stdout, "\n") != 3 { // the two old published ones
				t.Fatalf("list --older-than: %+v", r)
			}

			dead := msgs["c"][0]
			r = runCmd(t, dsn, "", "show", dead.ID.String())
			if r.code != 0 || !strings.Contains(r.stdout, `{"n":5}`) || !strings.Contains(r.stdout, "header type") || !strings.Contains(r.stdout, "c.happened") {
				t.Fatalf("show: %+v", r)
			}
			r = runCmd(t, dsn, "", "show", "01900000-0000-7000-8000-000000000000")
			if r.code != 1 || !strings.Contains(r.stderr, "no such message") {
				t.Fatalf("show of an unknown id: %+v", r)
			}

			// An id given twice is one message, and reported once.
			r = runCmd(t, dsn, "", "requeue", dead.ID.String(), dead.ID.String(), msgs["a"][0].ID.String(), msgs["a"][0].ID.String())
			if r.code != 1 || !strings.Contains(r.stdout, "requeued 1") || strings.Count(r.stderr, "is pending, not dead") != 1 {
				t.Fatalf("requeue: %+v", r)
			}
			r = runCmd(t, dsn, "", "requeue", "--dead", "--topic", "c")
			if r.code != 0 || !strings.Contains(r.stdout, "requeued 1 dead") {
				t.Fatalf("requeue --dead: %+v", r)
			}

			r = runCmd(t, dsn, "n\n", "purge", "--published", "--older-than", "24h")
			if r.code != 1 || !strings.Contains(r.stderr, "Delete 2 published messages") || !strings.Contains(r.stderr, "nothing deleted") {
				t.Fatalf("purge answered no: %+v", r)
			}
			r = runCmd(t, dsn, "y\n", "purge", "--published", "--older-than", "24h")
			if r.code != 0 || !strings.Contains(r.stdout, "deleted 2 published") || !strings.Contains(r.stderr, "deleted 2 of 2") {
				t.Fatalf("purge answered yes: %+v", r)
			}
			r = runCmd(t, dsn, "", "purge", "--published", "--older-than", "1ns", "--yes")
			if r.code != 0 || !strings.Contains(r.stdout, "nothing to purge") {
				t.Fatalf("purge of nothing: %+v", r) // pending and dead are never purged
			}
			// A message published just now: 0s is "everything published so far".
			now := time.Now().UTC()
			db.Table(outbox.DefaultTableName).Where("id = ?", msgs["a"][1].ID).Updates(map[string]any{"state": outbox.StatePublished, "published_at": now})
			r = runCmd(t, dsn, "", "purge", "--published", "--older-than", "1h", "--yes")
			if r.code != 0 || !strings.Contains(r.stdout, "nothing to purge") {
				t.Fatalf("purge of a message published just now, older than 1h: %+v", r)
			}
			r = runCmd(t, dsn, "n\n", "purge", "--published", "--older-than", "0s")
			if r.code != 1 || !strings.Contains(r.stderr, "Delete all 1 published messages") {
				t.Fatalf("purge --older-than 0s answered no: %+v", r)
			}
			r = runCmd(t, dsn, "", "purge", "--published", "--older-than", "0s", "--yes")
			if r.code != 0 || !strings.Contains(r.stdout, "deleted 1 published") {
				t.Fatalf("purge --older-than 0s: %+v", r)
			}
			var left int64
			db.Table(outbox.DefaultTableName).Count(&left)
			if left != 4 {
				t.Fatalf("%d messages left, want the 4 unpublished", left)
			}

			r = runCmd(t, dsn, "", "watch", "-n", "2", "--interval", "10ms")
			if r.code != 0 || strings.Count(r.stdout, "pending 4") != 2 || !strings.Contains(r.stdout, "0.0/s") {
				t.Fatalf("watch: %+v", r)
			}

			r = runCmd(t, dsn, "", "--table", "nope", "status")
			if r.code != 1 || !strings.Contains(r.stderr, `table "nope" does not exist`) {
				t.Fatalf("missing table: %+v", r)
			}
		})
	}
}

// TestCommandErrors: every mistake in a command line is exit code 2 with a
// message saying what is allowed, found before the database is opened.
func TestCommandErrors(t *testing.T) {
	cases := []struct {
		name, dsn string
		args      []string
		code      int
		want      string
	}{
		{"no dsn", "", []string{"status"}, 2, "no database"},
		{"unknown command", "x.db", []string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{"no such sqlite file", filepath.Join(t.TempDir(), "missing.db"), []string{"status"}, 1, "no SQLite database"},
		{"unreachable postgres", "postgres://postgres:s3cret-pw@127.0.0.1:1/test?connect_timeout=2", []string{"status"}, 1, "cannot connect to postgres://postgres:xxxxx@127.0.0.1:1"},
		{"unreachable mariadb", "root:s3cret-pw@tcp(127.0.0.1:1)/test", []string{"status"}, 1, "root:xxxxx@tcp(127.0.0.1:1)/test: dial tcp"},
		{"bad flag", "x.db", []string{"list", "--frob"}, 2, "flag provided but not defined"},
		{"bad state", "x.db", []string{"list", "--state", "lost"}, 2, `invalid value "lost" for flag -state: want pending, published or dead`},
		{"bad id", "x.db", []string{"show", "42"}, 2, `"42" is not a message id`},
		{"purge without what", "x.db", []string{"purge", "--older-than", "1h"}, 2, "--published"},

		// Global flags and the command.
		{"no command", "x.db", nil, 2, "give a command"},
		{"unknown global flag", "x.db", []string{"--frob", "status"}, 2, "flag provided but not defined: -frob"},
		{"empty dsn flag", "x.db", []string{"--dsn=", "status"}, 2, `invalid value "" for flag -dsn: give a DSN`},
		{"dsn flag without value", "x.db", []string{"--dsn"}, 2, "flag needs an argument: -dsn"},
		{"empty table", "x.db", []string{"--table", "", "status"}, 2, `invalid value "" for flag -table: give a table name`},
		{"table with a space", "x.db", []string{"--table", "a b", "status"}, 2, `table name "a b" is not a plain SQL identifier`},
		{"table with SQL", "x.db", []string{"--table", "t;drop table x", "status"}, 2, "not a plain SQL identifier"},
		{"table of three parts", "x.db", []string{"--table", "a.b.c", "status"}, 2, "not a plain SQL identifier"},
		{"dsn after the command", "x.db", []string{"status", "--dsn", "x"}, 2, "--dsn goes before the command"},
		{"table after the command", "x.db", []string{"list", "--table=t"}, 2, "--table goes before the command"},

		// status
		{"status argument", "x.db", []string{"status", "extra"}, 2, `unexpected argument "extra": status takes only flags`},
		{"status bool as a word", "x.db", []string{"status", "--json", "false"}, 2, `unexpected argument "false"`},
		{"status bool value", "x.db", []string{"status", "--json=maybe"}, 2, `invalid boolean value "maybe" for -json: give the flag alone, or =true or =false`},
		{"status zero budget", "x.db", []string{"status", "--max-attempts", "0"}, 2, "want a whole number of at least 1"},
		{"status negative budget", "x.db", []string{"status", "--max-attempts=-3"}, 2, "want a whole number of at least 1"},
		{"status budget not a number", "x.db", []string{"status", "--max-attempts", "ten"}, 2, `invalid value "ten" for flag -max-attempts`},

		// list
		{"list empty state", "x.db", []string{"list", "--state="}, 2, "want pending, published or dead"},
		{"list state in capitals", "x.db", []string{"list", "--state", "DEAD"}, 2, "want pending, published or dead"},
		{"list state without value", "x.db", []string{"list", "--state"}, 2, "flag needs an argument: -state"},
		{"list empty topic", "x.db", []string{"list", "--topic", ""}, 2, "give a topic name"},
		{"list empty key", "x.db", []string{"list", "--key="}, 2, "give a key"},
		{"list negative age", "x.db", []string{"list", "--older-than", "-1h"}, 2, "a duration must not be negative"},
		{"list age in days", "x.db", []string{"list", "--older-than", "3d"}, 2, "want a duration such as 720h"},
		{"list empty age", "x.db", []string{"list", "--older-than="}, 2, "want a duration such as 720h"},
		{"list overflowing age", "x.db", []string{"list", "--older-than", "2562048h"}, 2, "want a duration such as 720h"},
		{"list zero limit", "x.db", []string{"list", "--limit", "0"}, 2, "want a whole number of at least 1"},
		{"list negative limit", "x.db", []string{"list", "--limit", "-5"}, 2, "want a whole number of at least 1"},
		{"list fractional limit", "x.db", []string{"list", "--limit", "1.5"}, 2, "want a whole number of at least 1"},
		{"list huge limit", "x.db", []string{"list", "--limit", "99999999999999999999"}, 2, "up to 9223372036854775807"},
		{"list zero page", "x.db", []string{"list", "--page", "0"}, 2, "want a whole number of at least 1"},
		{"list negative page", "x.db", []string{"list", "--page=-2"}, 2, "want a whole number of at least 1"},
		{"list page past any table", "x.db", []string{"list", "--limit", "2", "--page", "9223372036854775807"}, 2, "past any table"},
		{"list argument", "x.db", []string{"list", "dead"}, 2, `unexpected argument "dead": list takes only flags`},
		{"list flag after an argument", "x.db", []string{"list", "dead", "--limit", "1"}, 2, `unexpected argument "dead"`},
		{"list bool value", "x.db", []string{"list", "--newest=2"}, 2, `invalid boolean value "2" for -newest`},

		// show
		{"show nothing", "x.db", []string{"show"}, 2, "give one message id, not 0 arguments"},
		{"show two", "x.db", []string{"show", "01900000-0000-7000-8000-000000000000", "01900000-0000-7000-8000-000000000001"}, 2, "give one message id, not 2 arguments"},
		{"show empty id", "x.db", []string{"show", ""}, 2, `"" is not a message id`},
		{"show short id", "x.db", []string{"show", "01900000-0000-7000-8000-00000000000"}, 2, "is not a message id"},
		{"show flag", "x.db", []string{"show", "--json"}, 2, "flag provided but not defined: -json"},

		// requeue
		{"requeue nothing", "x.db", []string{"requeue"}, 2, "give message ids, or --dead"},
		{"requeue ids and dead", "x.db", []string{"requeue", "--dead", "01900000-0000-7000-8000-000000000000"}, 2, "give ids or --dead, not both"},
		{"requeue topic without dead", "x.db", []string{"requeue", "--topic", "c", "01900000-0000-7000-8000-000000000000"}, 2, "--topic goes with --dead"},
		{"requeue empty topic", "x.db", []string{"requeue", "--dead", "--topic="}, 2, "give a topic name"},
		{"requeue bad id", "x.db", []string{"requeue", "01900000-0000-7000-8000-000000000000", "nope"}, 2, `"nope" is not a message id`},
		{"requeue bool value", "x.db", []string{"requeue", "--dead=yes"}, 2, `invalid boolean value "yes" for -dead`},

		// purge
		{"purge without age", "x.db", []string{"purge", "--published"}, 2, "give --older-than, e.g. --older-than 720h (0s: everything published so far)"},
		{"purge not published", "x.db", []string{"purge", "--published=false", "--older-than", "1h"}, 2, "say what to purge: --published"},
		{"purge negative age", "x.db", []string{"purge", "--published", "--older-than", "-1s"}, 2, "a duration must not be negative"},
		{"purge bad age", "x.db", []string{"purge", "--published", "--older-than", "1x"}, 2, "want a duration such as 720h"},
		{"purge argument", "x.db", []string{"purge", "--published", "--older-than", "1h", "now"}, 2, `unexpected argument "now": purge takes only flags`},
		{"purge yes value", "x.db", []string{"purge", "--published", "--older-than", "1h", "--yes=please"}, 2, `invalid boolean value "please" for -yes`},

		// watch
		{"watch zero interval", "x.db", []string{"watch", "--interval", "0"}, 2, "want a duration above zero"},
		{"watch negative interval", "x.db", []string{"watch", "--interval", "-1s"}, 2, "a duration must not be negative"},
		{"watch bad interval", "x.db", []string{"watch", "--interval", "fast"}, 2, "want a duration such as 720h"},
		{"watch negative count", "x.db", []string{"watch", "-n", "-1"}, 2, "want a whole number of at least 0"},
		{"watch count not a number", "x.db", []string{"watch", "-n", "two"}, 2, "want a whole number of at least 0"},
		{"watch argument", "x.db", []string{"watch", "1s"}, 2, `unexpected argument "1s": watch takes only flags`},

		// inbox
		{"empty inbox table", "x.db", []string{"--inbox-table=", "status"}, 2, `invalid value "" for flag -inbox-table: give a table name`},
		{"inbox table with a space", "x.db", []string{"--inbox-table", "a b", "status"}, 2, `inbox table name "a b" is not a plain SQL identifier`},
		{"inbox table after the command", "x.db", []string{"inbox", "list", "--inbox-table", "t"}, 2, "--inbox-table goes before the command"},
		{"inbox nothing", "x.db", []string{"inbox"}, 2, "give an inbox command: list or retry"},
		{"inbox unknown", "x.db", []string{"inbox", "show"}, 2, `unknown inbox command "show": give list or retry`},
		{"inbox flag first", "x.db", []string{"inbox", "--group", "g", "list"}, 2, `unknown inbox command "--group"`},
		{"inbox list bad state", "x.db", []string{"inbox", "list", "--state", "dead"}, 2, `invalid value "dead" for flag -state: want applied, parked, held or retry`},
		{"inbox list empty group", "x.db", []string{"inbox", "list", "--group="}, 2, "give a consumer group"},
		{"inbox list empty topic", "x.db", []string{"inbox", "list", "--topic", ""}, 2, "give a topic name"},
		{"inbox list zero limit", "x.db", []string{"inbox", "list", "--limit", "0"}, 2, "want a whole number of at least 1"},
		{"inbox list argument", "x.db", []string{"inbox", "list", "parked"}, 2, `unexpected argument "parked": inbox list takes only flags`},
		{"inbox list key", "x.db", []string{"inbox", "list", "--key", "k"}, 2, "flag provided but not defined: -key"},
		{"inbox retry without group", "x.db", []string{"inbox", "retry", "--parked"}, 2, "give --group, the consumer group whose messages to retry"},
		{"inbox retry empty group", "x.db", []string{"inbox", "retry", "--group", "", "--parked"}, 2, "give a consumer group"},
		{"inbox retry nothing", "x.db", []string{"inbox", "retry", "--group", "g"}, 2, "give message ids, or --parked"},
		{"inbox retry ids and parked", "x.db", []string{"inbox", "retry", "--group", "g", "--parked", "m1"}, 2, "give ids or --parked, not both"},
		{"inbox retry empty id", "x.db", []string{"inbox", "retry", "--group", "g", "m1", ""}, 2, `"" is not a message id`},
		{"inbox retry parked value", "x.db", []string{"inbox", "retry", "--group", "g", "--parked=all"}, 2, `invalid boolean value "all" for -parked`},
	}
	dir := t.TempDir()
	db, err := gorm.Open(sqliteDialector(filepath.Join(dir, "x.db")), &gorm.Config{})
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Use(outbox.Plugin()); err != nil {
		t.Fatal(err)
	}
	for _, c := range cases {
		dsns := []string{c.dsn}
		if c.dsn == "x.db" {
			// A usage error is found before the database is opened: the
			// same with a database as without one.
			dsns = []string{filepath.Join(dir, "x.db")}
			if c.code == 2 {
				dsns = append(dsns, filepath.Join(dir, "missing.db"))
			}
		}
		for _, dsn := range dsns {
			r := runCmd(t, dsn, "", c.args...)
			if r.code != c.code || !strings.Contains(r.stderr, c.want) {
				t.Errorf("%s: exit %d, stderr %q; want exit %d and %q", c.name, r.code, r.stderr, c.code, c.want)
			}
			if c.code == 2 && !strings.Contains(r.stderr, "usage: outbox ") {
				t.Errorf("%s: the usage error does not say what is allowed: %q", c.name, r.stderr)
			}
			if r.stdout != "" {
				t.Errorf("%s: a failed command printed %q", c.name, r.stdout)
			}
			if strings.Contains(r.stdout+r.stderr, "s3cret") {
				t.Errorf("%s: the password was printed", c.name)
			}
		}
	}
	var n int64
	if err := db.Table(outbox.DefaultTableName).Count(&n).Error; err != nil || n != 0 {
		t.Errorf("the refused commands left %d messages (%v)", n, err)
	}

	r := runCmdEnv(t, []string{"OUTBOX_DSN=" + filepath.Join(dir, "x.db"), "OUTBOX_TABLE=bad-name"}, "", "status")
	if r.code != 2 || !strings.Contains(r.stderr, `table name "bad-name" is not a plain SQL identifier`) || !strings.Contains(r.stderr, "(from OUTBOX_TABLE)") {
		t.Errorf("bad OUTBOX_TABLE: %+v", r)
	}
	r = runCmdEnv(t, []string{"OUTBOX_DSN=" + filepath.Join(dir, "x.db"), "OUTBOX_INBOX_TABLE=bad-name"}, "", "status")
	if r.code != 2 || !strings.Contains(r.stderr, `inbox table name "bad-name" is not a plain SQL identifier`) || !strings.Contains(r.stderr, "(from OUTBOX_INBOX_TABLE)") {
		t.Errorf("bad OUTBOX_INBOX_TABLE: %+v", r)
	}
	r = runCmdEnv(t, []string{"OUTBOX_DSN=" + filepath.Join(dir, "x.db"), "OUTBOX_INBOX_TABLE=nope"}, "", "status")
	if r.code != 1 || !strings.Contains(r.stderr, `inbox table "nope" does not exist`) {
		t.Errorf("OUTBOX_INBOX_TABLE naming a missing table: %+v", r)
	}
}

// TestCommandHonoursEdgeValues: the values at the edges of what is allowed
// do what they say.
func TestCommandHonoursEdgeValues(t *testing.T) {
	path := filepath.Join(t.TempDir(), "app.db")
	db, err := gorm.Open(sqliteDialector(path), &gorm.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s, _ := db.DB(); s.Close() })
	msgs := populate(t, db)
	dead := msgs["c"][0].ID.String()
	cases := []struct {
		name  string
		args  []string
		check func(r result) bool
	}{
		{"help", []string{"help"}, func(r result) bool { return strings.HasPrefix(r.stdout, "usage: outbox") }},
		{"-h", []string{"-h"}, func(r result) bool { return strings.HasPrefix(r.stdout, "usage: outbox") }},
		{"a command's -h", []string{"list", "-h"}, func(r result) bool { return strings.HasPrefix(r.stdout, "usage: outbox") }},
		{"a command's --help", []string{"purge", "--help"}, func(r result) bool { return strings.HasPrefix(r.stdout, "usage: outbox") }},
		{"the inbox's -h", []string{"inbox", "-h"}, func(r result) bool { return strings.HasPrefix(r.stdout, "usage: outbox") }},
		{"an inbox command's -h", []string{"inbox", "retry", "-h"}, func(r result) bool { return strings.HasPrefix(r.stdout, "usage: outbox") }},
		{"table given", []string{"--table", outbox.DefaultTableName, "status"}, func(r result) bool { return strings.Contains(r.stdout, "pending            3") }},
		{"budget of 1", []string{"status", "--max-attempts", "1"}, func(r result) bool {
			return strings.Contains(r.stdout, "2 over the attempt budget of 1")
		}},
		{"json=true", []string{"status", "--json=true"}, func(r result) bool { return strings.Contains(r.stdout, `"dead": 2`) }},
		{"json=false", []string{"status", "--json=false"}, func(r result) bool { return strings.HasPrefix(r.stdout, "table ") }},
		{"age 0s: everything", []string{"list", "--older-than", "0s"}, func(r result) bool { return strings.Count(r.stdout, "\n") == 8 }},
		{"age 0: everything", []string{"list", "--older-than=0"}, func(r result) bool { return strings.Count(r.stdout, "\n") == 8 }},
		{"the longest age", []string{"list", "--older-than", "2562047h"}, func(r result) bool { return strings.Count(r.stdout, "\n") == 1 }},
		{"limit 1, last page", []string{"list", "--limit", "1", "--page", "7"}, func(r result) bool {
			return strings.Count(r.stdout, "\n") == 2 && strings.Contains(r.stdout, msgs["c"][1].ID.String())
		}},
		{"largest limit", []string{"list", "--limit", "9223372036854775807"}, func(r result) bool { return strings.Count(r.stdout, "\n") == 8 }},
		{"largest page", []string{"list", "--limit", "1", "--page", "9223372036854775807"}, func(r result) bool {
			return strings.Count(r.stdout, "\n") == 1
		}},
		{"decimal limit", []string{"list", "--limit", "010", "--topic", "a"}, func(r result) bool { return strings.Count(r.stdout, "\n") == 4 }},
		{"state and topic and key", []string{"list", "--state=pending", "--topic", "a", "--key", "k1"}, func(r result) bool {
			return strings.Count(r.stdout, "\n") == 2 && strings.Contains(r.stdout, msgs["a"][1].ID.String())
		}},
		{"a topic with none", []string{"list", "--topic", "no such topic"}, func(r result) bool { return strings.Count(r.stdout, "\n") == 1 }},
		{"id as a URN", []string{"show", "urn:uuid:" + dead}, func(r result) bool { return strings.Contains(r.stdout, "broker said no") }},
		{"id in capitals", []string{"show", strings.ToUpper(dead)}, func(r result) bool { return strings.Contains(r.stdout, "broker said no") }},
		{"a tiny interval", []string{"watch", "-n", "3", "--interval", "1ns"}, func(r result) bool { return strings.Count(r.stdout, "pending 3") == 3 }},
		{"nothing after --", []string{"list", "--limit", "1", "--"}, func(r result) bool { return strings.Count(r.stdout, "\n") == 2 }},
	}
	for _, c := range cases {
		r := runCmd(t, path, "", c.args...)
		if r.code != 0 || !c.check(r) {
			t.Errorf("%s: %v: exit %d, stdout %q, stderr %q", c.name, c.args, r.code, r.stdout, r.stderr)
		}
	}
}

// status shows the slots of an exactly-once publisher that ran on the
// table: their transactional ids, commits, and that none is held or open
// once the publisher stopped.
func TestStatusShowsExactlyOnceSlots(t *testing.T) {
	db, dsn := backends[0].open(t)
	populate(t, db)
	_, addrs := outboxtest.Kafka(t, 1, "a")
	sender, err := kafka.NewTransactionalSender(addrs, "status-test", nil, kafka.WithSlots(2))
	if err != nil {
		t.Fatal(err)
	}
	defer sender.Close()
	pub, err := outbox.NewPublisher(db, sender)
	if err != nil {
		t.Fatal(err)
	}
	if res, err := pub.PublishOnce(t.Context()); err != nil || res.Published != 3 {
		t.Fatalf("PublishOnce: %+v %v", res, err)
	}
	r := runCmd(t, dsn, "", "status")
	if r.code != 0 || !strings.Contains(r.stdout, "exactly-once slots") ||
		!regexp.MustCompile(`status-test-0\s+-\s+1\s+0\s+0\s+free`).MatchString(r.stdout) ||
		!regexp.MustCompile(`status-test-1\s+-\s+0\s+0\s+0\s+free`).MatchString(r.stdout) {
		t.Fatalf("status after an exactly-once batch: %+v", r)
	}
	r = runCmd(t, dsn, "", "status", "--json")
	var st struct {
		Slots []struct {
			ID      string `json:"transactional_id"`
			Open    bool   `json:"open"`
			Commits int64  `json:"commits"`
		} `json:"transactional_slots"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil || len(st.Slots) != 2 || st.Slots[0].Commits != 1 || st.Slots[0].Open {
		t.Fatalf("status --json: %v %+v", err, r)
	}
}
