package inbox_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/inbox"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// databases are the backends every case runs on.
var databases = []struct {
	name string
	open func(testing.TB, *gorm.Config) *gorm.DB
}{
	{"postgres", outboxtest.Postgres},
	{"mariadb", outboxtest.MariaDB},
	{"sqlite", outboxtest.SQLite},
}

// eachDB runs fn as a subtest on every backend, with the inbox registered
// and the test's domain table migrated.
func eachDB(t *testing.T, fn func(t *testing.T, db *gorm.DB)) {
	t.Helper()
	for _, d := range databases {
		t.Run(d.name, func(t *testing.T) {
			fn(t, setup(t, d.open(t, nil)))
		})
	}
}

func setup(t testing.TB, db *gorm.DB, opts ...inbox.PluginOption) *gorm.DB {
	t.Helper()
	if err := db.Use(inbox.Plugin(opts...)); err != nil {
		t.Fatalf("db.Use(inbox.Plugin()): %v", err)
	}
	if err := db.AutoMigrate(&Applied{}); err != nil {
		t.Fatalf("migrating: %v", err)
	}
	return db
}

// Applied is the domain row a test handler writes per message.
type Applied struct {
	ID        uint   `gorm:"primaryKey"`
	MessageID string `gorm:"size:255"`
	Key       string `gorm:"size:255"`
	Seq       int
	Partition int32
	Offset    int64
}

// record is one message to produce.
type record struct {
	key, value, id string
}

// produce writes recs to topic with a franz-go client (not the consumer's
// library), each with an outbox-message-id header when id is set, and waits
// for the broker's acknowledgement.
func produce(t testing.TB, addrs []string, topic string, recs ...record) {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(addrs...), kgo.DefaultProduceTopic(topic))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rs := make([]*kgo.Record, len(recs))
	for i, r := range recs {
		rs[i] = &kgo.Record{Key: []byte(r.key), Value: []byte(r.value)}
		if r.id != "" {
			rs[i].Headers = []kgo.RecordHeader{{Key: inbox.MessageIDHeader, Value: []byte(r.id)}}
		}
	}
	if err := cl.ProduceSync(ctx, rs...).FirstErr(); err != nil {
		t.Fatalf("producing: %v", err)
	}
}

// run starts c and stops it when the test ends.
func run(t testing.TB, c *inbox.Consumer) {
	t.Helper()
	if err := c.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := c.Stop(ctx); err != nil {
			t.Errorf("Stop: %v", err)
		}
	})
}

// waitFor polls cond until it holds or timeout passes.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, state := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("waited %v for %s; %s", timeout, what, state)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// countRows counts model's rows matching where.
func countRows(t testing.TB, db *gorm.DB, table string, where string, args ...any) int64 {
	t.Helper()
	var n int64
	q := db.Table(table)
	if where != "" {
		q = q.Where(where, args...)
	}
	if err := q.Count(&n).Error; err != nil {
		t.Fatal(err)
	}
	return n
}

// calls counts handler calls by message id.
type calls struct {
	mu sync.Mutex
	n  map[string]int
}

func (c *calls) add(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.n == nil {
		c.n = map[string]int{}
	}
	c.n[id]++
}

func (c *calls) get(id string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n[id]
}

func group(t testing.TB) string { return fmt.Sprintf("g-%s-%d", t.Name(), time.Now().UnixNano()) }
