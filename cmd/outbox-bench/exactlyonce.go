package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/kafka"
)

// closingSender is a Kafka sender the benchmark closes when done with it.
type closingSender interface {
	outbox.Sender
	Close() error
}

// senderMaker makes the sender a run's publisher sends through.
type senderMaker func(addrs []string, s settings) (closingSender, error)

// atLeastOnce is the default sender: a batch sent with SendMessages.
func atLeastOnce(addrs []string, _ settings) (closingSender, error) {
	return kafka.NewSender(addrs, nil)
}

// benchTransactionalID names the exactly-once publisher's producers. Every
// drain of a schema uses the same one: the slots table keeps its slots.
const benchTransactionalID = "outbox-bench"

// exactlyOnce is the sender that switches the publisher to exactly-once
// mode: each batch in one Kafka transaction, one slot a worker.
func exactlyOnce(addrs []string, s settings) (closingSender, error) {
	return kafka.NewTransactionalSender(addrs, benchTransactionalID, nil, kafka.WithSlots(s.workers))
}

// sendHooks are called around each send of a publisher: before with its
// messages, after with them and the send's error.
type sendHooks struct {
	before func(msgs []*outbox.OutboxMessage)
	after  func(msgs []*outbox.OutboxMessage, err error)
}

// observed returns sender with h called around each of its sends. A
// TransactionalSender stays one, so that the publisher still runs in
// exactly-once mode: h is called around each transaction of its slots.
func observed(sender outbox.Sender, h sendHooks) outbox.Sender {
	if ts, ok := sender.(*kafka.TransactionalSender); ok {
		return &observedTxn{TransactionalSender: ts, h: h}
	}
	return outbox.SenderFunc(func(ctx context.Context, msgs []*outbox.OutboxMessage) error {
		h.before(msgs)
		err := sender.Send(ctx, msgs)
		h.after(msgs, err)
		return err
	})
}

type observedTxn struct {
	*kafka.TransactionalSender
	h sendHooks
}

func (o *observedTxn) OpenSlot(ctx context.Context, slot int) (outbox.SlotProducer, error) {
	p, err := o.TransactionalSender.OpenSlot(ctx, slot)
	if err != nil {
		return nil, err
	}
	return &observedSlot{SlotProducer: p, h: o.h}, nil
}

type observedSlot struct {
	outbox.SlotProducer
	h sendHooks
}

// errNotCommitted is what the hooks are told of a transaction that failed:
// none of its messages is delivered, whichever its error names.
var errNotCommitted = errors.New("the transaction did not commit")

func (o *observedSlot) SendInTransaction(ctx context.Context, token string, msgs []*outbox.OutboxMessage, ready func() error) error {
	o.h.before(msgs)
	err := o.SlotProducer.SendInTransaction(ctx, token, msgs, ready)
	if err != nil {
		o.h.after(msgs, errNotCommitted)
	} else {
		o.h.after(msgs, nil)
	}
	return err
}

// reader reads a topic from its start with isolation.level=read_committed,
// as a consumer of the exactly-once publisher must, and notes when each
// event (by its bench-seq header) first arrives.
type reader struct {
	cl   *kgo.Client
	mu   sync.Mutex
	seen map[int]time.Time
	done chan struct{}
}

func startReader(ctx context.Context, addrs []string, topic string) (*reader, error) {
	cl, err := kgo.NewClient(kgo.SeedBrokers(addrs...), kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchIsolationLevel(kgo.ReadCommitted()))
	if err != nil {
		return nil, err
	}
	r := &reader{cl: cl, seen: map[int]time.Time{}, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		for {
			fs := cl.PollFetches(ctx)
			if fs.IsClientClosed() || ctx.Err() != nil {
				return
			}
			now := time.Now()
			r.mu.Lock()
			fs.EachRecord(func(rec *kgo.Record) {
				for _, h := range rec.Headers {
					if h.Key != seqHeader {
						continue
					}
					if seq, err := strconv.Atoi(string(h.Value)); err == nil {
						if _, dup := r.seen[seq]; !dup {
							r.seen[seq] = now
						}
					}
				}
			})
			r.mu.Unlock()
		}
	}()
	return r, nil
}

func (r *reader) close() {
	r.cl.Close()
	<-r.done
}

