package kafka_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/IBM/sarama"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/gorm-outbox/outbox/kafka"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// The in-process broker the tests use (kfake) must behave as Kafka does for
// transactions before anything is built on them: what a transaction commits
// is visible to read_committed readers, what it aborts is not, and a
// producer whose transactional id was taken over is fenced. These tests
// check that with sarama's transactional producer, and read with franz-go.

func transactionalProducer(t *testing.T, addrs []string, id string) sarama.SyncProducer {
	t.Helper()
	cfg := kafka.NewConfig()
	cfg.Producer.Transaction.ID = id
	cfg.Producer.Transaction.Retry.Backoff = 50 * time.Millisecond
	p, err := sarama.NewSyncProducer(addrs, cfg)
	if err != nil {
		t.Fatalf("transactional producer %s: %v", id, err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return p
}

func sendInTxn(t *testing.T, p sarama.SyncProducer, topic string, values ...string) {
	t.Helper()
	if err := p.BeginTxn(); err != nil {
		t.Fatalf("BeginTxn: %v", err)
	}
	for _, v := range values {
		if _, _, err := p.SendMessage(&sarama.ProducerMessage{Topic: topic, Key: sarama.StringEncoder("k"), Value: sarama.StringEncoder(v)}); err != nil {
			t.Fatalf("send in transaction: %v", err)
		}
	}
}

// readValues reads topic from the start with the isolation level given and
// returns the values, once nothing new arrived for a second.
func readValues(t *testing.T, addrs []string, topic string, committed bool) []string {
	t.Helper()
	iso := kgo.ReadUncommitted()
	if committed {
		iso = kgo.ReadCommitted()
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(addrs...), kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchIsolationLevel(iso))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var out []string
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		fs := cl.PollFetches(ctx)
		cancel()
		recs := fs.Records()
		if len(recs) == 0 {
			return out
		}
		for _, r := range recs {
			out = append(out, string(r.Value))
		}
	}
}

func TestBrokerShowsReadCommittedOnlyCommittedTransactions(t *testing.T) {
	_, addrs := outboxtest.Kafka(t, 1, "txn")
	p := transactionalProducer(t, addrs, "txn-visibility")
	sendInTxn(t, p, "txn", "c1", "c2")
	if err := p.CommitTxn(); err != nil {
		t.Fatalf("CommitTxn: %v", err)
	}
	sendInTxn(t, p, "txn", "a1", "a2")
	if err := p.AbortTxn(); err != nil {
		t.Fatalf("AbortTxn: %v", err)
	}
	sendInTxn(t, p, "txn", "c3")
	if err := p.CommitTxn(); err != nil {
		t.Fatalf("CommitTxn: %v", err)
	}
	if got := fmt.Sprint(readValues(t, addrs, "txn", true)); got != "[c1 c2 c3]" {
		t.Errorf("read_committed reads %s, want [c1 c2 c3]", got)
	}
	if got := fmt.Sprint(readValues(t, addrs, "txn", false)); got != "[c1 c2 a1 a2 c3]" {
		t.Errorf("read_uncommitted reads %s, want the aborted records too: [c1 c2 a1 a2 c3]", got)
	}
}

func TestBrokerFencesAProducerWhoseTransactionalIDWasTakenOver(t *testing.T) {
	_, addrs := outboxtest.Kafka(t, 1, "txn")
	zombie := transactionalProducer(t, addrs, "txn-fence")
	sendInTxn(t, zombie, "txn", "zombie")
	// A second producer with the same id bumps the epoch: the broker aborts
	// the first one's open transaction and refuses its commit.
	heir := transactionalProducer(t, addrs, "txn-fence")
	sendInTxn(t, heir, "txn", "heir")
	if err := heir.CommitTxn(); err != nil {
		t.Fatalf("the heir's CommitTxn: %v", err)
	}
	if err := zombie.CommitTxn(); err == nil {
		t.Fatal("the fenced producer's CommitTxn succeeded")
	} else if zombie.TxnStatus()&sarama.ProducerTxnFlagFatalError == 0 && zombie.TxnStatus()&sarama.ProducerTxnFlagAbortableError == 0 {
		t.Errorf("the fenced producer's commit failed (%v) but its state %v says no error", err, zombie.TxnStatus())
	}
	if got := fmt.Sprint(readValues(t, addrs, "txn", true)); got != "[heir]" {
		t.Errorf("read_committed reads %s, want only the heir's record", got)
	}
}
