package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"strconv"
	"sync"
	"time"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/kafka"
)

const seqHeader = "bench-seq"

// ackTimes wraps the Kafka sender and notes when each message's first send
// started and when it was acknowledged.
type ackTimes struct {
	inner   outbox.Sender
	mu      sync.Mutex
	acked   map[int]time.Time
	started map[int]time.Time
	sends   int
}

func (a *ackTimes) Send(ctx context.Context, msgs []*outbox.OutboxMessage) error {
	st := time.Now()
	a.mu.Lock()
	a.sends++
	for _, m := range msgs {
		if seq, perr := strconv.Atoi(m.Headers[seqHeader]); perr == nil {
			if _, seen := a.started[seq]; !seen {
				a.started[seq] = st
			}
		}
	}
	a.mu.Unlock()
	err := a.inner.Send(ctx, msgs)
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
	return err
}

// latencyPart measures commit-to-acknowledgement at steady rates. The
// publisher runs on a *gorm.DB of its own, as in another process, so that
// only the NOTIFY (or the poll) can tell it of a commit.
func latencyPart(ctx context.Context, admin *gorm.DB, s settings) error {
	fmt.Printf("\n2. latency: commit to Kafka acknowledgement, %d writers, %ds per rate (first second left out)\n", s.writers, s.seconds)
	for _, rate := range s.rates {
		for _, mode := range []string{"wake-up", "poll only"} {
			err := withSchema(admin, s.dsn, func(db *gorm.DB, dsn string) error {
				return latencyRun(ctx, db, dsn, s, rate, mode == "wake-up", mode)
			})
			if err != nil {
				return err
			}
		}
	}
	return nil
}

func latencyRun(ctx context.Context, db *gorm.DB, dsn string, s settings, rate int, wake bool, mode string) error {
	var opts []outbox.Option
	var popts []outbox.PublisherOption
	if !wake {
		opts = append(opts, outbox.WithNotifyInterval(0))
		popts = append(popts, outbox.WithoutListen())
	}
	if err := db.Use(outbox.Plugin(opts...)); err != nil {
		return err
	}
	settle(db)
	pubDB, closeDB, err := open(dsn)
	if err != nil {
		return err
	}
	defer closeDB()
	if err := pubDB.Use(outbox.Plugin(outbox.WithoutMigration())); err != nil {
		return err
	}
	cluster, err := newBroker("latency")
	if err != nil {
		return err
	}
	defer cluster.Close()
	sender, err := kafka.NewSender(cluster.ListenAddrs(), nil)
	if err != nil {
		return err
	}
	defer sender.Close()
	acks := &ackTimes{inner: sender, acked: map[int]time.Time{}, started: map[int]time.Time{}}
	pub, err := outbox.NewPublisher(pubDB, acks, append(popts, outbox.WithBatchSize(s.batch), outbox.WithWorkers(s.workers),
		outbox.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))...)
	if err != nil {
		return err
	}
	if err := pub.Start(ctx); err != nil {
		return err
	}
	defer pub.Stop(ctx)

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
			for seq := range jobs {
				err := db.Transaction(func(tx *gorm.DB) error {
					return outbox.Enqueue(tx, outbox.Message{Topic: "latency", Key: strconv.Itoa(seq % s.keys),
						Payload: []byte("event"), Headers: map[string]string{seqHeader: strconv.Itoa(seq)}})
				})
				committed[seq] = time.Now()
				if err != nil {
					errMu.Lock()
					firstErr = err
					errMu.Unlock()
				}
			}
		}()
	}
	start := time.Now()
	for seq := range total { // paced: the seq-th event is due at start + seq/rate
		if d := time.Until(start.Add(time.Duration(seq) * time.Second / time.Duration(rate))); d > 0 {
			time.Sleep(d)
		}
		jobs <- seq
	}
	close(jobs)
	wg.Wait()
	achieved := float64(total) / time.Since(start).Seconds()
	if firstErr != nil {
		return firstErr
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		acks.mu.Lock()
		n := len(acks.acked)
		acks.mu.Unlock()
		if n == total {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d of %d messages acknowledged after 60s", n, total)
		}
		time.Sleep(20 * time.Millisecond)
	}
	var lat, toSend []time.Duration
	for seq := rate; seq < total; seq++ { // the first second warms up
		lat = append(lat, acks.acked[seq].Sub(committed[seq]))
		toSend = append(toSend, acks.started[seq].Sub(committed[seq]))
	}
	sort.Slice(toSend, func(i, j int) bool { return toSend[i] < toSend[j] })
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	q := func(f float64) float64 { return float64(lat[int(f*float64(len(lat)-1))].Microseconds()) / 1000 }
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	fmt.Printf("   %5d/s (achieved %5.0f/s) %-9s  p50 %6.1f ms  p99 %6.1f ms  max %7.1f ms  (commit to send p50 %.1f p99 %.1f ms; %d batches)\n",
		rate, achieved, mode, q(0.5), q(0.99), q(1), ms(toSend[len(toSend)/2]), ms(toSend[len(toSend)*99/100]), acks.sends)
	return nil
}
