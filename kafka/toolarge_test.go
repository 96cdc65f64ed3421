//go:build !race

// This file is left out of race-detector builds: the path it exercises,
// a record batch the broker refuses as too large, runs into a data race in
// sarama itself (transactionManager's status, read in
// publishTxnPartitions without its lock while retryBatch writes it).
// .ci/run runs it without the detector.

package kafka_test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/google/uuid"
	"github.com/twmb/franz-go/pkg/kfake"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/kafka"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// A broker whose message.max.bytes is below the producer's
// Producer.MaxMessageBytes refuses a record batch of many small records as
// too large, every record with it. Exactly-once batches grow past the
// batch size to carry whole database transactions, so they meet it first.
// The transaction must be sent again in smaller record batches: delivered
// once, no message charged an attempt.
func TestTransactionalSenderSplitsARecordBatchTheBrokerFindsTooLarge(t *testing.T) {
	db, addrs := smallRecordBatches(t)
	want := events(120, "event-%03d-"+strings.Repeat(uuid.NewString(), 6)) // about 30 KB, 15 KB a partition
	enqueueInOneTransaction(t, db, "eo", want, 8)
	pub, err := outbox.NewPublisher(db, newTransactional(t, addrs, "split-"+uuid.NewString()[:8]), outbox.WithBatchSize(40))
	if err != nil {
		t.Fatal(err)
	}
	res, err := pub.PublishOnce(t.Context())
	if err != nil {
		t.Fatalf("PublishOnce: %v (%+v)", err, res)
	}
	if res.Published != len(want) {
		t.Errorf("published %d of the transaction's %d events in one batch, want all: %+v", res.Published, len(want), res)
	}
	if n := countRows(t, db, "attempts > 0"); n != 0 {
		t.Errorf("%d messages were charged an attempt, want none", n)
	}
	expectEachOnce(t, addrs, "eo", want)
}

// A record over the broker's message.max.bytes but under the producer's
// limit is refused however the batch is split: it alone stays in the
// outbox, with the broker's refusal as its error, and the rest of the
// batch is delivered once, in either mode.
func TestARecordTheBrokerRefusesStaysInTheOutbox(t *testing.T) {
	t.Run("at-least-once", func(t *testing.T) {
		testARecordTheBrokerRefuses(t, func(addrs []string) outbox.Sender {
			s, err := kafka.NewSender(addrs, nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = s.Close() })
			return s
		})
	})
	t.Run("exactly-once", func(t *testing.T) {
		testARecordTheBrokerRefuses(t, func(addrs []string) outbox.Sender {
			return newTransactional(t, addrs, "refused-"+uuid.NewString()[:8])
		})
	})
}

func testARecordTheBrokerRefuses(t *testing.T, sender func(addrs []string) outbox.Sender) {
	db, addrs := smallRecordBatches(t)
	small := events(6, "event-%03d")
	for i, p := range append(small[:3:3], append([]string{strings.Repeat("x", 8192)}, small[3:]...)...) {
		if err := db.Transaction(func(tx *gorm.DB) error {
			return outbox.Enqueue(tx, outbox.Message{Topic: "eo", Key: fmt.Sprint("key-", i), Payload: p})
		}); err != nil {
			t.Fatal(err)
		}
	}
	pub, err := outbox.NewPublisher(db, sender(addrs), outbox.WithBatchSize(40))
	if err != nil {
		t.Fatal(err)
	}
	for range 3 { // the batch with the refused record aborts; the others go in the next
		if _, err := pub.PublishOnce(t.Context()); err != nil {
			t.Fatalf("PublishOnce: %v", err)
		}
	}
	var left []outbox.OutboxMessage
	if err := db.Where("state = ?", outbox.StatePending).Find(&left).Error; err != nil {
		t.Fatal(err)
	}
	if len(left) != 1 || len(left[0].Payload) < 8192 || left[0].Attempts != 1 || !strings.Contains(strings.ToLower(left[0].LastError), "large") {
		t.Fatalf("pending after the sends: %d rows, want the refused record alone with its error: %s", len(left), describe(left))
	}
	expectEachOnce(t, addrs, "eo", small)
}

func describe(rows []outbox.OutboxMessage) string {
	var b strings.Builder
	for _, m := range rows {
		fmt.Fprintf(&b, "\n%s: %d bytes, %d attempts, %q", m.Key, len(m.Payload), m.Attempts, m.LastError)
	}
	return b.String()
}

// smallRecordBatches is an outbox on PostgreSQL, and a broker whose
// message.max.bytes (4 KiB) is far below the producer's limit, with a
// topic "eo" of two partitions.
func smallRecordBatches(t *testing.T) (*gorm.DB, []string) {
	t.Helper()
	db := outboxtest.Postgres(t, nil)
	if err := db.Use(outbox.Plugin()); err != nil {
		t.Fatal(err)
	}
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(2, "eo"),
		kfake.BrokerConfigs(map[string]string{"message.max.bytes": "4096"}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cluster.Close)
	return db, cluster.ListenAddrs()
}
