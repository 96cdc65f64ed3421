package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"sync"
	"time"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
)

const seqHeader = "bench-seq"

// ackTimes notes, around each send of the publisher's (see observed), when
// each message's first send started and when it was acknowledged.
type ackTimes struct {
	mu      sync.Mutex
	acked   map[int]time.Time
	started map[int]time.Time
	sends   int
}

func newAckTimes() *ackTimes {
	return &ackTimes{acked: map[int]time.Time{}, started: map[int]time.Time{}}
}

func (a *ackTimes) hooks() sendHooks { return sendHooks{before: a.before, after: a.after} }

func (a *ackTimes) before(msgs []*outbox.OutboxMessage) {
	st := time.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	a.sends++
	for _, m := range msgs {
		if seq, perr := strconv.Atoi(m.Headers[seqHeader]); perr == nil {
			if _, seen := a.started[seq]; !seen {
				a.started[seq] = st
			}
		}
	}
}

func (a *ackTimes) after(msgs []*outbox.OutboxMessage, err error) {
	now := time.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	var partial *outbox.SendError
	errors.As(err, &partial)
	for _, m := range msgs {
		if err != nil && (partial == nil || partial.Failed[m.ID] != nil) {
			continue // not acknowledged
		}
		if seq, perr := strconv.Atoi(m.Headers[seqHeader]); perr == nil {
			if _, seen := a.acked[seq]; !seen {
				a.acked[seq] = now
			}
		}
	}
}

// latencyPart measures commit-to-acknowledgement at steady rates. The
// publisher runs on a *gorm.DB of its own, as in another process, so that
// only the NOTIFY (or the poll) can tell it of a commit.
//
// Each rate and mode runs once per round, the modes interleaved (every
// other round in reverse order), and the percentiles are taken over every
// round's messages together: the p99 of one 4-second run rests on its 40
// slowest messages, and moves with the machine from one run to the next.
// Each round's p99 follows, to show the spread.
func latencyPart(ctx context.Context, admin *gorm.DB, s settings) error {
	fmt.Printf("\n2. latency: commit to Kafka acknowledgement, %d writers, %d rounds of %ds per rate and mode, interleaved (the first second of each left out)\n",
		s.writers, s.rounds, s.seconds)
	modes := []string{"wake-up", "poll only"}
	results := make([][]latencyResult, len(s.rates)*len(modes))
	for r := range s.rounds {
		fmt.Fprintf(os.Stderr, "   latency round %d of %d\n", r+1, s.rounds)
		for i, rate := range s.rates {
			for k := range modes {
				j := k
				if r%2 == 1 { // every other round in reverse order, as the enqueue part
					j = len(modes) - 1 - k
				}
				mode := modes[j]
				err := withSchema(admin, s.dsn, func(db *gorm.DB, dsn string) error {
					start := cpuNow()
					res, err := latencyRun(ctx, db, dsn, s, rate, mode == "wake-up")
					res.stolen = cpuNow().since(start).stolenCores()
					results[i*len(modes)+j] = append(results[i*len(modes)+j], res)
					return err
				})
				if err != nil {
					return err
				}
			}
		}
	}
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	for i, rate := range s.rates {
		for j, mode := range modes {
			var lat, toSend []time.Duration
			var achieved []float64
			var p99s []float64
			var stolen []float64
			batches := 0
			for _, res := range results[i*len(modes)+j] {
				stolen = append(stolen, res.stolen)
				lat, toSend = append(lat, res.lat...), append(toSend, res.toSend...)
				achieved = append(achieved, res.achieved)
				batches += res.batches
				p99s = append(p99s, ms(quantile(res.lat, 0.99)))
			}
			grouped := ""
			if n := results[i*len(modes)+j][0].perTx; n > 1 {
				grouped = fmt.Sprintf(", %d a transaction", n)
			}
			achievedNote := fmt.Sprintf("(achieved %5.0f/s%s)", median(achieved), grouped)
			fmt.Printf("   %5d/s %-35s %-9s  p50 %6.1f ms  p99 %6.1f ms  max %7.1f ms  (commit to send p50 %.1f p99 %.1f ms; %d batches; each round's p99: %s ms; cores stolen by the hypervisor: %s)\n",
				rate, achievedNote, mode, ms(quantile(lat, 0.5)), ms(quantile(lat, 0.99)), ms(quantile(lat, 1)),
				ms(quantile(toSend, 0.5)), ms(quantile(toSend, 0.99)), batches, each(p99s, "%.1f", ", "), each(stolen, "%.2f", ", "))
			how := map[string]string{"wake-up": "woken by the commits' NOTIFY", "poll only": "polling only, no NOTIFY"}[mode]
			record("latency", fmt.Sprintf("%d/s, %s", rate, mode),
				fmt.Sprintf("commit to Kafka acknowledgement, %d writers, the publisher on a pool of its own, %s; over every round's messages (target at 1,000/s: p99 under 20 ms)", s.writers, how),
				"p50 %.1f ms, p99 %.1f ms, max %.1f ms (achieved %.0f/s%s)", ms(quantile(lat, 0.5)), ms(quantile(lat, 0.99)), ms(quantile(lat, 1)), median(achieved), grouped)
		}
	}
	return nil
}

// latencyResult is one run of one rate and mode: each message's commit to
// acknowledgement and commit to first send, the rate the writers reached,
// the batches sent, and the cores the hypervisor took meanwhile (a p99
// follows them more than anything this code does).
type latencyResult struct {
	lat, toSend []time.Duration
	achieved    float64
	batches     int
	perTx       int // events a transaction
	stolen      float64
}

