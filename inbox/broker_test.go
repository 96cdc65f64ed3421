package inbox_test

import (
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"gorm.io/gorm"
)

// A consumer started while its broker is down keeps trying, and once the
// broker is up it joins the group and applies what is produced.
func TestBrokerDownAtStart(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		// A port where nothing listens: taken from the system, then freed.
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		_ = l.Close()
		addr := fmt.Sprintf("127.0.0.1:%d", port)

		var logs logBuffer
		var seen calls
		g := group(t)
		c := consume(t, db, []string{addr}, g, []string{"orders"}, applier(&seen), logs.option())
		waitFor(t, time.Minute, "the consumer to fail to reach the broker", func() (bool, string) {
			return strings.Contains(logs.String(), "cannot reach the Kafka brokers"), "nothing logged yet"
		})

		cluster, err := kfake.NewCluster(kfake.Ports(port), kfake.NumBrokers(1), kfake.SeedTopics(2, "orders"))
		if err != nil {
			t.Fatalf("starting kfake on port %d: %v", port, err)
		}
		defer cluster.Close()
		defer stop(t, c) // before the broker goes away
		produce(t, []string{addr}, "orders", record{key: "a", value: "v-1", id: "id-1"}, record{key: "b", value: "v-2", id: "id-2"},
			record{key: "c", value: "v-3", id: "id-3"})
		// Reconnecting waits up to 5 s between tries, and joining a new
		// group takes a few seconds more.
		waitFor(t, 2*time.Minute, "the messages applied", func() (bool, string) {
			n := countRows(t, db, "applieds", "")
			return n == 3, fmt.Sprintf("%d applied", n)
		})
		for _, id := range []string{"id-1", "id-2", "id-3"} {
			if n := seen.get(id); n != 1 {
				t.Errorf("%s: handler called %d times", id, n)
			}
		}
	})
}
