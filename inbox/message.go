package inbox

import (
	"crypto/sha256"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/IBM/sarama"
	"gorm.io/gorm"
)

// MessageIDHeader is the header whose value identifies a message: the
// outbox's publisher sets it to the outbox row's id, so that the same event
// sent twice is recognised. Messages without it are identified by their
// place in Kafka (topic, partition, offset).
const MessageIDHeader = "outbox-message-id"

// Message is one Kafka record, as the handler receives it.
type Message struct {
	// ID identifies the message in the inbox: the outbox-message-id
	// header, or "topic/partition/offset" without one.
	ID        string
	Topic     string
	Partition int32
	Offset    int64
	Key       []byte
	Value     []byte
	Headers   map[string]string
	Timestamp time.Time
	// Attempt is 1 on the first try of the handler, 2 on the second...
	Attempt int
}

// Handler applies one message on tx, the transaction that also records the
// message as applied: its writes and the record commit together, or neither
// does. It may call outbox.Enqueue on tx, so that the events the message
// causes are sent if and only if it was applied. Returning an error (or
// panicking) rolls tx back; the message is then tried again (see
// WithRetryPolicy). tx's context (tx.Statement.Context) carries the
// message's span and ends when the consumer stops.
type Handler func(tx *gorm.DB, m Message) error

// maxID is the longest id the inbox table keeps.
const maxID = 255

// usableID reports whether a header's id can be the message's record:
// what another producer wrote there may be too long, or not text.
func usableID(id string) bool {
	return id != "" && len(id) <= maxID && utf8.ValidString(id) && !strings.ContainsRune(id, 0)
}

func fromKafka(r *sarama.ConsumerMessage) Message {
	m := Message{Topic: r.Topic, Partition: r.Partition, Offset: r.Offset, Key: r.Key, Value: r.Value, Timestamp: r.Timestamp}
	if len(r.Headers) > 0 {
		m.Headers = make(map[string]string, len(r.Headers))
		for _, h := range r.Headers {
			if h != nil {
				m.Headers[string(h.Key)] = string(h.Value)
			}
		}
	}
	m.ID = m.Headers[MessageIDHeader]
	if !usableID(m.ID) {
		m.ID = fmt.Sprintf("%s/%d/%d", m.Topic, m.Partition, m.Offset)
		if len(m.ID) > maxID { // a topic name near Kafka's 249 characters
			sum := sha256.Sum256([]byte(m.ID))
			m.ID = fmt.Sprintf("sha256:%x/%d/%d", sum[:16], m.Partition, m.Offset)
		}
	}
	return m
}
