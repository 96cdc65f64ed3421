package inbox_test

import (
	"fmt"
	"maps"
	"slices"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/outboxtest"
)

// Message ids are compared exactly: Kafka topic names are case-sensitive,
// so "Orders/0/0" and "orders/0/0" are two messages, and so are two
// outbox-message-id headers that differ only in case or in a trailing
// space. Each must be applied, neither skipped as the other's duplicate
// nor stalling its partition.
func TestMessageIDsAreComparedExactly(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 1, "Orders", "orders", "spaced")
		g := group(t)
		produce(t, addrs, "Orders", record{key: "k", value: "upper"})
		produce(t, addrs, "orders", record{key: "k", value: "lower"},
			record{key: "k", value: "id-upper", id: "Order-1"}, record{key: "k", value: "id-lower", id: "order-1"})
		produce(t, addrs, "spaced", record{key: "k", value: "id-plain", id: "order-2"}, record{key: "k", value: "id-space", id: "order-2 "})
		consume(t, db, addrs, g, []string{"Orders", "orders", "spaced"}, applier(nil))
		want := []string{"Orders/0/0", "orders/0/0", "Order-1", "order-1", "order-2", "order-2 "}
		// Six messages take well under a second; the wait is long only for
		// a loaded machine.
		waitFor(t, 10*time.Second, "six distinct messages applied", func() (bool, string) {
			got := appliedByID(t, db)
			return len(got) == len(want), fmt.Sprintf("applied %q", keys(got))
		})
		got := appliedByID(t, db)
		for _, id := range want {
			if got[id] != 1 {
				t.Errorf("message %q applied %d times; all applied: %q", id, got[id], keys(got))
			}
		}
	})
}

// keys are m's keys in order, for messages where a trailing space matters.
func keys(m map[string]int) []string { return slices.Sorted(maps.Keys(m)) }
