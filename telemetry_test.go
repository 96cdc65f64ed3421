package outbox_test

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/kafka"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// metricsByName collects what reader holds: sums and gauges as numbers,
// histograms as their count, per metric and destination.
func metricsByName(t *testing.T, reader *sdkmetric.ManualReader) map[string]float64 {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	key := func(name string, attrs attribute.Set) string {
		if v, ok := attrs.Value("messaging.destination.name"); ok {
			return name + "{" + v.AsString() + "}"
		}
		if v, ok := attrs.Value("outbox.outage.cause"); ok {
			return name + "{" + v.AsString() + "}"
		}
		return name
	}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			switch d := m.Data.(type) {
			case metricdata.Sum[int64]:
				for _, p := range d.DataPoints {
					out[key(m.Name, p.Attributes)] += float64(p.Value)
				}
			case metricdata.Gauge[int64]:
				for _, p := range d.DataPoints {
					out[key(m.Name, p.Attributes)] = float64(p.Value)
				}
			case metricdata.Gauge[float64]:
				for _, p := range d.DataPoints {
					out[key(m.Name, p.Attributes)] = p.Value
				}
			case metricdata.Histogram[float64]:
				for _, p := range d.DataPoints {
					out[key(m.Name, p.Attributes)] += float64(p.Count)
				}
			case metricdata.Histogram[int64]:
				for _, p := range d.DataPoints {
					out[key(m.Name, p.Attributes)] += float64(p.Count)
				}
			}
		}
	}
	return out
}

func TestMetricsAndTraces(t *testing.T) {
	for _, d := range databases {
		t.Run(d.name, func(t *testing.T) {
			reader := sdkmetric.NewManualReader()
			mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
			spans := tracetest.NewInMemoryExporter()
			tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(spans))
			db := setup(t, d.open(t, nil), outbox.WithMeterProvider(mp), outbox.WithTracerProvider(tp))
			_, addrs := outboxtest.Kafka(t, 1, "traced")

			// The enqueuing request's trace.
			ctx, reqSpan := tp.Tracer("app").Start(context.Background(), "POST /orders")
			err := db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
				return outbox.Enqueue(tx, outbox.Message{Topic: "traced", Key: "k", Payload: "with trace"},
					outbox.Message{Topic: "traced", Key: "k", Payload: "also"})
			})
			reqSpan.End()
			if err != nil {
				t.Fatal(err)
			}
			pub, err := outbox.NewPublisher(db, kafkaSender(t, addrs), outbox.WithLogger(discardLogger()))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := pub.PublishOnce(context.Background()); err != nil {
				t.Fatal(err)
			}
			// The consumer gets traceparent and continues the producer's trace.
			recs := outboxtest.Consume(t, addrs, "traced", 2, 10*time.Second)
			tp0, ok := outboxtest.Header(recs[0], "traceparent")
			want := reqSpan.SpanContext()
			if !ok || !strings.Contains(tp0, want.TraceID().String()) || !strings.Contains(tp0, want.SpanID().String()) {
				t.Fatalf("traceparent %q does not carry the request's span %s", tp0, want.SpanID())
			}
			var send sdktrace.ReadOnlySpan
			for _, s := range spans.GetSpans().Snapshots() {
				if s.Name() == "outbox send" {
					send = s
				}
			}
			if send == nil || send.SpanKind() != trace.SpanKindProducer {
				t.Fatalf("no producer span for the send")
			}
			if len(send.Links()) != 2 || send.Links()[0].SpanContext.SpanID() != want.SpanID() {
				t.Fatalf("send span links %v, want the request's span twice", send.Links())
			}

			m := metricsByName(t, reader)
			for name, want := range map[string]float64{
				"outbox.messages.enqueued{traced}":        2,
				"outbox.messages.published{traced}":       2,
				"outbox.messages.publish.latency{traced}": 2,
				"messaging.client.operation.duration":     1,
				"outbox.batch.size":                       1,
			} {
				if m[name] != want {
					t.Errorf("%s = %v, want %v (all: %v)", name, m[name], want, m)
				}
			}
		})
	}
}

