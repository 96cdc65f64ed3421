package inbox

import (
	"fmt"
	"log/slog"
	"time"

	"github.com/IBM/sarama"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"

	"github.com/gorm-outbox/outbox"
)

// Defaults of the Consumer's options.
const (
	DefaultBatchSize = 100
	// DefaultRetention outlasts a record's life in Kafka's default
	// configuration: a segment is deleted once its newest record is older
	// than log.retention.hours (168), and a segment rolls after
	// log.roll.hours (168), so a record can be read for up to 14 days.
	DefaultRetention          = 15 * 24 * time.Hour
	DefaultRetentionInterval  = time.Minute
	DefaultRetryCheckInterval = 5 * time.Second
)

// DefaultRetryPolicy is how a failing handler is retried unless
// WithRetryPolicy says otherwise: 5 attempts, waiting 100 ms, then 200 ms...
// up to 10 s between them, before the message is parked.
var DefaultRetryPolicy = outbox.RetryPolicy{MaxAttempts: 5, MinBackoff: 100 * time.Millisecond, MaxBackoff: 10 * time.Second}

// Option configures a Consumer.
type Option func(*config)

type config struct {
	sarama             *sarama.Config
	batchSize          int
	keyLanes           int
	retry              outbox.RetryPolicy
	keyPolicy          outbox.KeyPolicy
	retention          time.Duration
	retentionInterval  time.Duration
	retryCheckInterval time.Duration
	logger             *slog.Logger
	meterProvider      metric.MeterProvider
	tracerProvider     trace.TracerProvider
	handler            Handler // or batchHandler
	batchHandler       BatchHandler
}

// WithSaramaConfig starts from cfg (TLS, SASL, version, client id, the
// initial offset of a new group...) instead of sarama.NewConfig(). The
// consumer sets what its guarantees need: offsets are marked only after
// the database commit, auto-committed from the marks, and read with
// read_committed isolation. cfg is copied.
func WithSaramaConfig(cfg *sarama.Config) Option { return func(c *config) { c.sarama = cfg } }

// WithBatchSize applies up to n messages of a partition, those already
// fetched, in one database transaction. Defaults to DefaultBatchSize.
func WithBatchSize(n int) Option { return func(c *config) { c.batchSize = n } }

// WithKeyParallelism applies the messages of one partition in n
// transactions at once, each key always in the same one, so that a key's
// messages keep their order. Defaults to 1: a partition in order.
func WithKeyParallelism(n int) Option { return func(c *config) { c.keyLanes = n } }

// WithRetryPolicy sets how many times a failing handler is tried on a
// message, and the waits between, before the message is parked. Zero
// fields take DefaultRetryPolicy's.
func WithRetryPolicy(r outbox.RetryPolicy) Option { return func(c *config) { c.retry = r } }

// WithKeyPolicy says what a parked message does to the later messages of
// its key. outbox.KeyWait (the default) holds them, recorded unapplied,
// until the parked message is retried and applied, keeping the key's
// order; outbox.KeySkip applies them. Messages without a key hold nothing.
func WithKeyPolicy(k outbox.KeyPolicy) Option { return func(c *config) { c.keyPolicy = k } }

// WithRetention keeps the identities of applied messages for window (so
// that a redelivery within it is recognised), then deletes them, in
// batches, every interval. Defaults to DefaultRetention and
// DefaultRetentionInterval; keep window above the topics' retention.
// Parked and held messages are never deleted by retention.
func WithRetention(window, interval time.Duration) Option {
	return func(c *config) { c.retention, c.retentionInterval = window, interval }
}

// WithoutRetention keeps every applied message's identity.
func WithoutRetention() Option { return func(c *config) { c.retention = 0 } }

// WithRetryCheckInterval sets how often each partition looks for parked
// messages that the admin command asked to retry. Defaults to
// DefaultRetryCheckInterval.
func WithRetryCheckInterval(d time.Duration) Option {
	return func(c *config) { c.retryCheckInterval = d }
}

