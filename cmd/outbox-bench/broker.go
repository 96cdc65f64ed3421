package main

import (
	"strconv"

	"github.com/IBM/sarama"
	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/gorm-outbox/outbox/kafka"
)

// Topic settings of the in-process broker. kfake keeps its log in this
// process's memory, in segments grown by doubling: with Kafka's defaults
// (1 GiB segments, no size limit) every message is written into fresh
// memory and a segment's growth copies up to 64 MiB at once inside the
// broker's one request loop. Small segments and a size limit keep the
// broker's memory bounded, as a real broker's page cache is, and spare
// the broker's CPU the copies' spikes. Nothing in the benchmark reads the
// messages back.
const (
	benchPartitions     = 8
	benchSegmentBytes   = "2097152" // 2 MiB
	benchRetentionBytes = "8388608" // 8 MiB per partition
)

// newBroker starts a one-broker kfake cluster over TCP with topic created
// with the settings above. The caller closes it.
func newBroker(topic string) (*kfake.Cluster, error) {
	// The retention runs on the log cleaner's timer.
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.BrokerConfigs(map[string]string{"log.cleaner.backoff.ms": "200"}))
	if err != nil {
		return nil, err
	}
	admin, err := sarama.NewClusterAdmin(cluster.ListenAddrs(), kafka.NewConfig())
	if err != nil {
		cluster.Close()
		return nil, err
	}
	defer admin.Close()
	segment, retention := benchSegmentBytes, benchRetentionBytes
	err = admin.CreateTopic(topic, &sarama.TopicDetail{NumPartitions: benchPartitions, ReplicationFactor: 1,
		ConfigEntries: map[string]*string{"segment.bytes": &segment, "retention.bytes": &retention}}, false)
	if err != nil {
		cluster.Close()
		return nil, err
	}
	return cluster, nil
}

// retentionMessages is how many messages of payloadBytes fill every
// partition of a topic to its retention, with room to spare (records are
// written with their own headers, and the cleaner runs on a timer).
func retentionMessages(payloadBytes int) int {
	retention, _ := strconv.Atoi(benchRetentionBytes)
	return 2 * benchPartitions * retention / (payloadBytes + 64)
}
