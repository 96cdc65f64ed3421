// Package kafka is the outbox's Sender for Apache Kafka, on IBM/sarama (the
// maintained continuation of github.com/Shopify/sarama, whose last release
// under that path was v1.38.1; the API is the same).
package kafka

import (
	"time"

	"github.com/IBM/sarama"
)

// NewConfig returns sarama's configuration for a producer that neither loses
// nor reorders messages on retry: idempotent, acknowledged by all in-sync
// replicas, one request in flight per broker, retried. Start from it and add
// TLS, SASL or a client id; NewSender keeps what you set.
func NewConfig() *sarama.Config {
	cfg := sarama.NewConfig()
	cfg.Version = sarama.V3_6_0_0
	cfg.ClientID = "gorm-outbox"
	cfg.Producer.Idempotent = true
	cfg.Producer.RequiredAcks = sarama.WaitForAll
	cfg.Net.MaxOpenRequests = 1
	cfg.Producer.Retry.Max = 5
	cfg.Producer.Retry.Backoff = 100 * time.Millisecond
	cfg.Producer.Return.Successes = true
	cfg.Producer.Return.Errors = true
	// The key is the aggregate id: same key, same partition, kept in order.
	cfg.Producer.Partitioner = sarama.NewHashPartitioner
	// Batches are already formed by the outbox; flushing at once keeps the
	// commit-to-broker latency low.
	cfg.Producer.Flush.Frequency = 0
	return cfg
}
