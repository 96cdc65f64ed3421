package outbox

import (
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
)

func keyed(keys string) []*OutboxMessage {
	var out []*OutboxMessage
	for _, k := range strings.Split(keys, " ") {
		out = append(out, &OutboxMessage{ID: uuid.New(), Key: strings.Trim(k, "_")})
	}
	return out
}

func keysIn(msgs []*OutboxMessage) string {
	var ks []string
	for _, m := range msgs {
		ks = append(ks, m.Key)
	}
	return strings.Join(ks, " ")
}

// A spare batch is sent beside the first, so it must hold no key of it.
func TestSplitPickedKeepsAKeyInOneBatch(t *testing.T) {
	for _, c := range []struct {
		picked       string
		limit        int
		first, spare string
	}{
		{"a b c", 3, "a b c", ""},
		{"a b", 3, "a b", ""},
		{"a b a c b d _ _", 2, "a b", "c d  "},
		{"a _ a _ e", 2, "a ", " e"},
	} {
		first, spare := splitPicked(keyed(c.picked), c.limit)
		if keysIn(first) != c.first || keysIn(spare) != c.spare {
			t.Errorf("splitPicked(%q, %d) = %q, %q; want %q, %q", c.picked, c.limit, keysIn(first), keysIn(spare), c.first, c.spare)
		}
	}
}

// The spare batch goes only to a claim like the one it was picked for, and
// only while fresh; otherwise its rows leave the rows in flight.
func TestTakeSpare(t *testing.T) {
	opts := ClaimOptions{Limit: 2, Lease: time.Minute}
	for _, c := range []struct {
		name  string
		opts  ClaimOptions
		age   time.Duration
		taken bool
	}{
		{"same options, fresh", opts, 0, true},
		{"other options", ClaimOptions{Limit: 2, Lease: time.Minute, SkipFailedKeys: true}, 0, false},
		{"stale", opts, 2 * spareFresh, false},
	} {
		var f inFlight
		spare := keyed("a b")
		f.add(spare, nil)
		f.spare, f.spareOpts, f.spareAt = spare, opts, time.Now().Add(-c.age)
		got := f.takeSpare(c.opts)
		ids, _ := f.snapshot()
		if (got != nil) != c.taken || f.spare != nil {
			t.Errorf("%s: took %q, spare left %q", c.name, keysIn(got), keysIn(f.spare))
		}
		if want := map[bool]int{true: 2, false: 0}[c.taken]; len(ids) != want {
			t.Errorf("%s: %d rows in flight after, want %d", c.name, len(ids), want)
		}
	}
}
