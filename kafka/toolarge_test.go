//go:build !race

// This file is left out of race-detector builds: the path it exercises,
// a record batch the broker refuses as too large, runs into a data race in
// sarama itself (transactionManager's status, read in
// publishTxnPartitions without its lock while retryBatch writes it).
// .ci/run runs it without the detector.

package kafka_test

import (
	"strings"
	"testing"

	"github.com/google/uuid"
	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// A broker whose message.max.bytes is below the producer's
// Producer.MaxMessageBytes refuses a record batch of many small records as
// too large, every record with it. Exactly-once batches grow past the
// batch size to carry whole database transactions, so they meet it first.
// The transaction must be sent again in smaller record batches: delivered
// once, no message charged an attempt.
func TestTransactionalSenderSplitsARecordBatchTheBrokerFindsTooLarge(t *testing.T) {
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
	addrs := cluster.ListenAddrs()
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
