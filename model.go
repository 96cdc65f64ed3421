package outbox

import "github.com/gorm-outbox/outbox/internal/core"

// State is where a message is in its life: pending until the broker has it,
// then published; dead once it has used up its attempts.
type State = core.State

const (
	// StatePending messages wait to be sent; a claimed message stays pending
	// (its NextAttemptAt is the end of the claim's lease) so that a publisher
	// that dies mid-batch hands its claim back simply by letting it expire.
	StatePending = core.StatePending
	// StatePublished messages were acknowledged by the broker.
	StatePublished = core.StatePublished
	// StateDead messages failed MaxAttempts times. They are kept, listed by
	// GormStore.List and sent again after GormStore.Requeue.
	StateDead = core.StateDead
)

// OutboxMessage is one row of the outbox table: an event written in the same
// transaction as the domain rows it describes, waiting to be relayed. Its
// ID is a UUIDv7, ordered by creation time and sent as the message-id
// header that consumers drop duplicates by.
//
// The GORM tags are the columns that Plugin migrates; DDL returns the same
// schema, with its indexes, as SQL for those who own their migrations.
type OutboxMessage = core.OutboxMessage

// Headers are a message's string headers, stored as a JSON object.
type Headers = core.Headers
