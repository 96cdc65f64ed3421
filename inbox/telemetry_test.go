package inbox_test

import (
	"fmt"
	"testing"
	"time"

	"go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/inbox"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// The consumer's counters follow what happened to each message, it reports
// each partition's lag, and a message's span continues the trace of its
// traceparent header.
func TestMetricsAndTraces(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 1, "orders")
		g := group(t)
		reader, mp := meter()
		spans := tracetest.NewSpanRecorder()
		tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(spans))
		const traceID, parentID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
		produceRecords(t, addrs, "orders",
			rec("a", "v-1", "id-1"),
			rec("b", "v-2", "id-2"),
			rec("a", "v-1", "id-1"), // sent twice
			rec("c", "bad", "id-bad"),
			rec("c", "v-4", "id-4"), // held behind id-bad
			rec("d", "v-5", "id-traced", "traceparent", "00-"+traceID+"-"+parentID+"-01"),
		)
		var seen calls
		consume(t, db, addrs, g, []string{"orders"}, refusingValue(&seen, "bad"), mp, inbox.WithTracerProvider(tp), fastRetries)
		want := map[string]int64{
			"inbox.messages.consumed":   6,
			"inbox.messages.applied":    3,
			"inbox.messages.duplicates": 1,
			"inbox.messages.held":       1,
			"inbox.handler.failures":    3,
			"inbox.messages.parked":     1,
		}
		waitFor(t, time.Minute, "the counters", func() (bool, string) {
			sums, gauges := metricValues(t, reader)
			lag := gauges["inbox.consumer.lag"]
			ok := len(lag) == 1 && lag[0].Value == 0
			for name, n := range want {
				ok = ok && sums[name] == n
			}
			return ok, fmt.Sprintf("sums %v, lag %v", sums, lag)
		})
		_, gauges := metricValues(t, reader)
		lag := gauges["inbox.consumer.lag"][0]
		if attr(lag.Attributes, "messaging.destination.name") != "orders" || attr(lag.Attributes, "messaging.destination.partition.id") != "0" {
			t.Errorf("lag reported for %v, want orders partition 0", lag.Attributes)
		}

		var traced, failed []sdktrace.ReadOnlySpan
		for _, s := range spans.Ended() {
			for _, a := range s.Attributes() {
				if a.Key == "messaging.message.id" && a.Value.AsString() == "id-traced" {
					traced = append(traced, s)
				}
				if a.Key == "messaging.message.id" && a.Value.AsString() == "id-bad" {
					failed = append(failed, s)
				}
			}
		}
		if len(traced) == 0 {
			t.Fatalf("no span for the traced message among %d spans", len(spans.Ended()))
		}
		for _, s := range traced {
			if s.Parent().TraceID().String() != traceID || s.Parent().SpanID().String() != parentID ||
				s.SpanContext().TraceID().String() != traceID || s.SpanKind() != trace.SpanKindConsumer {
				t.Errorf("span %q: parent %s/%s, trace %s, kind %v; want the header's trace %s/%s, a consumer span", s.Name(),
					s.Parent().TraceID(), s.Parent().SpanID(), s.SpanContext().TraceID(), s.SpanKind(), traceID, parentID)
			}
		}
		tracedIDs := map[trace.SpanID]bool{}
		for _, s := range traced {
			tracedIDs[s.SpanContext().SpanID()] = true
		}
		for _, s := range spans.Ended() {
			if s.SpanContext().TraceID().String() == traceID && !tracedIDs[s.SpanContext().SpanID()] {
				t.Errorf("span %q of another message joined the traced message's trace", s.Name())
			}
		}
		if len(failed) < 3 {
			t.Errorf("%d spans for the refused message, want one per attempt", len(failed))
		}
		for _, s := range failed {
			if s.Status().Code != codes.Error {
				t.Errorf("a refused attempt's span has status %v", s.Status())
			}
		}
	})
}

// refusingValue is a handler that always refuses the messages whose value
// is bad and applies the others.
func refusingValue(seen *calls, bad string) inbox.Handler {
	apply := applier(seen)
	return func(tx *gorm.DB, m inbox.Message) error {
		if string(m.Value) == bad {
			return fmt.Errorf("refused %s", bad)
		}
		return apply(tx, m)
	}
}