// exactlyOncePart measures what exactly-once mode costs: the drain of the
// drain part's backlog and the latency at a steady rate, each by the
// at-least-once publisher (kafka.NewSender) and by the exactly-once one
// (kafka.NewTransactionalSender, a slot a worker), the two interleaved in
// every round, every other round in reverse order.
func exactlyOncePart(ctx context.Context, admin *gorm.DB, s settings) error {
	fmt.Printf("\n7. exactly-once: at-least-once (kafka.NewSender) beside exactly-once (kafka.NewTransactionalSender, %d slots), %d rounds, interleaved\n",
		s.workers, s.rounds)
	if err := withSchema(admin, s.dsn, func(db *gorm.DB, _ string) error { return exactlyOnceDrain(ctx, db, s) }); err != nil {
		return err
	}
	return exactlyOnceLatency(ctx, admin, s)
}

// deliveryModes are the two publishers the part compares, at-least-once
// first: the base of the ratios.
var deliveryModes = []struct {
	name   string
	sender senderMaker
}{
	{"at-least-once", atLeastOnce},
	{"exactly-once", exactlyOnce},
}

// interleaved is the order of the modes in round r: every other round
// reversed, so that neither always runs first.
func interleaved(r int) []int {
	if r%2 == 1 {
		return []int{1, 0}
	}
	return []int{0, 1}
}

// eventsPerTransaction is how many events each transaction of the
// exactly-once part's backlog enqueued: exactly-once mode delivers a
// transaction's events together, so the backlog is made of real ones.
const eventsPerTransaction = 5

