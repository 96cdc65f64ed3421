package outbox

import (
	"fmt"
	"regexp"
	"time"

	"github.com/gorm-outbox/outbox/internal/sqlstore"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"
)

// PluginOption configures the Plugin and the Store it creates: how events
// are written. How they are relayed is set by PublisherOption, given to
// NewPublisher; the two types keep the options of one out of the other.
type PluginOption func(*config)

type config struct {
	table           string
	migrate         bool
	encoder         Encoder
	maxPayloadBytes int
	allowNoTx       bool
	meterProvider   metric.MeterProvider
	tracerProvider  trace.TracerProvider
	telemetry       *telemetry
	notifyInterval  time.Duration
	deletePublished bool
}

func newConfig(opts []PluginOption) (config, error) {
	c := config{
		table:           DefaultTableName,
		migrate:         true,
		encoder:         JSONEncoder{},
		maxPayloadBytes: DefaultMaxPayloadBytes,
		notifyInterval:  DefaultNotifyInterval,
	}
	for i, o := range opts {
		if o == nil {
			return c, fmt.Errorf("outbox: plugin option %d of %d is nil", i+1, len(opts))
		}
		o(&c)
	}
	if err := validateTableName(c.table); err != nil {
		return c, err
	}
	if isNil(c.encoder) {
		return c, fmt.Errorf("outbox: encoder is nil (WithEncoder)")
	}
	if c.notifyInterval < 0 {
		return c, fmt.Errorf("outbox: notify interval must not be negative, got %v", c.notifyInterval)
	}
	if c.maxPayloadBytes <= 0 {
		return c, fmt.Errorf("outbox: maximum payload size must be positive, got %d", c.maxPayloadBytes)
	}
	c.telemetry = newTelemetry(c.meterProvider, c.tracerProvider)
	return c, nil
}

// WithTableName sets the outbox table's name. Defaults to DefaultTableName.
// It must be a plain SQL identifier, optionally schema-qualified
// ("events.outbox"), because it is spliced into SQL.
func WithTableName(name string) PluginOption { return func(c *config) { c.table = name } }

// WithoutMigration stops Plugin from creating or altering the table, for
// applications that own their migrations (see DDL).
func WithoutMigration() PluginOption { return func(c *config) { c.migrate = false } }

// WithEncoder replaces the JSON encoder used for payloads that are neither
// []byte nor string.
func WithEncoder(e Encoder) PluginOption { return func(c *config) { c.encoder = e } }

// WithMaxPayloadBytes refuses, at enqueue, payloads larger than n bytes
// (defaults to DefaultMaxPayloadBytes). Keep it at or below the producer's and the
// topic's maximum message size.
func WithMaxPayloadBytes(n int) PluginOption { return func(c *config) { c.maxPayloadBytes = n } }

// AllowWithoutTransaction lets Enqueue write outside a transaction
// (SkipDefaultTransaction, or a plain *gorm.DB). The event is then no longer
// atomic with the domain rows: a crash between the two writes loses one of them.
func AllowWithoutTransaction() PluginOption { return func(c *config) { c.allowNoTx = true } }

// WithMeterProvider records the outbox's metrics (enqueue, and the
// publishers of this db) with mp instead of OpenTelemetry's global provider.
func WithMeterProvider(mp metric.MeterProvider) PluginOption {
	return func(c *config) { c.meterProvider = mp }
}

// WithTracerProvider makes the publisher's send spans with tp instead of
// OpenTelemetry's global provider.
func WithTracerProvider(tp trace.TracerProvider) PluginOption {
	return func(c *config) { c.tracerProvider = tp }
}

// WithDeleteOnPublish makes the store delete each message once the broker
// has acknowledged it, instead of keeping it as published until retention
// removes it. The table then holds only what is still to be sent and the
// dead messages. A delete is the cheapest write a message can end with
// (an UPDATE to published writes a new row version and its index entries),
// so draining is faster; the price is the table's record of what was sent
// and when, which Kafka then holds alone. What has not been delivered is
// kept exactly as without it.
func WithDeleteOnPublish() PluginOption { return func(c *config) { c.deletePublished = true } }

// maxIdentifier is the longest name PostgreSQL and MySQL keep whole.
const maxIdentifier = 63

var identifier = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$`)

func validateTableName(name string) error {
	if name == "" {
		return fmt.Errorf("outbox: table name is empty")
	}
	if !identifier.MatchString(name) {
		return fmt.Errorf("outbox: table name %q is not a plain SQL identifier (letters, digits and _, optionally schema.table)", name)
	}
	// PostgreSQL cuts names at 63 bytes, and two index names cut to the
	// same one would leave the table without the second index.
	if longest := sqlstore.IndexName(name, "published"); len(longest) > maxIdentifier {
		return fmt.Errorf("outbox: table name %q is %d characters long; at most %d, so that its index names (such as %s) fit in %d",
			name, len(name), len(name)-(len(longest)-maxIdentifier), longest, maxIdentifier)
	}
	return nil
}
