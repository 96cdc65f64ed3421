package outbox

import (
	"context"
	"errors"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
)

// instrumentationName names the outbox's meter and tracer.
const instrumentationName = "github.com/gorm-outbox/outbox"

// Attribute keys from OpenTelemetry's messaging conventions.
const (
	attrDestination = attribute.Key("messaging.destination.name")
	attrSystem      = attribute.Key("messaging.system")
	attrOperation   = attribute.Key("messaging.operation.name")
	attrBatchCount  = attribute.Key("messaging.batch.message_count")
	attrErrorType   = attribute.Key("error.type")
	attrOutageCause = attribute.Key("outbox.outage.cause")
	attrTxnOutcome  = attribute.Key("outbox.transaction.outcome")
)

// traceContext is the W3C propagator: traceparent and tracestate headers,
// whatever global propagator the application set, because consumers of
// Kafka headers expect exactly these.
var traceContext = propagation.TraceContext{}

// telemetry holds every instrument of the outbox. With no meter or tracer
// provider configured, OpenTelemetry's globals are no-ops and recording
// costs a few nanoseconds.
type telemetry struct {
	tracer         trace.Tracer
	meter          metric.Meter
	enqueued       metric.Int64Counter
	published      metric.Int64Counter
	failed         metric.Int64Counter
	dead           metric.Int64Counter
	sendDuration   metric.Float64Histogram
	publishLatency metric.Float64Histogram
	batchSize      metric.Int64Histogram
	pending        metric.Int64ObservableGauge
	oldestPending  metric.Float64ObservableGauge
	deadNow        metric.Int64ObservableGauge
	paused         metric.Int64UpDownCounter
	transactions   metric.Int64Counter
}

func newTelemetry(mp metric.MeterProvider, tp trace.TracerProvider) *telemetry {
	if mp == nil {
		mp = otel.GetMeterProvider()
	}
	if tp == nil {
		tp = otel.GetTracerProvider()
	}
	m := mp.Meter(instrumentationName)
	t := &telemetry{tracer: tp.Tracer(instrumentationName), meter: m}
	// Instrument creation fails only on an invalid name; ours are constants.
	t.enqueued, _ = m.Int64Counter("outbox.messages.enqueued", metric.WithUnit("{message}"),
		metric.WithDescription("Messages written to the outbox by committed or pending transactions."))
	t.published, _ = m.Int64Counter("outbox.messages.published", metric.WithUnit("{message}"),
		metric.WithDescription("Messages acknowledged by the broker and marked published."))
	t.failed, _ = m.Int64Counter("outbox.messages.failed", metric.WithUnit("{message}"),
		metric.WithDescription("Failed send attempts that counted against a message."))
	t.dead, _ = m.Int64Counter("outbox.messages.dead", metric.WithUnit("{message}"),
		metric.WithDescription("Messages that used their last attempt."))
	t.sendDuration, _ = m.Float64Histogram("messaging.client.operation.duration", metric.WithUnit("s"),
		metric.WithDescription("Duration of one batch's send to the broker."))
	t.publishLatency, _ = m.Float64Histogram("outbox.messages.publish.latency", metric.WithUnit("s"),
		metric.WithDescription("Time from enqueue to the broker's acknowledgement."))
	t.batchSize, _ = m.Int64Histogram("outbox.batch.size", metric.WithUnit("{message}"),
		metric.WithDescription("Messages per claimed batch."))
	t.pending, _ = m.Int64ObservableGauge("outbox.messages.pending", metric.WithUnit("{message}"),
		metric.WithDescription("Messages waiting to be published (the backlog)."))
	t.oldestPending, _ = m.Float64ObservableGauge("outbox.messages.oldest_pending.age", metric.WithUnit("s"),
		metric.WithDescription("Age of the oldest pending message: alert when it grows."))
	t.deadNow, _ = m.Int64ObservableGauge("outbox.messages.dead.current", metric.WithUnit("{message}"),
		metric.WithDescription("Dead messages in the table, waiting for a requeue."))
	t.paused, _ = m.Int64UpDownCounter("outbox.publisher.paused", metric.WithUnit("{publisher}"),
		metric.WithDescription("Publishers paused because the broker or the database is unreachable, by outbox.outage.cause (broker, database)."))
	t.transactions, _ = m.Int64Counter("outbox.transactions", metric.WithUnit("{transaction}"),
		metric.WithDescription("Broker transactions of exactly-once mode, by outbox.transaction.outcome: committed, aborted, in_doubt, fenced, and settled_commits or settled_aborts for one settled from its marker after its outcome was unknown."))
	return t
}

