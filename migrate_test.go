package outbox_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/glebarez/sqlite"
	"gorm.io/driver/mysql"
	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// migrateChildEnv makes TestConcurrentMigration a child process: its value
// is "dialect<TAB>dsn"; the child opens that database, prints migrateReady,
// waits for its stdin to close and registers the plugin once.
const (
	migrateChildEnv = "OUTBOX_TEST_MIGRATE_CHILD"
	migrateReady    = "outbox-migrate-child-ready"
	migrateChildren = 8
)

// TestConcurrentMigration starts several processes at once on an empty
// database, as the replicas of a deployment do, and wants every one of them
// to register the plugin and the table to be what DDL creates.
func TestConcurrentMigration(t *testing.T) {
	if spec := os.Getenv(migrateChildEnv); spec != "" {
		migrateChild(t, spec)
		return
	}
	for _, d := range []struct {
		name string
		open func(t *testing.T) (dialect, dsn string, db func() *gorm.DB)
	}{
		{"postgres", func(t *testing.T) (string, string, func() *gorm.DB) {
			db, dsn := outboxtest.PostgresSchema(t, nil)
			return "postgres", dsn, func() *gorm.DB { return db }
		}},
		// A snapshot taken before the lock would not see the table the
		// lock's last holder made.
		{"postgres-repeatable-read", func(t *testing.T) (string, string, func() *gorm.DB) {
			db, dsn := outboxtest.PostgresSchema(t, nil)
			return "postgres", dsn + " default_transaction_isolation='repeatable read'", func() *gorm.DB { return db }
		}},
		{"mariadb", func(t *testing.T) (string, string, func() *gorm.DB) {
			db, dsn := outboxtest.MariaDBDatabase(t, nil)
			return "mysql", dsn, func() *gorm.DB { return db }
		}},
		{"sqlite", func(t *testing.T) (string, string, func() *gorm.DB) {
			// The children create the file: it does not exist before.
			dsn := outboxtest.SQLiteDSN(filepath.Join(t.TempDir(), "outbox.db"))
			return "sqlite", dsn, func() *gorm.DB { return openDialect(t, "sqlite", dsn) }
		}},
	} {
		t.Run(d.name, func(t *testing.T) {
			dialect, dsn, open := d.open(t)
			failed := startTogether(t, migrateChildren, dialect+"\t"+dsn)
			if len(failed) > 0 {
				t.Errorf("%d of %d processes failed to register the plugin:\n%s", len(failed), migrateChildren, strings.Join(failed, "\n"))
			}
			db := open()
			stmts, err := outbox.DDL(dialect, "from_ddl")
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range stmts {
				if err := db.Exec(s).Error; err != nil {
					t.Fatalf("%s: %v", s, err)
				}
			}
			migrated, fromDDL := describe(t, db, dialect, "outbox_messages"), describe(t, db, dialect, "from_ddl")
			if migrated != fromDDL {
				t.Fatalf("schemas differ\nmigration:\n%s\nDDL:\n%s", migrated, fromDDL)
			}
			// The table works: another replica registers on it and enqueues.
			if err := db.Use(outbox.Plugin()); err != nil {
				t.Fatalf("db.Use on the migrated table: %v", err)
			}
			if err := db.Transaction(func(tx *gorm.DB) error {
				return outbox.Enqueue(tx, outbox.Message{Topic: "orders", Key: "k", Payload: "p"})
			}); err != nil {
				t.Fatalf("enqueue: %v", err)
			}
			if n := len(messages(t, db)); n != 1 {
				t.Fatalf("%d messages in the outbox, want 1", n)
			}
		})
	}
}

// migrateChild is one replica starting: it fails (exit status 1, its error
// printed) when db.Use does.
func migrateChild(t *testing.T, spec string) {
	dialect, dsn, _ := strings.Cut(spec, "\t")
	db := openDialect(t, dialect, dsn)
	fmt.Println(migrateReady)
	_, _ = io.Copy(io.Discard, os.Stdin) // the parent closes it to start every child at once
	if err := db.Use(outbox.Plugin()); err != nil {
		t.Fatalf("db.Use(outbox.Plugin()): %v", err)
	}
}

