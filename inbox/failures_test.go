package inbox_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/inbox"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// refusing is a handler that fails on the messages whose value is in bad
// while broken holds, and applies the others.
func refusing(seen *calls, broken *atomic.Bool, bad ...string) inbox.Handler {
	apply := applier(nil)
	return func(tx *gorm.DB, m inbox.Message) error {
		seen.add(m.ID)
		if broken.Load() && slices.Contains(bad, string(m.Value)) {
			return fmt.Errorf("refused %s", m.Value)
		}
		return apply(tx, m)
	}
}

// interleaved are two keys' messages, a's and b's alternating, in one
// partition: a-1 is the one the handlers refuse.
func interleaved(n int) []record {
	var out []record
	for i := range n {
		for _, k := range []string{"a", "b"} {
			out = append(out, record{key: k, value: fmt.Sprintf("%s-%d", k, i), id: fmt.Sprintf("id-%s-%d", k, i)})
		}
	}
	return out
}

// A message its handler keeps refusing is tried the policy's attempts,
// then parked with its payload, headers, attempts and error; the later
// messages of its key are held, recorded unapplied, while the other key
// goes on. A retry that fails again parks it again; once the handler
// heals, a retry applies it and then the held ones, in the key's order.
func TestRefusedMessageIsParkedAndHoldsItsKey(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 1, "orders")
		g := group(t)
		var seen calls
		var broken atomic.Bool
		broken.Store(true)
		produce(t, addrs, "orders", interleaved(4)...)
		consume(t, db, addrs, g, []string{"orders"}, refusing(&seen, &broken, "a-1"),
			fastRetries, inbox.WithRetryCheckInterval(50*time.Millisecond))

		waitFor(t, time.Minute, "a-1 parked, a-2 and a-3 held, b-3 applied", func() (bool, string) {
			rows := inboxRows(t, db, g)
			return rows["id-a-1"].State == "parked" && rows["id-a-3"].State == "held" && rows["id-b-3"].State == "applied", states(rows)
		})
		rows := inboxRows(t, db, g)
		p := rows["id-a-1"]
		if p.Attempts != 3 || !strings.Contains(p.LastError, "refused a-1") || string(p.Payload) != "a-1" ||
			p.Headers == nil || !strings.Contains(*p.Headers, "id-a-1") || string(p.Key) != "a" {
			t.Errorf("parked row: attempts %d, last_error %q, payload %q, headers %v, key %q; want 3, the handler's error, a-1, its headers, a",
				p.Attempts, p.LastError, p.Payload, p.Headers, p.Key)
		}
		for _, id := range []string{"id-a-2", "id-a-3"} {
			if r := rows[id]; r.State != "held" || string(r.Payload) != strings.TrimPrefix(id, "id-") {
				t.Errorf("%s: state %s, payload %q; want held with its payload", id, r.State, r.Payload)
			}
			if n := seen.get(id); n != 0 {
				t.Errorf("%s is held, yet its handler was called %d times", id, n)
			}
		}
		if got, want := seqsOf(appliedRows(t, db), "a"), []int{0}; !slices.Equal(got, want) {
			t.Errorf("key a applied %v while a-1 is parked, want %v", got, want)
		}
		if got, want := seqsOf(appliedRows(t, db), "b"), []int{0, 1, 2, 3}; !slices.Equal(got, want) {
			t.Errorf("key b applied %v, want %v", got, want)
		}

		// A later message of the held key, in a batch of its own, is held too.
		produce(t, addrs, "orders", record{key: "a", value: "a-4", id: "id-a-4"}, record{key: "b", value: "b-4", id: "id-b-4"})
		waitFor(t, time.Minute, "a-4 held and b-4 applied", func() (bool, string) {
			rows := inboxRows(t, db, g)
			return rows["id-a-4"].State == "held" && rows["id-b-4"].State == "applied", states(rows)
		})

		// A retry of a message still refused parks it again, holding the key.
		tries := seen.get("id-a-1")
		if n, err := inbox.Retry(context.Background(), db, g); err != nil || n != 1 {
			t.Fatalf("Retry = %d, %v; want 1 message", n, err)
		}
		waitFor(t, time.Minute, "a-1 tried again and parked again", func() (bool, string) {
			r := inboxRows(t, db, g)["id-a-1"]
			return seen.get("id-a-1") == tries+3 && r.State == "parked", fmt.Sprintf("state %s, %d calls", r.State, seen.get("id-a-1"))
		})
		rows = inboxRows(t, db, g)
		if r := rows["id-a-1"]; r.Attempts != 3 || !strings.Contains(r.LastError, "refused a-1") || string(r.Payload) != "a-1" {
			t.Errorf("parked again: attempts %d, last_error %q, payload %q", r.Attempts, r.LastError, r.Payload)
		}
		for _, id := range []string{"id-a-2", "id-a-3", "id-a-4"} {
			if rows[id].State != "held" || seen.get(id) != 0 {
				t.Errorf("%s: state %s, %d handler calls; want held, never called", id, rows[id].State, seen.get(id))
			}
		}

		// Healed, a retry applies a-1, then what its key held, in order.
		broken.Store(false)
		if n, err := inbox.Retry(context.Background(), db, g); err != nil || n != 1 {
			t.Fatalf("Retry = %d, %v; want 1 message", n, err)
		}
		waitFor(t, time.Minute, "key a applied", func() (bool, string) {
			got := seqsOf(appliedRows(t, db), "a")
			return len(got) >= 5, fmt.Sprintf("key a applied %v", got)
		})
		produce(t, addrs, "orders", record{key: "a", value: "a-5", id: "id-a-5"})
		waitFor(t, time.Minute, "a-5 applied once its key is free", func() (bool, string) {
			got := seqsOf(appliedRows(t, db), "a")
			return len(got) >= 6, fmt.Sprintf("key a applied %v", got)
		})
		if got, want := seqsOf(appliedRows(t, db), "a"), []int{0, 1, 2, 3, 4, 5}; !slices.Equal(got, want) {
			t.Errorf("key a applied %v, want %v", got, want)
		}
		for id, r := range inboxRows(t, db, g) {
			if r.State != "applied" || len(r.Payload) != 0 || r.LastError != "" {
				t.Errorf("%s: state %s, payload %q, last_error %q; want applied, payload and error cleared", id, r.State, r.Payload, r.LastError)
			}
		}
		for id, n := range appliedByID(t, db) {
			if n != 1 {
				t.Errorf("%s applied %d times", id, n)
			}
		}
	})
}

