// Package outboxtest has the helpers the outbox's own tests use, for yours:
// a fresh PostgreSQL schema, MariaDB database or SQLite file per test, an in-process Kafka
// broker (kfake) over TCP, and a consumer that reads what reached it with a
// client other than the producer's (franz-go).
package outboxtest

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/glebarez/sqlite"
	"github.com/google/uuid"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
	"gorm.io/driver/mysql"
	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"
)

// PostgresDSNEnv names the variable that points the tests at a PostgreSQL
// server; DefaultPostgresDSN is used when it is unset.
const (
	PostgresDSNEnv     = "OUTBOX_TEST_POSTGRES_DSN"
	DefaultPostgresDSN = "host=127.0.0.1 port=5432 user=postgres dbname=test sslmode=disable"
)

// PostgresDSN returns the DSN of the test server.
func PostgresDSN() string {
	if dsn := os.Getenv(PostgresDSNEnv); dsn != "" {
		return dsn
	}
	return DefaultPostgresDSN
}

// Unavailable fails the test on CI (CI=true), where the server must be
// there, and skips it elsewhere with what to start.
func Unavailable(t testing.TB, what string, err error) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s is needed and not reachable: %v", what, err)
	}
	t.Skipf("%s is not reachable (%v): start it to run this test", what, err)
}

// Postgres returns a *gorm.DB whose search_path is a schema of its own,
// dropped when the test ends, so that tests share nothing.
func Postgres(t testing.TB, cfg *gorm.Config) *gorm.DB {
	t.Helper()
	db, _ := PostgresSchema(t, cfg)
	return db
}

// PostgresSchema is Postgres that also returns the DSN of the schema, for
// other processes.
func PostgresSchema(t testing.TB, cfg *gorm.Config) (*gorm.DB, string) {
	t.Helper()
	return postgresSchema(t, cfg, false)
}

// PostgresSimpleProtocol is Postgres through pgx's simple protocol
// (PreferSimpleProtocol), as an application behind PgBouncer in
// transaction pooling talks to its database: every argument is sent as
// text, which some Go types cannot be.
func PostgresSimpleProtocol(t testing.TB, cfg *gorm.Config) *gorm.DB {
	t.Helper()
	db, _ := postgresSchema(t, cfg, true)
	return db
}

func postgresSchema(t testing.TB, cfg *gorm.Config, simpleProtocol bool) (*gorm.DB, string) {
	t.Helper()
	admin, err := sql.Open("pgx", PostgresDSN())
	if err == nil {
		err = pingWithin(admin, 5*time.Second)
	}
	if err != nil {
		Unavailable(t, "PostgreSQL at "+PostgresDSN(), err)
	}
	schema := "t_" + strings.ReplaceAll(uuid.NewString(), "-", "")[:20]
	if _, err := admin.Exec(`CREATE SCHEMA ` + schema); err != nil {
		t.Fatalf("creating schema: %v", err)
	}
	t.Cleanup(func() {
		_, _ = admin.Exec(`DROP SCHEMA ` + schema + ` CASCADE`)
		_ = admin.Close()
	})
	dsn := PostgresDSN() + " search_path=" + schema
	db, err := gorm.Open(postgres.New(postgres.Config{DSN: dsn, PreferSimpleProtocol: simpleProtocol}), quiet(cfg))
	if err != nil {
		t.Fatalf("opening PostgreSQL: %v", err)
	}
	closeOnCleanup(t, db)
	return db, dsn
}

// MariaDBDSNEnv names the variable that points the tests at a MariaDB (or
// MySQL) server, as a go-sql-driver DSN without a database name;
// DefaultMariaDBDSN is used when it is unset.
const (
	MariaDBDSNEnv     = "OUTBOX_TEST_MARIADB_DSN"
	DefaultMariaDBDSN = "root@tcp(127.0.0.1:3306)/"
)

// MariaDB returns a *gorm.DB on a database of its own, dropped when the
// test ends.
func MariaDB(t testing.TB, cfg *gorm.Config) *gorm.DB {
	t.Helper()
	db, _ := MariaDBDatabase(t, cfg)
	return db
}

