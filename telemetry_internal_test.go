package outbox

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/google/uuid"
)

// BenchmarkTelemetryWithoutProvider measures what the instruments cost a
// batch of 100 when no meter or tracer provider is configured (the no-op).
func BenchmarkTelemetryWithoutProvider(b *testing.B) {
	t := newTelemetry(nil, nil)
	msgs := make([]*OutboxMessage, 100)
	errs := make([]error, 100)
	for i := range msgs {
		msgs[i] = &OutboxMessage{ID: uuid.New(), Topic: "t", CreatedAt: time.Now(), Headers: Headers{}}
		if i%10 == 0 {
			errs[i] = errors.New("refused")
		}
	}
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		_, span := t.startSend(ctx, "kafka", msgs)
		t.recordBatch(ctx, span, time.Now(), time.Now(), msgs, errs, nil)
	}
}

// BenchmarkEnqueueTelemetryWithoutProvider is the enqueue side: the
// counter's check and the trace injection, for a context without a span.
func BenchmarkEnqueueTelemetryWithoutProvider(b *testing.B) {
	t := newTelemetry(nil, nil)
	ctx := context.Background()
	h := Headers{}
	b.ReportAllocs()
	for b.Loop() {
		injectTrace(ctx, h)
		if t.enqueued.Enabled(ctx) {
			t.enqueued.Add(ctx, 1, destination("t"))
		}
	}
}
