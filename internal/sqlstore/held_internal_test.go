package sqlstore

import (
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/gorm-outbox/outbox/internal/core"
)

func keyed(keys string) []Picked {
	var out []Picked
	for _, k := range strings.Split(keys, " ") {
		out = append(out, Picked{OutboxMessage: &core.OutboxMessage{ID: uuid.New(), Key: strings.Trim(k, "_")}})
	}
	return out
}

func keysIn(msgs []Picked) string {
	var ks []string
	for _, m := range msgs {
		ks = append(ks, m.Key)
	}
	return strings.Join(ks, " ")
}

// The batches of one walk are sent side by side, so a key's messages must
// all be in one of them.
func TestSplitPickedKeepsAKeyInOneBatch(t *testing.T) {
	for _, c := range []struct {
		picked  string
		limit   int
		batches string
	}{
		{"", 3, ""},
		{"a b c", 3, "a b c"},
		{"a b", 3, "a b"},
		{"a b a c b d _ _", 2, "a b|c d| "},
		{"a _ a _ e", 2, "a | e"},
		{"a a b a c b", 3, "a a b|c"},
		{"a b c a d e c f", 2, "a b|c d|e f"},
	} {
		var got []string
		for _, b := range splitPicked(keyed(c.picked), c.limit) {
			got = append(got, keysIn(b))
		}
		if strings.Join(got, "|") != c.batches {
			t.Errorf("splitPicked(%q, %d) = %q; want %q", c.picked, c.limit, strings.Join(got, "|"), c.batches)
		}
	}
}

// The spare batch goes only to a claim like the one it was picked for, and
// only while fresh; otherwise its rows leave the rows in flight.
func TestTakeSpare(t *testing.T) {
	opts := core.ClaimOptions{Limit: 2, Lease: time.Minute}
	for _, c := range []struct {
		name  string
		opts  core.ClaimOptions
		age   time.Duration
		taken bool
	}{
		{"same options, fresh", opts, 0, true},
		{"other options", core.ClaimOptions{Limit: 2, Lease: time.Minute, SkipFailedKeys: true}, 0, false},
		{"stale", opts, 2 * spareFresh, false},
	} {
		var f inFlight
		spare := keyed("a b")
		f.add(spare)
		f.spares, f.spareOpts, f.spareAt = [][]Picked{spare}, opts, time.Now().Add(-c.age)
		got := f.takeSpare(c.opts)
		ids, _ := f.snapshot()
		if (got != nil) != c.taken || len(f.spares) != 0 {
			t.Errorf("%s: took %q, %d spare batches left", c.name, keysIn(got), len(f.spares))
		}
		if want := map[bool]int{true: 2, false: 0}[c.taken]; len(ids) != want {
			t.Errorf("%s: %d rows in flight after, want %d", c.name, len(ids), want)
		}
	}
}

// A walk's spare batches go to the next claims in the walk's order, and
// leave the rows in flight only when dropped.
func TestTakeSpareInOrder(t *testing.T) {
	opts := core.ClaimOptions{Limit: 2, Lease: time.Minute}
	var f inFlight
	first, second := keyed("a b"), keyed("c d")
	f.add(first)
	f.add(second)
	f.spares, f.spareOpts, f.spareAt = [][]Picked{first, second}, opts, time.Now()
	if got := f.takeSpare(opts); keysIn(got) != "a b" {
		t.Fatalf("first take: %q, want a b", keysIn(got))
	}
	if got := f.takeSpare(opts); keysIn(got) != "c d" {
		t.Fatalf("second take: %q, want c d", keysIn(got))
	}
	if got := f.takeSpare(opts); got != nil {
		t.Fatalf("third take: %q, want none", keysIn(got))
	}
	if ids, _ := f.snapshot(); len(ids) != 4 {
		t.Fatalf("%d rows in flight after the takes, want the 4 taken", len(ids))
	}
}