// noteTransaction counts one broker transaction of exactly-once mode by its outcome.
func (t *telemetry) noteTransaction(outcome string) {
	t.transactions.Add(context.Background(), 1, metric.WithAttributes(attrTxnOutcome.String(outcome)))
}

// notePaused counts a publisher into (delta 1) or out of (-1) an outage of cause.
func (t *telemetry) notePaused(cause string, delta int64) {
	t.paused.Add(context.Background(), delta, metric.WithAttributes(attrOutageCause.String(cause)))
}

// observeStore reports the table's backlog gauges from stats, read at each
// collection (one query), until the returned registration is unregistered.
func (t *telemetry) observeStore(stats func(context.Context) (Stats, error)) (metric.Registration, error) {
	return t.meter.RegisterCallback(func(ctx context.Context, o metric.Observer) error {
		st, err := stats(ctx)
		if err != nil {
			return err
		}
		o.ObserveInt64(t.pending, st.Counts[StatePending])
		o.ObserveFloat64(t.oldestPending, st.OldestPendingAge.Seconds())
		o.ObserveInt64(t.deadNow, st.Counts[StateDead])
		return nil
	}, t.pending, t.oldestPending, t.deadNow)
}

func destination(topic string) metric.MeasurementOption {
	return metric.WithAttributes(attrDestination.String(topic))
}

// injectTrace stores the trace context active in ctx in the message's
// headers, so that it travels to Kafka as traceparent and tracestate.
func injectTrace(ctx context.Context, h Headers) {
	if ctx == nil || !trace.SpanContextFromContext(ctx).IsValid() {
		return
	}
	traceContext.Inject(ctx, propagation.MapCarrier(h))
}

// startSend opens the span of one batch's send, linked to the trace of
// each message that carries one.
func (t *telemetry) startSend(ctx context.Context, system string, msgs []*OutboxMessage) (context.Context, trace.Span) {
	ctx, span := t.tracer.Start(ctx, "outbox send", trace.WithSpanKind(trace.SpanKindProducer))
	if span.IsRecording() { // building attributes and links costs; a no-op span needs none
		span.SetAttributes(attrOperation.String("send"), attrSystem.String(system), attrBatchCount.Int(len(msgs)))
		for _, m := range msgs {
			if _, ok := m.Headers["traceparent"]; !ok {
				continue
			}
			mctx := traceContext.Extract(context.Background(), propagation.MapCarrier(m.Headers))
			if sc := trace.SpanContextFromContext(mctx); sc.IsValid() {
				span.AddLink(trace.Link{SpanContext: sc, Attributes: []attribute.KeyValue{attribute.String("outbox.message.id", m.ID.String())}})
			}
		}
	}
	return ctx, span
}

// recordBatch records a batch's outcome in the metrics and its span.
func (t *telemetry) recordBatch(ctx context.Context, span trace.Span, started, now time.Time, msgs []*OutboxMessage, errs []error, deadIDs map[string]bool) {
	defer span.End()
	if !t.published.Enabled(ctx) {
		// No meter provider: skip the per-message attributes, which cost
		// allocations even when nothing records them.
		for _, err := range errs {
			if err != nil && !isUnavailable(err) && !errors.Is(err, ErrHeldBack) {
				span.SetStatus(codes.Error, "some messages were refused")
				break
			}
		}
		return
	}
	t.sendDuration.Record(ctx, now.Sub(started).Seconds(), metric.WithAttributes(attrOperation.String("send")))
	t.batchSize.Record(ctx, int64(len(msgs)))
	failures := 0
	for i, m := range msgs {
		switch err := errs[i]; {
		case err == nil:
			t.published.Add(ctx, 1, destination(m.Topic))
			t.publishLatency.Record(ctx, now.Sub(m.CreatedAt).Seconds(), destination(m.Topic))
		case isUnavailable(err) || errors.Is(err, ErrHeldBack):
		default:
			failures++
			t.failed.Add(ctx, 1, metric.WithAttributes(attrDestination.String(m.Topic), attrErrorType.String("refused")))
			if deadIDs[m.ID.String()] {
				t.dead.Add(ctx, 1, destination(m.Topic))
			}
		}
	}
	if failures > 0 {
		span.SetStatus(codes.Error, "some messages were refused")
	}
}