// WithLogger logs with l instead of slog.Default().
func WithLogger(l *slog.Logger) Option { return func(c *config) { c.logger = l } }

// WithMeterProvider records the consumer's metrics with mp instead of
// OpenTelemetry's global provider.
func WithMeterProvider(mp metric.MeterProvider) Option {
	return func(c *config) { c.meterProvider = mp }
}

// WithTracerProvider makes the per-message spans with tp instead of
// OpenTelemetry's global provider.
func WithTracerProvider(tp trace.TracerProvider) Option {
	return func(c *config) { c.tracerProvider = tp }
}

func newConfig(opts []Option) (config, error) {
	c := config{batchSize: DefaultBatchSize, keyLanes: 1, retry: DefaultRetryPolicy, retention: DefaultRetention,
		retentionInterval: DefaultRetentionInterval, retryCheckInterval: DefaultRetryCheckInterval}
	for i, o := range opts {
		if o == nil {
			return c, fmt.Errorf("inbox: option %d of %d is nil", i+1, len(opts))
		}
		o(&c)
	}
	switch {
	case c.batchSize <= 0:
		return c, fmt.Errorf("inbox: batch size must be positive, got %d", c.batchSize)
	case c.keyLanes <= 0:
		return c, fmt.Errorf("inbox: key parallelism must be positive, got %d", c.keyLanes)
	case c.retention < 0:
		return c, fmt.Errorf("inbox: retention must not be negative, got %v", c.retention)
	case c.retention > 0 && c.retentionInterval <= 0:
		return c, fmt.Errorf("inbox: retention interval must be positive, got %v", c.retentionInterval)
	case c.retryCheckInterval <= 0:
		return c, fmt.Errorf("inbox: retry check interval must be positive, got %v", c.retryCheckInterval)
	case c.keyPolicy != outbox.KeyWait && c.keyPolicy != outbox.KeySkip:
		return c, fmt.Errorf("inbox: unknown key policy %d", c.keyPolicy)
	case c.retry.MaxAttempts < 0 || c.retry.MinBackoff < 0 || c.retry.MaxBackoff < 0:
		return c, fmt.Errorf("inbox: retry policy fields must not be negative, got %+v", c.retry)
	}
	if c.retry.MaxAttempts == 0 {
		c.retry.MaxAttempts = DefaultRetryPolicy.MaxAttempts
	}
	if c.retry.MinBackoff == 0 {
		c.retry.MinBackoff = DefaultRetryPolicy.MinBackoff
	}
	if c.retry.MaxBackoff == 0 {
		c.retry.MaxBackoff = max(DefaultRetryPolicy.MaxBackoff, c.retry.MinBackoff)
	}
	if c.logger == nil {
		c.logger = slog.Default()
	}
	base := sarama.NewConfig()
	base.Version = sarama.V3_6_0_0
	base.Consumer.Offsets.Initial = sarama.OffsetOldest
	if c.sarama != nil {
		copied := *c.sarama
		base = &copied
	}
	for _, s := range base.Consumer.Group.Rebalance.GroupStrategies {
		if s != nil && s.Name() == sarama.CooperativeStickyBalanceStrategyName {
			// A cooperative revoke closes the claim's channel without
			// ending its context, which a paused or retrying partition would
			// not see until the rebalance timed out.
			return c, fmt.Errorf("inbox: the cooperative-sticky rebalance strategy is not supported; use range, round robin or sticky")
		}
	}
	base.Consumer.Offsets.AutoCommit.Enable = true
	if base.Consumer.Offsets.AutoCommit.Interval <= 0 {
		base.Consumer.Offsets.AutoCommit.Interval = time.Second
	}
	base.Consumer.IsolationLevel = sarama.ReadCommitted
	base.Consumer.Return.Errors = true
	if err := base.Validate(); err != nil {
		return c, fmt.Errorf("inbox: the sarama configuration is invalid: %w", err)
	}
	c.sarama = base
	return c, nil
}
