package outbox

import (
	"context"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"
)

// Message is an event to enqueue: where it goes, how it is keyed, and what
// it carries.
type Message struct {
	// Topic is the Kafka topic; required.
	Topic string
	// Key becomes the Kafka message key: messages with the same key land on
	// the same partition. Use the aggregate's id.
	Key string
	// Payload is sent as is when it is []byte or string, and encoded by the
	// configured Encoder (JSON by default) otherwise.
	Payload any
	// Headers become Kafka headers.
	Headers map[string]string
}

// maxTopicLength is Kafka's limit on a topic name.
const maxTopicLength = 249

// maxKeyLength is the key column's size (an indexed varchar on MySQL).
const maxKeyLength = 255

// validateTopic applies Kafka's own rules, so that a message the broker would
// refuse forever is refused while the caller's transaction can still roll back.
func validateTopic(topic string) error {
	if topic == "" {
		return fmt.Errorf("outbox: topic is empty")
	}
	if len(topic) > maxTopicLength {
		return fmt.Errorf("outbox: topic %.40q... is %d characters long; Kafka allows at most %d", topic, len(topic), maxTopicLength)
	}
	if topic == "." || topic == ".." {
		return fmt.Errorf("outbox: topic %q is not allowed by Kafka", topic)
	}
	for _, r := range topic {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-') {
			return fmt.Errorf("outbox: topic %q has the character %q; Kafka allows only [a-zA-Z0-9._-]", topic, r)
		}
	}
	return nil
}

// toRow validates m and turns it into the row that will be inserted.
func (c *config) toRow(ctx context.Context, m Message, now time.Time) (*OutboxMessage, error) {
	if err := validateTopic(m.Topic); err != nil {
		return nil, err
	}
	if len(m.Key) > maxKeyLength {
		return nil, fmt.Errorf("outbox: key for topic %q is %d bytes long; at most %d", m.Topic, len(m.Key), maxKeyLength)
	}
	// The key is a text column: PostgreSQL refuses such bytes (aborting the
	// caller's transaction), MariaDB alters them, SQLite keeps them.
	if !utf8.ValidString(m.Key) || strings.ContainsRune(m.Key, 0) {
		return nil, fmt.Errorf("outbox: key %q for topic %q is not valid UTF-8 text without NUL bytes", m.Key, m.Topic)
	}
	for k, v := range m.Headers {
		if k == "" {
			return nil, fmt.Errorf("outbox: message for topic %q has a header with an empty key", m.Topic)
		}
		// Headers are stored as JSON text, which cannot hold other bytes.
		if !utf8.ValidString(k) || !utf8.ValidString(v) {
			return nil, fmt.Errorf("outbox: message for topic %q has header %q, which is not valid UTF-8", m.Topic, k)
		}
	}
	payload, err := c.encode(m.Payload)
	if err != nil {
		return nil, fmt.Errorf("outbox: cannot encode payload of type %T for topic %q: %w", m.Payload, m.Topic, err)
	}
	if len(payload) > c.maxPayloadBytes {
		return nil, fmt.Errorf("outbox: payload for topic %q is %d bytes, over the maximum of %d", m.Topic, len(payload), c.maxPayloadBytes)
	}
	id, err := uuid.NewV7()
	if err != nil {
		return nil, fmt.Errorf("outbox: cannot generate message id: %w", err)
	}
	headers := make(Headers, len(m.Headers))
	for k, v := range m.Headers {
		headers[k] = v
	}
	injectTrace(ctx, headers)
	return &OutboxMessage{
		ID:            id,
		Topic:         m.Topic,
		Key:           m.Key,
		Payload:       payload,
		Headers:       headers,
		State:         StatePending,
		NextAttemptAt: now,
		CreatedAt:     now,
	}, nil
}

func (c *config) encode(p any) ([]byte, error) {
	switch v := p.(type) {
	case []byte:
		if v == nil {
			return []byte{}, nil
		}
		return v, nil
	case string:
		return []byte(v), nil
	case nil:
		return nil, fmt.Errorf("payload is nil")
	}
	return c.encoder.Encode(p)
}
