package inbox_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/IBM/sarama"
	"github.com/twmb/franz-go/pkg/kgo"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/inbox"
)

// inboxRow is a row of the inbox table as the tests read and write it,
// declared here rather than borrowed from the package so that a column the
// package renamed would show.
type inboxRow struct {
	ConsumerGroup string    `gorm:"column:consumer_group"`
	MessageID     string    `gorm:"column:message_id"`
	Topic         string    `gorm:"column:topic"`
	Partition     int32     `gorm:"column:kafka_partition"`
	Offset        int64     `gorm:"column:kafka_offset"`
	Key           []byte    `gorm:"column:message_key"`
	State         string    `gorm:"column:state"`
	Attempts      int       `gorm:"column:attempts"`
	LastError     string    `gorm:"column:last_error"`
	Payload       []byte    `gorm:"column:payload"`
	Headers       *string   `gorm:"column:headers"`
	ReceivedAt    time.Time `gorm:"column:received_at"`
	ProcessedAt   time.Time `gorm:"column:processed_at"`
}

// inboxRows reads group's rows of the inbox table by message id.
func inboxRows(t testing.TB, db *gorm.DB, group string) map[string]inboxRow {
	t.Helper()
	var rows []inboxRow
	if err := db.Table(inbox.DefaultTableName).Where("consumer_group = ?", group).Find(&rows).Error; err != nil {
		t.Fatalf("reading the inbox: %v", err)
	}
	out := make(map[string]inboxRow, len(rows))
	for _, r := range rows {
		out[r.MessageID] = r
	}
	return out
}

// states summarises rows as "id=state" pairs, for failure messages.
func states(rows map[string]inboxRow) string {
	var s []string
	for id, r := range rows {
		s = append(s, id+"="+r.State)
	}
	sort.Strings(s)
	return strings.Join(s, " ")
}

// appliedRows reads the domain rows the handlers wrote, in the order they
// were written.
func appliedRows(t testing.TB, db *gorm.DB) []Applied {
	t.Helper()
	var rows []Applied
	if err := db.Order("id").Find(&rows).Error; err != nil {
		t.Fatalf("reading applieds: %v", err)
	}
	return rows
}

// appliedByID counts the domain rows written for each message id.
func appliedByID(t testing.TB, db *gorm.DB) map[string]int {
	t.Helper()
	out := map[string]int{}
	for _, r := range appliedRows(t, db) {
		out[r.MessageID]++
	}
	return out
}

// seqsOf lists the Seq of key's domain rows in the order they were written.
func seqsOf(rows []Applied, key string) []int {
	var out []int
	for _, r := range rows {
		if r.Key == key {
			out = append(out, r.Seq)
		}
	}
	return out
}

// rec is a record with a key, a value, and an outbox-message-id header
// when id is set; headers are further header pairs.
func rec(key, value, id string, headers ...string) *kgo.Record {
	r := &kgo.Record{Value: []byte(value)}
	if key != "" {
		r.Key = []byte(key)
	}
	if id != "" {
		r.Headers = append(r.Headers, kgo.RecordHeader{Key: inbox.MessageIDHeader, Value: []byte(id)})
	}
	for i := 0; i+1 < len(headers); i += 2 {
		r.Headers = append(r.Headers, kgo.RecordHeader{Key: headers[i], Value: []byte(headers[i+1])})
	}
	return r
}

// produceRecords writes recs to topic, in order, with franz-go, and waits
// for the broker's acknowledgement.
func produceRecords(t testing.TB, addrs []string, topic string, recs ...*kgo.Record) {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(addrs...), kgo.DefaultProduceTopic(topic))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := cl.ProduceSync(ctx, recs...).FirstErr(); err != nil {
		t.Fatalf("producing: %v", err)
	}
}

// quiet keeps the consumer's warnings (expected in tests that fail on
// purpose) out of the test output.
var quiet = inbox.WithLogger(slog.New(slog.DiscardHandler))

// fastRetries tries a failing handler three times within milliseconds, so
// that parking is quick.
var fastRetries = inbox.WithRetryPolicy(outbox.RetryPolicy{MaxAttempts: 3, MinBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond})