// quantile returns the q-quantile of ds, 1 the maximum. It sorts ds in
// place unless it is sorted already, so asking one slice for several
// quantiles sorts it once.
func quantile(ds []time.Duration, q float64) time.Duration {
	if !slices.IsSorted(ds) {
		slices.Sort(ds)
	}
	return ds[int(q*float64(len(ds)-1))]
}

func latencyRun(ctx context.Context, db *gorm.DB, dsn string, s settings, rate int, wake bool) (latencyResult, error) {
	return latencyRunWith(ctx, db, dsn, s, rate, latencyHow{wake: wake, sender: atLeastOnce})
}

// latencyHow is what a latency run measures: with the wake-up or polling
// only, through which sender, and to what: the producer's acknowledgement,
// or, with toConsumer, a consumer reading with
// isolation.level=read_committed receiving the event.
type latencyHow struct {
	wake       bool
	sender     senderMaker
	toConsumer bool
}

func latencyRunWith(ctx context.Context, db *gorm.DB, dsn string, s settings, rate int, how latencyHow) (latencyResult, error) {
	var opts []outbox.PluginOption
	var popts []outbox.PublisherOption
	if !how.wake {
		opts = append(opts, outbox.WithNotifyInterval(0))
		popts = append(popts, outbox.WithoutListen())
	}
	if err := db.Use(outbox.Plugin(opts...)); err != nil {
		return latencyResult{}, err
	}
	settle(db)
	pubDB, closeDB, err := open(dsn)
	if err != nil {
		return latencyResult{}, err
	}
	defer closeDB()
	if err := pubDB.Use(outbox.Plugin(outbox.WithoutMigration())); err != nil {
		return latencyResult{}, err
	}
	cluster, err := newBroker("latency")
	if err != nil {
		return latencyResult{}, err
	}
	defer cluster.Close()
	sender, err := how.sender(cluster.ListenAddrs(), s)
	if err != nil {
		return latencyResult{}, err
	}
	defer sender.Close()
	acks := newAckTimes()
	arrived := acks.acked // under acks.mu
	arrivedMu := &acks.mu
	if how.toConsumer {
		reader, err := startReader(ctx, cluster.ListenAddrs(), "latency")
		if err != nil {
			return latencyResult{}, err
		}
		defer reader.close()
		arrived, arrivedMu = reader.seen, &reader.mu
	}
	pub, err := outbox.NewPublisher(pubDB, observed(sender, acks.hooks()), append(popts, outbox.WithBatchSize(s.batch), outbox.WithWorkers(s.workers),
		outbox.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))...)
	if err != nil {
		return latencyResult{}, err
	}
	if err := pub.Start(ctx); err != nil {
		return latencyResult{}, err
	}
	defer func() { _ = pub.Stop(ctx) }() // the figures are taken; what Stop says changes none of them

	// Past 1,000 events a second, a transaction carries several: on a
	// small machine, 8 writers beside the publisher cannot commit
	// thousands of one-event transactions a second, so a rate asked of one
	// event each would not be reached; grouped, the events arrive at the
	// rate asked.
	perTx := max(1, (rate+999)/1000)
	total := rate * s.seconds
	committed := make([]time.Time, total)
	jobs := make(chan int, total)
	var wg sync.WaitGroup
	var firstErr error
	var errMu sync.Mutex
	for range s.writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for first := range jobs {
				last := min(first+perTx, total)
				err := db.Transaction(func(tx *gorm.DB) error {
					msgs := make([]outbox.Message, 0, last-first)
					for seq := first; seq < last; seq++ {
						msgs = append(msgs, outbox.Message{Topic: "latency", Key: strconv.Itoa(seq % s.keys),
							Payload: []byte("event"), Headers: map[string]string{seqHeader: strconv.Itoa(seq)}})
					}
					return outbox.Enqueue(tx, msgs...)
				})
				now := time.Now()
				for seq := first; seq < last; seq++ {
					committed[seq] = now
				}
				if err != nil {
					errMu.Lock()
					firstErr = err
					errMu.Unlock()
				}
			}
		}()
	}
	start := time.Now()
	for seq := 0; seq < total; seq += perTx { // paced: the seq-th event is due at start + seq/rate
		if d := time.Until(start.Add(time.Duration(seq) * time.Second / time.Duration(rate))); d > 0 {
			time.Sleep(d)
		}
		jobs <- seq
	}
	close(jobs)
	wg.Wait()
	achieved := float64(total) / time.Since(start).Seconds()
	if firstErr != nil {
		return latencyResult{}, firstErr
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		arrivedMu.Lock()
		n := len(arrived)
		arrivedMu.Unlock()
		if n >= total {
			break
		}
		if time.Now().After(deadline) {
			return latencyResult{}, fmt.Errorf("%d of %d messages %s after 60s", n, total, map[bool]string{false: "acknowledged", true: "read"}[how.toConsumer])
		}
		time.Sleep(20 * time.Millisecond)
	}
	acks.mu.Lock()
	defer acks.mu.Unlock()
	if arrivedMu != &acks.mu {
		arrivedMu.Lock()
		defer arrivedMu.Unlock()
	}
	res := latencyResult{achieved: achieved, batches: acks.sends, perTx: perTx}
	for seq := rate; seq < total; seq++ { // the first second warms up
		res.lat = append(res.lat, arrived[seq].Sub(committed[seq]))
		res.toSend = append(res.toSend, acks.started[seq].Sub(committed[seq]))
	}
	return res, nil
}