// fillTransactions commits n pending messages with outbox.Enqueue, in
// transactions of perTx events over keys keys, from 8 writers.
func fillTransactions(db *gorm.DB, n, keys, perTx int, payload []byte) error {
	settle(db)
	const writers = 8
	var next atomic.Int64
	errs := make(chan error, writers)
	for range writers {
		go func() {
			for {
				start := int(next.Add(int64(perTx))) - perTx
				if start >= n {
					errs <- nil
					return
				}
				err := db.Transaction(func(tx *gorm.DB) error {
					msgs := make([]outbox.Message, 0, perTx)
					for i := start; i < min(start+perTx, n); i++ {
						msgs = append(msgs, outbox.Message{Topic: "bench", Key: fmt.Sprint("k", i%keys), Payload: payload})
					}
					return outbox.Enqueue(tx, msgs...)
				})
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	var first error
	for range writers {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	if first != nil {
		return first
	}
	return db.Exec("ANALYZE " + outbox.DefaultTableName).Error
}

func exactlyOnceDrain(ctx context.Context, db *gorm.DB, s settings) error {
	part := fmt.Sprintf("exactly-once, drain of %s pending", count(s.n))
	fmt.Printf("   drain of %d pending messages, committed %d a transaction (batch %d, %d workers, published rows kept), medians:\n",
		s.n, eventsPerTransaction, s.batch, s.workers)
	cluster, err := newBroker("bench")
	if err != nil {
		return err
	}
	defer cluster.Close()
	if err := db.Use(outbox.Plugin()); err != nil {
		return err
	}
	payload := []byte(strings.Repeat("x", s.payloadBytes))
	addrs := cluster.ListenAddrs()
	// As in the drain part: the broker's log grown to its retention, and
	// a drain of each publisher first, not counted (the pool's new
	// connections, the slots table and its producers' first transactions).
	if _, err := produceOnly(addrs, s.batch, s.workers, retentionMessages(s.payloadBytes), s.keys, payload); err != nil {
		return fmt.Errorf("warming up: %w", err)
	}
	for _, m := range deliveryModes {
		if err := warmUpWith(ctx, db, addrs, s, payload, m.sender); err != nil {
			return fmt.Errorf("warming up %s: %w", m.name, err)
		}
	}
	rates := make([][]float64, len(deliveryModes))
	cpus := make([][]cpuTime, len(deliveryModes))
	for r := range s.rounds {
		fmt.Fprintf(os.Stderr, "   exactly-once drain round %d of %d\n", r+1, s.rounds)
		for _, i := range interleaved(r) {
			if err := fillTransactions(db, s.n, s.keys, eventsPerTransaction, payload); err != nil {
				return err
			}
			rate, cpu, err := emptied(db, outbox.DefaultTableName)(measured(func() (float64, error) {
				return drainThrough(ctx, db, addrs, s, s.n, nil, deliveryModes[i].sender)
			}))
			if err != nil {
				return fmt.Errorf("%s drain: %w", deliveryModes[i].name, err)
			}
			rates[i] = append(rates[i], rate)
			cpus[i] = append(cpus[i], cpu)
		}
	}
	whats := []string{
		fmt.Sprintf("the publisher with kafka.NewSender draining a backlog committed %d events a transaction over %d keys (published rows kept, the default): the base of the ratio", eventsPerTransaction, s.keys),
		fmt.Sprintf("the same publisher with kafka.NewTransactionalSender, WithSlots(%d): each batch, of whole database transactions, in one Kafka transaction with its marker, each worker holding a slot", s.workers),
	}
	for i, m := range deliveryModes {
		perMsg := make([]float64, len(cpus[i]))
		for r, c := range cpus[i] {
			perMsg[r] = float64(c.machine.Nanoseconds()) / 1000 / float64(s.n)
		}
		fmt.Printf("   %-72s %8.0f msg/s  (%.1f µs CPU/msg; rounds %s)\n", m.name+":", median(rates[i]), median(perMsg), thousands(rates[i]))
		record(part, m.name, whats[i]+fmt.Sprintf("; median of %d rounds, and the machine's CPU a message (every process)", len(rates[i])),
			"%.0f msg/s, %.1f µs CPU/msg", median(rates[i]), median(perMsg))
	}
	pairs := make([]float64, s.rounds)
	for r := range s.rounds {
		pairs[r] = rates[1][r] / rates[0][r]
	}
	ratio := median(rates[1]) / median(rates[0])
	fmt.Printf("      exactly-once / at-least-once: %.2f× (target: at least 0.6×); each round's pair: %s\n", ratio, each(pairs, "%.2f×", " "))
	record(part, "exactly-once / at-least-once",
		"the exactly-once median over the at-least-once median (target: at least 0.6×); then each round's exactly-once drain over the at-least-once drain of the same round",
		"%.2f× (rounds %s)", ratio, each(pairs, "%.2f×", " "))
	return nil
}

func exactlyOnceLatency(ctx context.Context, admin *gorm.DB, s settings) error {
	rate := s.exactlyOnceRate
	fmt.Printf("   latency at %d/s: commit to a consumer reading with isolation.level=read_committed, %d writers, %d s a run (the first second left out), woken by NOTIFY:\n",
		rate, s.writers, s.seconds)
	results := make([][]latencyResult, len(deliveryModes))
	for r := range s.rounds {
		fmt.Fprintf(os.Stderr, "   exactly-once latency round %d of %d\n", r+1, s.rounds)
		for _, i := range interleaved(r) {
			err := withSchema(admin, s.dsn, func(db *gorm.DB, dsn string) error {
				start := cpuNow()
				res, err := latencyRunWith(ctx, db, dsn, s, rate, latencyHow{wake: true, sender: deliveryModes[i].sender, toConsumer: true})
				res.stolen = cpuNow().since(start).stolenCores()
				results[i] = append(results[i], res)
				return err
			})
			if err != nil {
				return fmt.Errorf("%s latency: %w", deliveryModes[i].name, err)
			}
		}
	}
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	part := fmt.Sprintf("exactly-once, latency at %d/s", rate)
	p99 := make([]float64, len(deliveryModes))
	for i, m := range deliveryModes {
		var lat []time.Duration
		var achieved, p99s, stolen []float64
		batches := 0
		for _, res := range results[i] {
			lat = append(lat, res.lat...)
			achieved = append(achieved, res.achieved)
			p99s = append(p99s, ms(quantile(res.lat, 0.99)))
			stolen = append(stolen, res.stolen)
			batches += res.batches
		}
		grouped := ""
		if n := results[i][0].perTx; n > 1 {
			grouped = fmt.Sprintf(", %d a transaction", n)
		}
		p99[i] = ms(quantile(lat, 0.99))
		fmt.Printf("   %-15s p50 %6.1f ms  p99 %6.1f ms  max %7.1f ms  (achieved %.0f/s%s; %d batches; each round's p99: %s ms; cores stolen by the hypervisor: %s)\n",
			m.name+":", ms(quantile(lat, 0.5)), p99[i], ms(quantile(lat, 1)), median(achieved), grouped, batches, each(p99s, "%.1f", ", "), each(stolen, "%.2f", ", "))
		record(part, m.name,
			fmt.Sprintf("commit to a franz-go consumer reading with isolation.level=read_committed (not to the producer's acknowledgement, as the latency part measures: in exactly-once mode an event is visible only once its transaction commits, so both modes are measured to that reader), %d writers, the publisher on a pool of its own woken by NOTIFY; over every round's messages", s.writers),
			"p50 %.1f ms, p99 %.1f ms, max %.1f ms (achieved %.0f/s%s)", ms(quantile(lat, 0.5)), p99[i], ms(quantile(lat, 1)), median(achieved), grouped)
	}
	fmt.Printf("      exactly-once p99 / at-least-once p99: %.2f× (target: at most 2×)\n", p99[1]/p99[0])
	record(part, "exactly-once p99 / at-least-once p99", "the ratio of the two lines' p99s (target: at most 2×)", "%.2f×", p99[1]/p99[0])
	return nil
}