// consume makes a consumer of topics in group with h, starts it and stops
// it when the test ends.
func consume(t testing.TB, db *gorm.DB, addrs []string, group string, topics []string, h inbox.Handler, opts ...inbox.Option) *inbox.Consumer {
	t.Helper()
	c, err := inbox.NewConsumer(db, addrs, group, topics, h, append([]inbox.Option{quiet}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	run(t, c)
	return c
}

// stop stops c within a generous time.
func stop(t testing.TB, c *inbox.Consumer) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.Stop(ctx); err != nil {
		t.Fatalf("Stop: %v", err)
	}
}

// applier is a handler that writes one domain row per message, whose Seq
// is the number after the value's last '-' (or 0).
func applier(seen *calls) inbox.Handler {
	return func(tx *gorm.DB, m inbox.Message) error {
		if seen != nil {
			seen.add(m.ID)
		}
		return tx.Create(&Applied{MessageID: m.ID, Key: string(m.Key), Seq: seqOfValue(m.Value), Partition: m.Partition, Offset: m.Offset}).Error
	}
}

func seqOfValue(v []byte) int {
	var n int
	if i := bytes.LastIndexByte(v, '-'); i >= 0 {
		_, _ = fmt.Sscanf(string(v[i+1:]), "%d", &n)
	}
	return n
}

// logBuffer is a log destination the consumer's goroutines may share, to
// tell what the consumer went through.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func (l *logBuffer) option() inbox.Option {
	return inbox.WithLogger(slog.New(slog.NewTextHandler(l, &slog.HandlerOptions{Level: slog.LevelDebug})))
}

// metricValues collects reader's sums, added over their attributes, and
// its gauges' data points, by metric name.
func metricValues(t testing.TB, reader *sdkmetric.ManualReader) (sums map[string]int64, gauges map[string][]metricdata.DataPoint[int64]) {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	sums, gauges = map[string]int64{}, map[string][]metricdata.DataPoint[int64]{}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			switch d := m.Data.(type) {
			case metricdata.Sum[int64]:
				for _, p := range d.DataPoints {
					sums[m.Name] += p.Value
				}
			case metricdata.Gauge[int64]:
				gauges[m.Name] = append(gauges[m.Name], d.DataPoints...)
			}
		}
	}
	return sums, gauges
}

// meter is the option of a consumer's meter provider, and the reader the
// test reads its metrics from.
func meter() (*sdkmetric.ManualReader, inbox.Option) {
	reader := sdkmetric.NewManualReader()
	return reader, inbox.WithMeterProvider(sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader)))
}

// attr is a data point's attribute as a string ("" when absent).
func attr(set attribute.Set, key string) string {
	v, ok := set.Value(attribute.Key(key))
	if !ok {
		return ""
	}
	return v.String()
}

// saramaAdmin connects a sarama cluster admin to addrs.
func saramaAdmin(t testing.TB, addrs []string) sarama.ClusterAdmin {
	t.Helper()
	cfg := sarama.NewConfig()
	cfg.Version = sarama.V3_6_0_0
	admin, err := sarama.NewClusterAdmin(addrs, cfg)
	if err != nil {
		t.Fatalf("sarama admin: %v", err)
	}
	t.Cleanup(func() { _ = admin.Close() })
	return admin
}

// committedOffsets sums the offsets group committed on topic's partitions.
func committedOffsets(t testing.TB, admin sarama.ClusterAdmin, group, topic string, partitions int32) int64 {
	t.Helper()
	ps := make([]int32, partitions)
	for i := range ps {
		ps[i] = int32(i)
	}
	resp, err := admin.ListConsumerGroupOffsets(group, map[string][]int32{topic: ps})
	if err != nil {
		t.Fatalf("listing %s's offsets: %v", group, err)
	}
	var n int64
	for _, b := range resp.Blocks[topic] {
		if b.Offset > 0 {
			n += b.Offset
		}
	}
	return n
}

// deleteGroup deletes group and its committed offsets, so that the next
// member of the group reads the topics from the start again. A group that
// the last member has only just left may still be seen as not empty for a
// moment.
func deleteGroup(t testing.TB, admin sarama.ClusterAdmin, group string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := admin.DeleteConsumerGroup(group)
		if err == nil {
			return
		}
		if !errors.Is(err, sarama.ErrNonEmptyGroup) || time.Now().After(deadline) {
			t.Fatalf("deleting group %s: %v", group, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