func TestMetricsOfFailuresAndTheBacklog(t *testing.T) {
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	db := setup(t, outboxtest.SQLite(t, nil), outbox.WithMeterProvider(mp))
	enqueueN(t, db, "m", 3)
	// Refuses "m" for good, and cannot reach the broker for "later".
	refuse := outbox.SenderFunc(func(_ context.Context, msgs []*outbox.OutboxMessage) error {
		if msgs[0].Topic == "later" {
			return outbox.ErrBrokerUnavailable
		}
		return fmt.Errorf("refused")
	})
	pub, err := outbox.NewPublisher(db, refuse, outbox.WithLogger(discardLogger()), outbox.WithPollInterval(time.Hour),
		outbox.WithRetryPolicy(outbox.RetryPolicy{MaxAttempts: 1}))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pub.PublishOnce(context.Background()); err != nil {
		t.Fatal(err)
	}
	enqueueN(t, db, "later", 2) // a backlog of two
	if err := pub.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = pub.Stop(context.Background()) }()
	waitFor(t, "the backlog gauges", func() bool {
		m := metricsByName(t, reader)
		return m["outbox.messages.dead.current"] == 3 && m["outbox.messages.pending"] == 2
	})
	m := metricsByName(t, reader)
	if m["outbox.messages.failed{m}"] != 3 || m["outbox.messages.dead{m}"] != 3 {
		t.Errorf("failed %v dead %v, want 3 and 3", m["outbox.messages.failed{m}"], m["outbox.messages.dead{m}"])
	}
	if age := m["outbox.messages.oldest_pending.age"]; age < 0 || age > 60 {
		t.Errorf("oldest pending age %vs", age)
	}
}

// syncBuffer is a log destination the publisher's goroutines may share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestLogsOneLinePerOutageAndNonePerMessage(t *testing.T) {
	db := setup(t, outboxtest.SQLite(t, nil))
	var down sync.Mutex
	isDown := true
	var sent int
	sender := outbox.SenderFunc(func(_ context.Context, msgs []*outbox.OutboxMessage) error {
		down.Lock()
		defer down.Unlock()
		if isDown {
			return fmt.Errorf("dial: %w", outbox.ErrBrokerUnavailable)
		}
		sent += len(msgs)
		return nil
	})
	var logs syncBuffer
	logger := slog.New(slog.NewTextHandler(&logs, nil)) // level Info, the default
	enqueueN(t, db, "logs", 50)
	pub, err := outbox.NewPublisher(db, sender, outbox.WithLogger(logger), outbox.WithPollInterval(5*time.Millisecond),
		outbox.WithMaxPause(20*time.Millisecond), outbox.WithWorkers(2))
	if err != nil {
		t.Fatal(err)
	}
	if err := pub.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // many polls while down
	down.Lock()
	isDown = false
	down.Unlock()
	waitFor(t, "the messages to go out", func() bool { down.Lock(); defer down.Unlock(); return sent == 50 })
	if err := pub.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	out := logs.String()
	if n := strings.Count(out, "paused"); n != 1 {
		t.Errorf("%d 'paused' lines, want 1:\n%s", n, out)
	}
	if n := strings.Count(out, "resumed"); n != 1 {
		t.Errorf("%d 'resumed' lines, want 1:\n%s", n, out)
	}
	if lines := strings.Count(out, "\n"); lines > 6 {
		t.Errorf("%d log lines for 50 messages, want a handful:\n%s", lines, out)
	}
	if strings.Contains(out, "m0") || strings.Contains(out, "payload") {
		t.Errorf("a payload reached the logs:\n%s", out)
	}
	_ = kafka.MessageIDHeader
}
