package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/glebarez/sqlite"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/inbox"
	"github.com/gorm-outbox/outbox/internal/databases"
	"github.com/gorm-outbox/outbox/internal/inboxstore"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// fuzzDatabase makes a SQLite outbox with a message in each state and an
// inbox with a message of group g in each state, and returns its path and
// the id of the dead message.
func fuzzDatabase(f *testing.F) (string, string) {
	path := filepath.Join(f.TempDir(), "fuzz.db")
	db, err := gorm.Open(sqlite.Open(outboxtest.SQLiteDSN(path)), &gorm.Config{Logger: logger.Discard})
	if err != nil {
		f.Fatal(err)
	}
	defer func() { s, _ := db.DB(); s.Close() }()
	if err := db.Use(outbox.Plugin()); err != nil {
		f.Fatal(err)
	}
	for _, topic := range []string{"a", "b", "c"} {
		err := db.Transaction(func(tx *gorm.DB) error {
			return outbox.Enqueue(tx, outbox.Message{Topic: topic, Key: "k", Payload: `{"n":1}`, Headers: map[string]string{"type": topic}})
		})
		if err != nil {
			f.Fatal(err)
		}
	}
	old := time.Now().Add(-time.Hour).UTC()
	db.Table(outbox.DefaultTableName).Where("topic = 'b'").Updates(map[string]any{"state": outbox.StatePublished, "published_at": old})
	db.Table(outbox.DefaultTableName).Where("topic = 'c'").Updates(map[string]any{"state": outbox.StateDead, "attempts": 10})
	var dead string
	if err := db.Table(outbox.DefaultTableName).Where("topic = 'c'").Pluck("id", &dead).Error; err != nil {
		f.Fatal(err)
	}
	if err := db.Use(inbox.Plugin()); err != nil {
		f.Fatal(err)
	}
	d, err := databases.Named("sqlite")
	if err != nil {
		f.Fatal(err)
	}
	store := inboxstore.New(db, inbox.DefaultTableName, d.Inbox)
	now := time.Now().UTC()
	var rows []*inboxstore.Row
	for i, state := range inboxStates {
		rows = append(rows, &inboxstore.Row{ConsumerGroup: "g", MessageID: state, Topic: "a", Offset: int64(i), Key: []byte("k"),
			State: state, Payload: []byte("{}"), ReceivedAt: now, ProcessedAt: now})
	}
	if err := db.Transaction(func(tx *gorm.DB) error { return store.Insert(tx, rows) }); err != nil {
		f.Fatal(err)
	}
	return path, dead
}

// FuzzRun: whatever the command line, the command does not panic, exits 0,
// 1 or 2, says why when it fails, and a usage error (2) is exactly what the
// parse finds before any database is opened.
//
// The input is the argument list joined by NUL, which no real argument can
// hold. The DSN is a temporary SQLite file, given by OUTBOX_DSN; inputs
// that set --dsn are skipped, lest the fuzzer reach a real server.
func FuzzRun(f *testing.F) {
	path, dead := fuzzDatabase(f)
	f.Setenv("OUTBOX_DSN", path)
	f.Setenv("OUTBOX_TABLE", "")
	f.Setenv("OUTBOX_INBOX_TABLE", "")
	for _, args := range [][]string{
		nil, {""}, {"help"}, {"-h"}, {"--frob"}, {"frobnicate"},
		{"status"}, {"status", "--json"}, {"status", "--max-attempts", "0"}, {"status", "extra"},
		{"list", "--state", "dead"}, {"list", "--state", "lost"}, {"list", "--older-than", "0s", "--limit", "1", "--page", "2"},
		{"list", "--limit", "-1"}, {"list", "--key="}, {"list", "--limit", "9223372036854775807", "--page", "2"}, {"list", "-h"},
		{"show", dead}, {"show", "not-an-id"}, {"show"},
		{"requeue", dead, dead}, {"requeue", "--dead", "--topic", "c"}, {"requeue", "--topic=", "--dead"},
		{"purge", "--published", "--older-than", "0s"}, {"purge", "--published", "--older-than", "0s", "--yes"},
		{"purge", "--published", "--older-than", "-1h"}, {"purge", "--older-than", "1h"},
		{"watch", "-n", "2", "--interval", "1ms"}, {"watch", "--interval", "0"},
		{"--table", "nope", "status"}, {"--table", "a b", "list"}, {"--table=main.outbox_messages", "list"},
		{"inbox"}, {"inbox", "-h"}, {"inbox", "frob"}, {"inbox", "list"}, {"inbox", "list", "--group", "g", "--state", "parked", "--payload"},
		{"inbox", "list", "--state", "dead"}, {"inbox", "list", "--limit", "1"}, {"inbox", "list", "--topic="},
		{"inbox", "retry", "--group", "g", "parked", "parked", "held", "nope"}, {"inbox", "retry", "--group", "g", "--parked"},
		{"inbox", "retry", "--parked"}, {"inbox", "retry", "--group", "g"}, {"inbox", "retry", "--group", "g", "--parked", "x"},
		{"--inbox-table", "nope", "inbox", "list"}, {"--inbox-table", "a b", "status"}, {"--inbox-table=main.inbox_messages", "status", "--json"},
	} {
		f.Add(strings.Join(args, "\x00"))
	}
	f.Fuzz(func(t *testing.T, line string) {
		var args []string
		if line != "" {
			args = strings.Split(line, "\x00")
		}
		for _, a := range args {
			if strings.HasPrefix(a, "-") && strings.HasPrefix(strings.TrimLeft(a, "-"), "dsn") {
				t.Skip("sets the DSN")
			}
		}
		// watch runs until interrupted: the deadline is its interruption.
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		defer cancel()
		var stdout, stderr bytes.Buffer
		code := run(ctx, args, strings.NewReader("n\n"), &stdout, &stderr)
		switch code {
		case 0:
		case 1:
			if stderr.Len() == 0 {
				t.Fatalf("%q: exit 1 with nothing said", args)
			}
		case 2:
			if !strings.Contains(stderr.String(), "usage: outbox") {
				t.Fatalf("%q: exit 2 without saying what is allowed: %q", args, stderr.String())
			}
		default:
			t.Fatalf("%q: exit %d", args, code)
		}
		_, err := parseArgs(args, os.Getenv)
		var u usageError
		if errors.As(err, &u) != (code == 2) {
			t.Fatalf("%q: exit %d, but the parse alone gives %v", args, code, err)
		}
	})
}
