package inbox

import (
	"context"
	"sync"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
)

const instrumentationName = "github.com/gorm-outbox/outbox/inbox"

// Attribute keys from OpenTelemetry's messaging conventions.
const (
	attrDestination = attribute.Key("messaging.destination.name")
	attrPartition   = attribute.Key("messaging.destination.partition.id")
	attrGroup       = attribute.Key("messaging.consumer.group.name")
	attrSystem      = attribute.Key("messaging.system")
	attrOperation   = attribute.Key("messaging.operation.name")
	attrMessageID   = attribute.Key("messaging.message.id")
	attrOffset      = attribute.Key("messaging.kafka.offset")
)

// traceContext reads the W3C traceparent and tracestate headers that the
// outbox's publisher writes.
var traceContext = propagation.TraceContext{}

type partitionKey struct {
	topic     string
	partition int32
}

// telemetry holds the consumer's instruments.
type telemetry struct {
	tracer                                       trace.Tracer
	meter                                        metric.Meter
	consumedC, appliedC, skippedC, heldC, failed metric.Int64Counter
	parkedC                                      metric.Int64Counter
	lagG                                         metric.Int64ObservableGauge

	mu  sync.Mutex
	lag map[partitionKey]int64
}

func newTelemetry(mp metric.MeterProvider, tp trace.TracerProvider) *telemetry {
	if mp == nil {
		mp = otel.GetMeterProvider()
	}
	if tp == nil {
		tp = otel.GetTracerProvider()
	}
	m := mp.Meter(instrumentationName)
	t := &telemetry{tracer: tp.Tracer(instrumentationName), meter: m, lag: map[partitionKey]int64{}}
	// Instrument creation fails only on an invalid name; ours are constants.
	t.consumedC, _ = m.Int64Counter("inbox.messages.consumed", metric.WithUnit("{message}"),
		metric.WithDescription("Messages received from Kafka, redeliveries included."))
	t.appliedC, _ = m.Int64Counter("inbox.messages.applied", metric.WithUnit("{message}"),
		metric.WithDescription("Messages whose handler's transaction committed."))
	t.skippedC, _ = m.Int64Counter("inbox.messages.duplicates", metric.WithUnit("{message}"),
		metric.WithDescription("Messages skipped without calling the handler: already recorded (redelivered or sent twice)."))
	t.heldC, _ = m.Int64Counter("inbox.messages.held", metric.WithUnit("{message}"),
		metric.WithDescription("Messages recorded unapplied behind a parked message of their key."))
	t.failed, _ = m.Int64Counter("inbox.handler.failures", metric.WithUnit("{attempt}"),
		metric.WithDescription("Handler attempts that failed or panicked."))
	t.parkedC, _ = m.Int64Counter("inbox.messages.parked", metric.WithUnit("{message}"),
		metric.WithDescription("Messages parked after their last attempt, waiting for a retry from the admin command."))
	t.lagG, _ = m.Int64ObservableGauge("inbox.consumer.lag", metric.WithUnit("{message}"),
		metric.WithDescription("Messages of a partition not yet applied: the high water mark minus the next offset."))
	return t
}

func topicAttr(topic string) metric.MeasurementOption {
	return metric.WithAttributes(attrDestination.String(topic))
}

func (t *telemetry) consumed(ctx context.Context, topic string, n int) {
	t.consumedC.Add(ctx, int64(n), topicAttr(topic))
}

func (t *telemetry) settled(ctx context.Context, topic string, applied, skipped, held int) {
	if applied > 0 {
		t.appliedC.Add(ctx, int64(applied), topicAttr(topic))
	}
	if skipped > 0 {
		t.skippedC.Add(ctx, int64(skipped), topicAttr(topic))
	}
	if held > 0 {
		t.heldC.Add(ctx, int64(held), topicAttr(topic))
	}
}

func (t *telemetry) failedOnce(ctx context.Context, topic string) {
	t.failed.Add(ctx, 1, topicAttr(topic))
}
func (t *telemetry) parked(ctx context.Context, topic string) {
	t.parkedC.Add(ctx, 1, topicAttr(topic))
}

func (t *telemetry) noteLag(topic string, partition int32, lag int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.lag[partitionKey{topic, partition}] = max(lag, 0)
}

func (t *telemetry) forgetLag(topic string, partition int32) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.lag, partitionKey{topic, partition})
}

// observeLag reports the lag of the partitions this consumer holds.
func (t *telemetry) observeLag() (metric.Registration, error) {
	return t.meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		t.mu.Lock()
		defer t.mu.Unlock()
		for k, lag := range t.lag {
			o.ObserveInt64(t.lagG, lag, metric.WithAttributes(attrDestination.String(k.topic), attrPartition.Int(int(k.partition))))
		}
		return nil
	}, t.lagG)
}

// startSpans starts a span per message, each continuing the trace its
// traceparent header carries, and returns the context the handler runs in
// (the span's, for one message) and what ends them.
func (t *telemetry) startSpans(ctx context.Context, group string, ms []Message) (context.Context, func(error)) {
	spans := make([]trace.Span, len(ms))
	out := ctx
	for i, m := range ms {
		parent := ctx
		if m.Headers["traceparent"] != "" {
			parent = traceContext.Extract(ctx, propagation.MapCarrier(m.Headers))
		}
		sctx, span := t.tracer.Start(parent, "process "+m.Topic, trace.WithSpanKind(trace.SpanKindConsumer),
			trace.WithAttributes(attrSystem.String("kafka"), attrOperation.String("process"),
				attrDestination.String(m.Topic), attrPartition.Int(int(m.Partition)), attrOffset.Int64(m.Offset),
				attrMessageID.String(m.ID), attrGroup.String(group)))
		spans[i] = span
		if len(ms) == 1 {
			out = sctx
		}
	}
	return out, func(err error) {
		for _, s := range spans {
			if err != nil {
				s.RecordError(err)
				s.SetStatus(codes.Error, err.Error())
			}
			s.End()
		}
	}
}