// With KeySkip a parked message holds nothing: its key's later messages
// are applied at once, and a retry applies the parked one afterwards.
func TestKeySkipAppliesTheLaterMessagesOfAParkedKey(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 1, "orders")
		g := group(t)
		var seen calls
		var broken atomic.Bool
		broken.Store(true)
		produce(t, addrs, "orders", interleaved(4)...)
		consume(t, db, addrs, g, []string{"orders"}, refusing(&seen, &broken, "a-1"),
			fastRetries, inbox.WithKeyPolicy(outbox.KeySkip), inbox.WithRetryCheckInterval(50*time.Millisecond))
		waitFor(t, time.Minute, "a-1 parked and a-3 applied", func() (bool, string) {
			rows := inboxRows(t, db, g)
			return rows["id-a-1"].State == "parked" && rows["id-a-3"].State == "applied" && rows["id-b-3"].State == "applied", states(rows)
		})
		if got, want := seqsOf(appliedRows(t, db), "a"), []int{0, 2, 3}; !slices.Equal(got, want) {
			t.Errorf("key a applied %v around its parked message, want %v", got, want)
		}
		for id, r := range inboxRows(t, db, g) {
			if r.State == "held" {
				t.Errorf("%s held under KeySkip", id)
			}
		}
		broken.Store(false)
		if n, err := inbox.Retry(context.Background(), db, g, "id-a-1"); err != nil || n != 1 {
			t.Fatalf("Retry = %d, %v; want 1 message", n, err)
		}
		waitFor(t, time.Minute, "a-1 applied", func() (bool, string) {
			r := inboxRows(t, db, g)["id-a-1"]
			return r.State == "applied", "a-1 is " + r.State
		})
		if got, want := seqsOf(appliedRows(t, db), "a"), []int{0, 2, 3, 1}; !slices.Equal(got, want) {
			t.Errorf("key a applied %v, want %v", got, want)
		}
	})
}

