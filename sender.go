package outbox

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/google/uuid"
)

// Sender delivers a batch of messages to a broker. The kafka package has
// the one for Kafka; another broker needs only this method.
//
// Send returns nil when the broker acknowledged every message. When only
// some failed it returns a *SendError naming them: the others are marked
// published. Any other error fails the whole batch. An error that wraps
// ErrBrokerUnavailable (alone, or for a message in a SendError) says the
// broker could not be reached: those messages are handed back with no
// attempt counted, and the publisher backs off as a whole.
//
// A batch holds a key's messages in enqueue order. A Sender must not
// deliver a message after an older one of its key failed; it reports such
// messages with ErrHeldBack.
type Sender interface {
	Send(ctx context.Context, msgs []*OutboxMessage) error
}

// SenderFunc adapts a function to Sender.
type SenderFunc func(ctx context.Context, msgs []*OutboxMessage) error

// Send implements Sender.
func (f SenderFunc) Send(ctx context.Context, msgs []*OutboxMessage) error {
	if f == nil {
		return fmt.Errorf("%w: the SenderFunc is nil", ErrBrokerUnavailable)
	}
	return f(ctx, msgs)
}

// ErrBrokerUnavailable marks a failure of the broker as a whole (unreachable,
// no leader, timed out) rather than a refusal of one message. It costs the
// messages no attempt.
var ErrBrokerUnavailable = errors.New("outbox: broker unavailable")

// ErrHeldBack marks a message a Sender did not send because an older
// message of the same key in the batch failed: sending it would break the
// key's order. It costs the message no attempt.
var ErrHeldBack = errors.New("outbox: held back behind a failed message of the same key")

// SendError reports the messages of a batch that failed; the rest were sent.
type SendError struct {
	Failed map[uuid.UUID]error
}

func (e *SendError) Error() string {
	var first error
	for _, err := range e.Failed {
		first = err
		break
	}
	if first == nil {
		return "outbox: send failed"
	}
	return fmt.Sprintf("outbox: %d messages of the batch failed, e.g.: %v", len(e.Failed), first)
}

// Unwrap lets errors.Is see through to the messages' errors.
func (e *SendError) Unwrap() []error {
	out := make([]error, 0, len(e.Failed))
	for _, err := range e.Failed {
		out = append(out, err)
	}
	return out
}

// errorText keeps stored error text bounded: a broker's error is short, but
// nothing stops a Sender from returning a huge one.
func errorText(err error) string {
	s := strings.ToValidUTF8(err.Error(), "?")
	const max = 2000
	if len(s) > max {
		s = s[:max] + "..."
	}
	return s
}
