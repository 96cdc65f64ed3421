// Package core holds the types that the outbox package, its store engine
// and its database packages share: the message as a row, and what a claim
// and its results carry. Package outbox re-exports each of them.
package core

import (
	"database/sql/driver"
	"encoding/json"
	"errors"
	"fmt"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"
)

// State is where a message is in its life: pending until the broker has it,
// then published; dead once it has used up its attempts.
type State string

const (
	// StatePending messages wait to be sent; a claimed message stays pending
	// (its NextAttemptAt is the end of the claim's lease) so that a publisher
	// that dies mid-batch hands its claim back simply by letting it expire.
	StatePending State = "pending"
	// StatePublished messages were acknowledged by the broker.
	StatePublished State = "published"
	// StateDead messages failed MaxAttempts times. They are kept, listed by
	// the store's List and sent again after its Requeue.
	StateDead State = "dead"
)

// OutboxMessage is one row of the outbox table: an event written in the same
// transaction as the domain rows it describes, waiting to be relayed.
//
// The GORM tags are the columns that the plugin migrates; the indexes, which
// differ by database, belong to each database's package, and outbox.DDL
// returns the same schema as SQL for those who own their migrations.
type OutboxMessage struct {
	// ID is a UUIDv7: unique, and ordered by creation time, so that ordering
	// by ID is ordering by enqueue time. It is also sent as the
	// message-id header that consumers use to drop duplicates.
	ID uuid.UUID `gorm:"type:uuid;primaryKey;not null"`
	// Topic is the destination (a Kafka topic).
	Topic string `gorm:"size:249;not null"`
	// Key decides the partition: messages with the same key keep their order.
	Key     string  `gorm:"column:message_key;size:255;not null;default:''"`
	Payload []byte  `gorm:"not null"`
	Headers Headers `gorm:"type:text;not null;default:'{}'"`
	State   State   `gorm:"size:16;not null;default:'pending'"`
	// Attempts counts failed sends.
	Attempts  int    `gorm:"not null;default:0"`
	LastError string `gorm:"type:text;not null;default:''"`
	// NextAttemptAt is when a pending message may next be claimed: its
	// enqueue time, then the end of a claim's lease, then a retry's backoff.
	NextAttemptAt time.Time `gorm:"not null"`
	// ClaimToken identifies the claim that currently holds the message; a
	// publisher writes a result only while the token is still its own.
	ClaimToken  *string    `gorm:"size:36"`
	CreatedAt   time.Time  `gorm:"not null"`
	PublishedAt *time.Time ``
	// TxGroup ties the messages one database transaction enqueued: each
	// of them but the first holds the first's ID; nil on the first, and on
	// a message its transaction enqueued alone. Exactly-once mode delivers
	// a group in one Kafka transaction.
	TxGroup *uuid.UUID `gorm:"type:uuid"`
}

// Value implements driver.Valuer, so that every database driver sees a plain string.
func (s State) Value() (driver.Value, error) { return string(s), nil }

// Headers are a message's string headers, stored as a JSON object.
type Headers map[string]string

// Value implements driver.Valuer. It refuses text that is not UTF-8, which
// JSON would silently replace with U+FFFD.
func (h Headers) Value() (driver.Value, error) {
	if len(h) == 0 {
		return "{}", nil
	}
	for k, v := range h {
		if !utf8.ValidString(k) || !utf8.ValidString(v) {
			return nil, fmt.Errorf("outbox: header %q=%q is not valid UTF-8", k, v)
		}
	}
	b, err := json.Marshal(map[string]string(h))
	return string(b), err
}

// Scan implements sql.Scanner.
func (h *Headers) Scan(src any) error {
	if h == nil {
		return errors.New("outbox: Scan into a nil *Headers")
	}
	var b []byte
	switch v := src.(type) {
	case nil:
		*h = nil
		return nil
	case string:
		b = []byte(v)
	case []byte:
		b = v
	default:
		return fmt.Errorf("outbox: cannot scan %T into Headers", src)
	}
	m := map[string]string{}
	if string(b) == "{}" { // most messages: no JSON decoder for them
		*h = m
		return nil
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return errors.Join(errors.New("outbox: headers column is not a JSON object of strings"), err)
	}
	*h = m
	return nil
}
