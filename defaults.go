package outbox

import "time"

// The defaults of the plugin's options (PluginOption) and of the
// publisher's (PublisherOption), all in one place. Each option's doc says
// which of them it replaces.
const (
	// DefaultTableName is the outbox table (WithTableName).
	DefaultTableName = "outbox_messages"

	// DefaultMaxPayloadBytes is the largest payload Enqueue accepts
	// (WithMaxPayloadBytes). It stays under Kafka's default maximum message
	// size (1 MiB, for sarama's Producer.MaxMessageBytes and the broker's
	// message.max.bytes) with room for the key and headers: a larger payload
	// would only be refused later by the broker, so it is refused at
	// enqueue, where the caller can still act on it.
	DefaultMaxPayloadBytes = 1_000_000

	// DefaultNotifyInterval is how often, at most, one process's enqueues
	// send a PostgreSQL NOTIFY (WithNotifyInterval).
	DefaultNotifyInterval = 5 * time.Millisecond

	// DefaultBatchSize is how many messages one claim takes (WithBatchSize).
	// With DefaultWorkers it is the configuration that drains fastest in the
	// benchmark (docs/performance.md); a smaller batch sends a trickle no
	// sooner, since a claim takes what is due, up to the batch.
	DefaultBatchSize = 500

	// DefaultWorkers is how many claim-send-record loops a publisher runs
	// (WithWorkers): they overlap the round trips to the database and the
	// broker. Each holds a connection during its claims: give the pool
	// DefaultWorkers + 2 idle connections (see the README).
	DefaultWorkers = 4

	// DefaultPollInterval is how long a publisher waits after finding less
	// than a full batch, unless woken (WithPollInterval).
	DefaultPollInterval = 100 * time.Millisecond

	// DefaultLease is how long a claim holds its messages (WithLease).
	DefaultLease = 30 * time.Second

	// DefaultMaxPause caps a publisher's backoff while the broker or the
	// database is unreachable, and so bounds how long after an outage it
	// resumes (WithMaxPause).
	DefaultMaxPause = 5 * time.Second

	// DefaultRetentionInterval is how often a publisher runs the retention
	// cleanup (WithRetention).
	DefaultRetentionInterval = 10 * time.Minute
)

// DefaultRetryPolicy is the backoff and attempt budget of failed messages
// (WithRetryPolicy); a zero field of a policy given to WithRetryPolicy takes
// its value from here.
var DefaultRetryPolicy = RetryPolicy{MaxAttempts: 10, MinBackoff: time.Second, MaxBackoff: 5 * time.Minute}

// DefaultRetention is the cleanup a publisher runs (WithRetention,
// WithoutRetention): published messages are deleted 7 days after they were
// published, dead ones are kept, 1000 rows a DELETE. A zero field of a
// policy given to WithRetention takes its value from here.
var DefaultRetention = RetentionPolicy{Published: 7 * 24 * time.Hour, BatchSize: 1000}
