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
	"time"

	"github.com/google/uuid"
	"github.com/twmb/franz-go/pkg/kfake"
	"gorm.io/gorm"

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
	var want []string
	err = db.Transaction(func(tx *gorm.DB) error {
		var msgs []outbox.Message
		for i := range 120 { // about 30 KB, 15 KB a partition
			want = append(want, fmt.Sprintf("event-%03d-%s", i, strings.Repeat(uuid.NewString(), 6)))
			msgs = append(msgs, outbox.Message{Topic: "eo", Key: fmt.Sprint("key-", i%8), Payload: want[i]})
		}
		return outbox.Enqueue(tx, msgs...)
	})
	if err != nil {
		t.Fatal(err)
	}
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
	var charged int64
	if err := db.Table(outbox.DefaultTableName).Where("attempts > 0").Count(&charged).Error; err != nil {
		t.Fatal(err)
	}
	if charged != 0 {
		t.Errorf("%d messages were charged an attempt, want none", charged)
	}
	got := map[string]int{}
	for _, r := range outboxtest.ReadAll(t, addrs, "eo", len(want), 2*time.Second) {
		got[string(r.Value)]++
	}
	for _, w := range want {
		if got[w] != 1 {
			t.Errorf("%s read %d times with read_committed, want once", w[:9], got[w])
		}
	}
}