// MariaDBDatabase is MariaDB that also returns the DSN, for other processes.
func MariaDBDatabase(t testing.TB, cfg *gorm.Config) (*gorm.DB, string) {
	t.Helper()
	base := os.Getenv(MariaDBDSNEnv)
	if base == "" {
		base = DefaultMariaDBDSN
	}
	admin, err := sql.Open("mysql", base)
	if err == nil {
		err = pingWithin(admin, 5*time.Second)
	}
	if err != nil {
		Unavailable(t, "MariaDB at "+base, err)
	}
	name := "t_" + strings.ReplaceAll(uuid.NewString(), "-", "")[:20]
	if _, err := admin.Exec("CREATE DATABASE " + name); err != nil {
		t.Fatalf("creating database: %v", err)
	}
	t.Cleanup(func() {
		_, _ = admin.Exec("DROP DATABASE " + name)
		_ = admin.Close()
	})
	dsn := base + name + "?parseTime=true&loc=UTC"
	db, err := gorm.Open(mysql.Open(dsn), quiet(cfg))
	if err != nil {
		t.Fatalf("opening MariaDB: %v", err)
	}
	closeOnCleanup(t, db)
	return db, dsn
}

// SQLite returns a *gorm.DB on a new database file in the test's temporary
// directory, in WAL mode with a busy timeout, as an application should use it.
func SQLite(t testing.TB, cfg *gorm.Config) *gorm.DB {
	t.Helper()
	path := filepath.Join(t.TempDir(), "outbox.db")
	db, err := gorm.Open(sqlite.Open(SQLiteDSN(path)), quiet(cfg))
	if err != nil {
		t.Fatalf("opening SQLite: %v", err)
	}
	closeOnCleanup(t, db)
	return db
}

// SQLiteDSN is the DSN the outbox recommends for SQLite: WAL so readers do
// not block the writer, a busy timeout so writers wait instead of failing, and
// immediate transactions so a transaction never fails to upgrade to a writer.
func SQLiteDSN(path string) string {
	return "file:" + path + "?_pragma=busy_timeout(10000)&_pragma=journal_mode(WAL)&_txlock=immediate"
}

func quiet(cfg *gorm.Config) *gorm.Config {
	if cfg == nil {
		cfg = &gorm.Config{}
	}
	if cfg.Logger == nil {
		cfg.Logger = logger.Default.LogMode(logger.Silent)
	}
	return cfg
}

func closeOnCleanup(t testing.TB, db *gorm.DB) {
	t.Cleanup(func() {
		if sqlDB, err := db.DB(); err == nil {
			_ = sqlDB.Close()
		}
	})
}

func pingWithin(db *sql.DB, d time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	return db.PingContext(ctx)
}

// Kafka starts an in-process Kafka cluster (kfake) that listens on TCP,
// with topics of partitions partitions each, and returns its addresses.
// It is closed when the test ends.
func Kafka(t testing.TB, partitions int32, topics ...string) (*kfake.Cluster, []string) {
	t.Helper()
	opts := []kfake.Opt{kfake.NumBrokers(1), kfake.DefaultNumPartitions(int(partitions))}
	if len(topics) > 0 {
		opts = append(opts, kfake.SeedTopics(partitions, topics...))
	}
	c, err := kfake.NewCluster(opts...)
	if err != nil {
		t.Fatalf("starting kfake: %v", err)
	}
	t.Cleanup(c.Close)
	return c, c.ListenAddrs()
}

// Consume reads topic from the beginning with franz-go (read_committed) until it has n
// records or timeout passes, and returns what it read.
func Consume(t testing.TB, addrs []string, topic string, n int, timeout time.Duration) []*kgo.Record {
	t.Helper()
	recs, err := ConsumeRecords(addrs, topic, n, timeout)
	if err != nil {
		t.Fatalf("consuming %s: %v", topic, err)
	}
	return recs
}

// ConsumeRecords is Consume for code without a testing.TB (examples, commands).
func ConsumeRecords(addrs []string, topic string, n int, timeout time.Duration) ([]*kgo.Record, error) {
	cl, err := kgo.NewClient(kgo.SeedBrokers(addrs...), kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchIsolationLevel(kgo.ReadCommitted()))
	if err != nil {
		return nil, err
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var out []*kgo.Record
	for len(out) < n {
		fs := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			break
		}
		if errs := fs.Errors(); len(errs) > 0 {
			return out, fmt.Errorf("fetch: %w", errs[0].Err)
		}
		out = append(out, fs.Records()...)
	}
	return out, nil
}

// Header returns the value of a record's header, and whether it has it.
func Header(r *kgo.Record, key string) (string, bool) {
	for _, h := range r.Headers {
		if h.Key == key {
			return string(h.Value), true
		}
	}
	return "", false
}