// A handler that panics fails its attempt like an error: the message is
// retried, then parked with the panic as its error, and the consumer goes on
// with the next messages.
func TestHandlerPanicIsAFailure(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 1, "orders")
		g := group(t)
		var seen calls
		apply := applier(&seen)
		h := func(tx *gorm.DB, m inbox.Message) error {
			if string(m.Value) == "boom" {
				seen.add(m.ID)
				panic("the handler exploded")
			}
			return apply(tx, m)
		}
		produce(t, addrs, "orders", record{key: "x", value: "boom", id: "id-boom"}, record{key: "y", value: "y-1", id: "id-y-1"})
		consume(t, db, addrs, g, []string{"orders"}, h, fastRetries)
		waitFor(t, time.Minute, "the panicking message parked", func() (bool, string) {
			rows := inboxRows(t, db, g)
			return rows["id-boom"].State == "parked" && rows["id-y-1"].State == "applied", states(rows)
		})
		r := inboxRows(t, db, g)["id-boom"]
		if r.Attempts != 3 || !strings.Contains(r.LastError, "the handler exploded") {
			t.Errorf("parked: attempts %d, last_error %q; want 3 and the panic", r.Attempts, r.LastError)
		}
		if n := seen.get("id-boom"); n < 3 {
			t.Errorf("the panicking handler was called %d times, want at least 3", n)
		}
		// Still consuming.
		produce(t, addrs, "orders", record{key: "y", value: "y-2", id: "id-y-2"})
		waitFor(t, time.Minute, "a message after the panic applied", func() (bool, string) {
			return seen.get("id-y-2") == 1 && inboxRows(t, db, g)["id-y-2"].State == "applied", "not yet"
		})
	})
}

// The handler is tried as many times as the retry policy says, and
// Message.Attempt counts its tries: 1, 2, 3 for three attempts.
func TestHandlerIsTriedMaxAttemptsTimes(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 1, "orders")
		g := group(t)
		var mu sync.Mutex
		var attempts []int
		h := func(_ *gorm.DB, m inbox.Message) error {
			mu.Lock()
			defer mu.Unlock()
			attempts = append(attempts, m.Attempt)
			return errors.New("always refused")
		}
		produce(t, addrs, "orders", record{key: "k", value: "v", id: "id-1"})
		consume(t, db, addrs, g, []string{"orders"}, h, fastRetries)
		waitFor(t, time.Minute, "the message parked", func() (bool, string) {
			r := inboxRows(t, db, g)["id-1"]
			return r.State == "parked", "state " + r.State
		})
		mu.Lock()
		got := slices.Clone(attempts)
		mu.Unlock()
		if want := []int{1, 2, 3}; !slices.Equal(got, want) {
			t.Errorf("with MaxAttempts 3 the handler saw Attempt %v, want %v", got, want)
		}
	})
}

// Under KeySkip the parked messages of one key are independent: a retry of
// one of them applies it even while an earlier one of its key stays parked.
func TestKeySkipRetriesAMessageBehindAnotherParkedOfItsKey(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 1, "orders")
		g := group(t)
		var seen calls
		var broken atomic.Bool
		broken.Store(true)
		fixable := refusing(&seen, &broken, "a-1")
		h := func(tx *gorm.DB, m inbox.Message) error {
			if string(m.Value) == "a-0" {
				return errors.New("a-0 is poison")
			}
			return fixable(tx, m)
		}
		produce(t, addrs, "orders", record{key: "a", value: "a-0", id: "id-a-0"}, record{key: "a", value: "a-1", id: "id-a-1"},
			record{key: "a", value: "a-2", id: "id-a-2"})
		consume(t, db, addrs, g, []string{"orders"}, h,
			fastRetries, inbox.WithKeyPolicy(outbox.KeySkip), inbox.WithRetryCheckInterval(50*time.Millisecond))
		waitFor(t, time.Minute, "a-0 and a-1 parked, a-2 applied", func() (bool, string) {
			rows := inboxRows(t, db, g)
			return rows["id-a-0"].State == "parked" && rows["id-a-1"].State == "parked" && rows["id-a-2"].State == "applied", states(rows)
		})
		broken.Store(false)
		if n, err := inbox.Retry(context.Background(), db, g, "id-a-1"); err != nil || n != 1 {
			t.Fatalf("Retry = %d, %v; want 1 message", n, err)
		}
		// The retry check runs every 50 ms: five seconds is a hundred of them.
		waitFor(t, 5*time.Second, "a-1 applied after its retry", func() (bool, string) {
			rows := inboxRows(t, db, g)
			return rows["id-a-1"].State == "applied", states(rows)
		})
		if r := inboxRows(t, db, g)["id-a-0"]; r.State != "parked" {
			t.Errorf("a-0, not retried, is %s", r.State)
		}
	})
}
