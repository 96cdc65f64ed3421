package main_test

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
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
	cmd := exec.Command(binary, args...)
	cmd.Env = append(os.Environ(), "OUTBOX_DSN="+dsn)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errOut strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
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

			r = runCmd(t, dsn, "", "requeue", dead.ID.String(), msgs["a"][0].ID.String())
			if r.code != 1 || !strings.Contains(r.stdout, "requeued 1") || !strings.Contains(r.stderr, "is pending, not dead") {
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
			var left int64
			db.Table(outbox.DefaultTableName).Count(&left)
			if left != 5 {
				t.Fatalf("%d messages left, want the 5 unpublished", left)
			}

			r = runCmd(t, dsn, "", "watch", "-n", "2", "--interval", "10ms")
			if r.code != 0 || strings.Count(r.stdout, "pending 5") != 2 || !strings.Contains(r.stdout, "0.0/s") {
				t.Fatalf("watch: %+v", r)
			}

			r = runCmd(t, dsn, "", "--table", "nope", "status")
			if r.code != 1 || !strings.Contains(r.stderr, `table "nope" does not exist`) {
				t.Fatalf("missing table: %+v", r)
			}
		})
	}
}

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
		{"bad state", "x.db", []string{"list", "--state", "lost"}, 2, `unknown state "lost"`},
		{"bad id", "x.db", []string{"show", "42"}, 2, `"42" is not a message id`},
		{"purge without what", "x.db", []string{"purge", "--older-than", "1h"}, 2, "--published"},
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
		dsn := c.dsn
		if dsn == "x.db" {
			dsn = filepath.Join(dir, "x.db")
		}
		r := runCmd(t, dsn, "", c.args...)
		if r.code != c.code || !strings.Contains(r.stderr, c.want) {
			t.Errorf("%s: exit %d, stderr %q; want exit %d and %q", c.name, r.code, r.stderr, c.code, c.want)
		}
		if strings.Contains(r.stdout+r.stderr, "s3cret") {
			t.Errorf("%s: the password was printed", c.name)
		}
	}
}