func openDialect(t *testing.T, dialect, dsn string) *gorm.DB {
	t.Helper()
	var d gorm.Dialector
	switch dialect {
	case "postgres":
		d = postgres.Open(dsn)
	case "mysql":
		d = mysql.Open(dsn)
	case "sqlite":
		d = sqlite.Open(dsn)
	default:
		t.Fatalf("unknown dialect %q", dialect)
	}
	db, err := gorm.Open(d, &gorm.Config{Logger: logger.Discard})
	if err != nil {
		t.Fatalf("opening %s: %v", dialect, err)
	}
	t.Cleanup(func() {
		if sqlDB, err := db.DB(); err == nil {
			_ = sqlDB.Close()
		}
	})
	return db
}

// startTogether runs n children of this test binary on spec. Each opens its
// database first; once all are ready their stdins are closed together, so
// that the migrations run at the same moment. It returns the output of
// those that failed.
func startTogether(t *testing.T, n int, spec string) []string {
	t.Helper()
	type child struct {
		cmd   *exec.Cmd
		stdin io.WriteCloser
		mu    sync.Mutex
		out   bytes.Buffer
		ready chan struct{}
		read  chan struct{} // stdout read to its end
	}
	children := make([]*child, n)
	for i := range children {
		c := &child{ready: make(chan struct{}), read: make(chan struct{})}
		c.cmd = exec.Command(os.Args[0], "-test.run=^TestConcurrentMigration$", "-test.count=1", "-test.timeout=3m")
		c.cmd.Env = append(os.Environ(), migrateChildEnv+"="+spec)
		c.cmd.Stderr = writerFunc(func(p []byte) (int, error) {
			c.mu.Lock()
			defer c.mu.Unlock()
			return c.out.Write(p)
		})
		var err error
		if c.stdin, err = c.cmd.StdinPipe(); err != nil {
			t.Fatal(err)
		}
		stdout, err := c.cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := c.cmd.Start(); err != nil {
			t.Fatalf("starting child %d: %v", i, err)
		}
		t.Cleanup(func() { _ = c.cmd.Process.Kill() })
		go func() {
			defer close(c.read)
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				if sc.Text() == migrateReady {
					close(c.ready)
					continue
				}
				c.mu.Lock()
				c.out.WriteString(sc.Text() + "\n")
				c.mu.Unlock()
			}
			_, _ = io.Copy(io.Discard, stdout)
		}()
		children[i] = c
	}
	timeout := time.After(2 * time.Minute)
	for i, c := range children {
		select {
		case <-c.ready:
		case <-c.read: // exited before it was ready; Wait below reports it
		case <-timeout:
			t.Fatalf("child %d was not ready within 2 minutes", i)
		}
	}
	for _, c := range children {
		_ = c.stdin.Close()
	}
	var failed []string
	for i, c := range children {
		select {
		case <-c.read:
		case <-timeout:
			t.Fatalf("child %d did not finish within 2 minutes", i)
		}
		err := c.cmd.Wait()
		select {
		case <-c.ready:
		default:
			err = fmt.Errorf("never ready (%w)", err)
		}
		if err != nil {
			c.mu.Lock()
			failed = append(failed, fmt.Sprintf("child %d: %v\n%s", i, err, strings.TrimSpace(c.out.String())))
			c.mu.Unlock()
		}
	}
	return failed
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// TestMigrationWaitIsBounded has a migration wait for another that is stuck
// holding its turn: the wait ends with the caller's context (or after a
// minute) in an error that names the table, and the stuck migration, once
// free, completes.
func TestMigrationWaitIsBounded(t *testing.T) {
	for _, d := range []struct {
		name string
		open func(t *testing.T) (dialect string, db *gorm.DB)
		// stall makes the first migration hold its turn until the
		// returned release is called; SQLite's turn is its write lock,
		// which the "other process" holds itself.
		stall func(t *testing.T, db *gorm.DB, migrate func()) (release func())
	}{
		{"postgres", func(t *testing.T) (string, *gorm.DB) { return "postgres", outboxtest.Postgres(t, nil) },
			func(t *testing.T, db *gorm.DB, migrate func()) func() {
				// The table without its indexes: the first migration
				// waits on the table, which another transaction holds.
				createTableOnly(t, db, "postgres")
				lock := db.Begin()
				if err := lock.Exec("LOCK TABLE outbox_messages IN ACCESS EXCLUSIVE MODE").Error; err != nil {
					t.Fatal(err)
				}
				migrate()
				waitFor(t, "the first migration to wait for the table", func() bool {
					var n int64
					err := db.Raw(`SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = to_regclass('outbox_messages')`).Scan(&n).Error
					return err == nil && n > 0
				})
				return func() { lock.Rollback() }
			}},
		{"mariadb", func(t *testing.T) (string, *gorm.DB) { return "mysql", outboxtest.MariaDB(t, nil) },
			func(t *testing.T, db *gorm.DB, migrate func()) func() {
				createTableOnly(t, db, "mysql")
				sqlDB, err := db.DB()
				if err != nil {
					t.Fatal(err)
				}
				conn, err := sqlDB.Conn(t.Context())
				if err != nil {
					t.Fatal(err)
				}
				if _, err := conn.ExecContext(t.Context(), "LOCK TABLES outbox_messages WRITE"); err != nil {
					t.Fatal(err)
				}
				migrate()
				waitFor(t, "the first migration to wait for the table", func() bool {
					var n int64
					err := db.Raw(`SELECT count(*) FROM information_schema.processlist
						WHERE db = DATABASE() AND state LIKE 'Waiting for table%'`).Scan(&n).Error
					return err == nil && n > 0
				})
				return func() {
					_, _ = conn.ExecContext(context.Background(), "UNLOCK TABLES")
					_ = conn.Close()
				}
			}},
		{"sqlite", func(t *testing.T) (string, *gorm.DB) {
			return "sqlite", openDialect(t, "sqlite", outboxtest.SQLiteDSN(filepath.Join(t.TempDir(), "outbox.db")))
		}, func(t *testing.T, db *gorm.DB, migrate func()) func() {
			sqlDB, err := db.DB()
			if err != nil {
				t.Fatal(err)
			}
			conn, err := sqlDB.Conn(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			if _, err := conn.ExecContext(t.Context(), "BEGIN IMMEDIATE"); err != nil {
				t.Fatal(err)
			}
			return func() {
				_, _ = conn.ExecContext(context.Background(), "ROLLBACK")
				_ = conn.Close()
			}
		}},
	} {
		t.Run(d.name, func(t *testing.T) {
			dialect, db := d.open(t)
			first := make(chan error, 1)
			release := d.stall(t, db, func() {
				go func() {
					store, err := outbox.NewStore(db)
					if err == nil {
						err = store.CreateOutboxTable(context.Background())
					}
					first <- err
				}()
			})
			store, err := outbox.NewStore(db)
			if err != nil {
				release()
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(t.Context(), time.Second)
			start := time.Now()
			err = store.CreateOutboxTable(ctx)
			took := time.Since(start)
			cancel()
			release()
			t.Logf("the waiting migration, after %v: %v", took.Round(time.Millisecond), err)
			if err == nil {
				t.Fatal("a migration that waited for a stuck one returned no error")
			}
			if msg := err.Error(); !strings.Contains(msg, "outbox_messages") || !strings.Contains(msg, "another process") {
				t.Errorf("error %q does not name the table and say what it waited for", msg)
			}
			if took > 5*time.Second {
				t.Errorf("the wait took %v with a context of one second", took)
			}
			if dialect != "sqlite" {
				select {
				case err := <-first:
					if err != nil {
						t.Fatalf("the stalled migration, once free: %v", err)
					}
				case <-time.After(time.Minute):
					t.Fatal("the stalled migration did not finish once free")
				}
			}
			if err := store.CreateOutboxTable(t.Context()); err != nil {
				t.Fatalf("migrating once no one else does: %v", err)
			}
			stmts, err := outbox.DDL(dialect, "from_ddl")
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range stmts {
				if err := db.Exec(s).Error; err != nil {
					t.Fatalf("%s: %v", s, err)
				}
			}
			if migrated, fromDDL := describe(t, db, dialect, "outbox_messages"), describe(t, db, dialect, "from_ddl"); migrated != fromDDL {
				t.Fatalf("schemas differ\nmigration:\n%s\nDDL:\n%s", migrated, fromDDL)
			}
		})
	}
}

// createTableOnly creates the outbox table from DDL's first statement,
// without the indexes that PostgreSQL creates apart.
func createTableOnly(t *testing.T, db *gorm.DB, dialect string) {
	t.Helper()
	stmts, err := outbox.DDL(dialect, "outbox_messages")
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Exec(stmts[0]).Error; err != nil {
		t.Fatal(err)
	}
}