// ReadAll reads topic from the start, with isolation.level=read_committed
// as exactly-once consumers do, until it has at least n records and
// then no new one arrives for quiet: it tells that nothing more than
// expected reached the broker. (Offsets cannot tell: a producer's epoch bump
// and transaction markers take offsets that hold no record.)
func ReadAll(t testing.TB, addrs []string, topic string, n int, quiet time.Duration) []*kgo.Record {
	t.Helper()
	recs, err := ReadAllRecords(addrs, topic, n, quiet, time.Minute)
	if err != nil {
		t.Fatalf("reading %s: %v", topic, err)
	}
	return recs
}

// ReadAllRecords is ReadAll without a testing.TB; it gives up after timeout.
func ReadAllRecords(addrs []string, topic string, n int, quiet, timeout time.Duration) ([]*kgo.Record, error) {
	cl, err := kgo.NewClient(kgo.SeedBrokers(addrs...), kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchMaxBytes(64<<20), kgo.FetchIsolationLevel(kgo.ReadCommitted()))
	if err != nil {
		return nil, err
	}
	defer cl.Close()
	deadline := time.Now().Add(timeout)
	var out []*kgo.Record
	for {
		wait := time.Until(deadline)
		if len(out) >= n {
			wait = min(wait, quiet)
		}
		if wait <= 0 {
			break
		}
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		fs := cl.PollFetches(ctx)
		cancel()
		if errs := fs.Errors(); len(errs) > 0 && ctx.Err() == nil {
			return out, fmt.Errorf("fetch: %w", errs[0].Err)
		}
		got := fs.Records()
		if len(got) == 0 && (len(out) >= n || time.Now().After(deadline)) {
			break
		}
		out = append(out, got...)
	}
	if len(out) < n {
		return out, fmt.Errorf("read %d records of %s, want at least %d", len(out), topic, n)
	}
	return out, nil
}

// EndOffset returns the sum of topic's partitions' end offsets: it grows
// whenever anything is produced, so it tells progress, not a record count.
func EndOffset(t testing.TB, addrs []string, topic string) int64 {
	t.Helper()
	n, err := EndOffsets(addrs, topic)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// EndOffsets is EndOffset without a testing.TB.
func EndOffsets(addrs []string, topic string) (int64, error) {
	cl, err := kgo.NewClient(kgo.SeedBrokers(addrs...))
	if err != nil {
		return 0, fmt.Errorf("kgo client: %w", err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	meta := kmsg.NewPtrMetadataRequest()
	mt := kmsg.NewMetadataRequestTopic()
	mt.Topic = kmsg.StringPtr(topic)
	meta.Topics = append(meta.Topics, mt)
	mresp, err := meta.RequestWith(ctx, cl)
	if err != nil {
		return 0, fmt.Errorf("metadata: %w", err)
	}
	req := kmsg.NewPtrListOffsetsRequest()
	rt := kmsg.NewListOffsetsRequestTopic()
	rt.Topic = topic
	for _, mtopic := range mresp.Topics {
		for _, p := range mtopic.Partitions {
			rp := kmsg.NewListOffsetsRequestTopicPartition()
			rp.Partition = p.Partition
			rp.Timestamp = -1 // the end
			rt.Partitions = append(rt.Partitions, rp)
		}
	}
	req.Topics = append(req.Topics, rt)
	resp, err := req.RequestWith(ctx, cl)
	if err != nil {
		return 0, fmt.Errorf("list offsets: %w", err)
	}
	var n int64
	for _, rtopic := range resp.Topics {
		for _, p := range rtopic.Partitions {
			if p.ErrorCode != 0 {
				return 0, fmt.Errorf("list offsets of %s/%d: error code %d", topic, p.Partition, p.ErrorCode)
			}
			n += p.Offset
		}
	}
	return n, nil
}

// RejectProduce makes the cluster answer every produce request with the
// Kafka error code (see kerr) while reject returns true, as a broker that
// refuses messages does; afterwards it produces normally again.
func RejectProduce(c *kfake.Cluster, code int16, reject func() bool) {
	c.ControlKey(int16(kmsg.Produce), func(kreq kmsg.Request) (kmsg.Response, error, bool) {
		if !reject() {
			c.DropControl()
			return nil, nil, false
		}
		c.KeepControl()
		req := kreq.(*kmsg.ProduceRequest)
		resp := req.ResponseKind().(*kmsg.ProduceResponse)
		for _, rt := range req.Topics {
			st := kmsg.NewProduceResponseTopic()
			st.Topic = rt.Topic
			st.TopicID = rt.TopicID
			for _, rp := range rt.Partitions {
				sp := kmsg.NewProduceResponseTopicPartition()
				sp.Partition = rp.Partition
				sp.ErrorCode = code
				st.Partitions = append(st.Partitions, sp)
			}
			resp.Topics = append(resp.Topics, st)
		}
		return resp, nil, true
	})
}
