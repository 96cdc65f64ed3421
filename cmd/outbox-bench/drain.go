package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/IBM/sarama"
	"github.com/google/uuid"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/kafka"
)

// drainPart measures the publisher's drain beside its two ceilings. Each
// line also gives the machine's CPU time per message (every process: Go,
// PostgreSQL, the in-process broker), because on a shared machine the two
// ceilings cannot both be reached at once: a relay pays for both. The
// machine's speed drifts within a minute, so every measurement runs once
// per round, the rounds interleaved, and each publisher line is paired
// with a drain of the database ceiling run just before it. A line gives
// the median of its rounds; a ratio is the publisher's median to the
// lower ceiling's median over all its drains in the run (one drain of the
// database ceiling moved by a third from one to the next, more than the
// publisher's rounds did), and each round's ratio to its paired drain
// shows the spread.
func drainPart(ctx context.Context, db *gorm.DB, dsn string, s settings) error {
	fmt.Printf("\n1. drain: %d pending messages, %d rounds, interleaved (medians)\n", s.n, s.rounds)
	part := fmt.Sprintf("drain, %s pending", count(s.n))
	cluster, err := newBroker("bench")
	if err != nil {
		return err
	}
	defer cluster.Close()
	if err := db.Use(outbox.Plugin()); err != nil {
		return err
	}
	deleting, closeDeleting, err := open(dsn)
	if err != nil {
		return err
	}
	defer closeDeleting()
	if err := deleting.Use(outbox.Plugin(outbox.WithoutMigration(), outbox.WithDeleteOnPublish())); err != nil {
		return err
	}
	payload := []byte(strings.Repeat("x", s.payloadBytes))
	addrs := cluster.ListenAddrs()

	type measure struct {
		name      string
		what      string // one line for -markdown
		publisher bool
		run       func() (float64, cpuTime, error)
	}
	measures := []measure{
		// Ceiling 1: the database alone, on a table of the same shape.
		{"ceiling, database alone (DELETE ... SKIP LOCKED ... RETURNING):",
			fmt.Sprintf("the backlog deleted and returned by %d goroutines, a batch at a time, nothing sent: the fastest the database drains this table", s.workers),
			false, func() (float64, cpuTime, error) {
				if err := fill(db, "bench_db", s.n, s.keys, payload); err != nil {
					return 0, cpuTime{}, err
				}
				return emptied(db, "bench_db")(measured(func() (float64, error) { return drainDB(ctx, db, "bench_db", s.batch, s.workers, s.n) }))
			}},
		// Ceiling 2: the broker alone, same producer settings.
		{"ceiling, broker alone (sarama SendMessages):",
			"as many messages of the same size sent with the Kafka sender's producer settings and no database: the fastest this broker takes them",
			false, func() (float64, cpuTime, error) {
				settle(db)
				return measured(func() (float64, error) { return produceOnly(addrs, s.batch, s.workers, s.n, s.keys, payload) })
			}},
	}
	// A reference, not a ceiling: the simplest relay, which keeps its
	// transaction open across the send. It has no lease (a stalled
	// process holds its rows until its connection dies) and no per-key
	// order across workers (SKIP LOCKED passes a key's locked head); what
	// the publisher pays beyond it is the price of those two.
	references := []int{1, 2}
	if s.quick {
		references = nil
	}
	for _, workers := range references {
		measures = append(measures, measure{fmt.Sprintf("reference, one transaction across the send, %d worker(s):", workers),
			"the simplest relay: lock a batch, send it, delete it, commit; no lease and no per-key order across workers", false,
			func() (float64, cpuTime, error) {
				if err := fill(db, "bench_db", s.n, s.keys, payload); err != nil {
					return 0, cpuTime{}, err
				}
				return emptied(db, "bench_db")(measured(func() (float64, error) { return drainHeld(ctx, db, addrs, "bench_db", s.batch, workers, s.n) }))
			}})
	}
	// The publisher, keeping published rows (the default), then deleting
	// them, with 1, 2 and -workers workers: on two cores more is not
	// always faster.
	sweep := []int{1, 2}
	if s.workers > 2 {
		sweep = append(sweep, s.workers)
	}
	if s.quick {
		sweep = []int{s.workers}
	}
	for _, workers := range sweep {
		for _, v := range []struct {
			name, what string
			db         *gorm.DB
		}{
			{"claim, send, mark published", "published rows kept (the default)", db},
			{"WithDeleteOnPublish: claim, send, delete", "each row deleted once acknowledged", deleting},
		} {
			if s.quick && v.db != deleting {
				continue
			}
			measures = append(measures, measure{fmt.Sprintf("publisher, %d worker(s), %s:", workers, v.name),
				fmt.Sprintf("the outbox's publisher draining the backlog to the broker, %s", v.what), true,
				func() (float64, cpuTime, error) {
					if err := fill(db, outbox.DefaultTableName, s.n, s.keys, payload); err != nil {
						return 0, cpuTime{}, err
					}
					run := s
					run.workers = workers
					return emptied(db, outbox.DefaultTableName)(measured(func() (float64, error) { return publisherDrain(ctx, v.db, addrs, run, s.n, nil) }))
				}})
		}
	}

	// The broker's log first grown to its retention, as a running
	// broker's is: until then the process's heap grows with it, and the
	// first round would pay for that growth.
	if _, err := produceOnly(addrs, s.batch, s.workers, retentionMessages(s.payloadBytes), s.keys, payload); err != nil {
		return fmt.Errorf("warming up: %w", err)
	}
	// A drain of the database ceiling first, not counted: the first drain
	// of a new table is markedly slower than the later ones, which would
	// make every first round's ratios high.
	if _, _, err := measures[0].run(); err != nil {
		return fmt.Errorf("warming up: %w", err)
	}
	// And the publisher's pools, whose workers' connections would
	// otherwise be new in the first round, beside a ceiling that has had
	// its warm-up (see warmUp).
	for _, pool := range []*gorm.DB{db, deleting} {
		if s.quick && pool != deleting {
			continue
		}
		if err := warmUp(ctx, pool, addrs, s, payload); err != nil {
			return fmt.Errorf("warming up: %w", err)
		}
	}
	// The database ceiling's line has each round's first drain and the
	// drains paired with the publisher's lines; paired[i] are those of
	// measure i, one a round.
	rates := make([][]float64, len(measures))
	cpus := make([][]cpuTime, len(measures))
	paired := make([][]float64, len(measures))
	run := func(i int) (float64, error) {
		rate, cpu, err := measures[i].run()
		if err != nil {
			return 0, fmt.Errorf("%s %w", measures[i].name, err)
		}
		rates[i] = append(rates[i], rate)
		cpus[i] = append(cpus[i], cpu)
		return rate, nil
	}
	for r := range s.rounds {
		fmt.Fprintf(os.Stderr, "   drain round %d of %d\n", r+1, s.rounds)
		for i, m := range measures {
			if m.publisher {
				ceiling, err := run(0)
				if err != nil {
					return err
				}
				paired[i] = append(paired[i], ceiling)
			}
			if _, err := run(i); err != nil {
				return err
			}
		}
	}
	perMsg := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1000 / float64(s.n) }
	for i, m := range measures {
		// busy is the cores the machine kept busy during a drain: a line
		// under the machine's core count left some idle.
		// stolen is the cores the hypervisor took meanwhile.
		n := len(cpus[i])
		machine, process, busy, stolen := make([]float64, n), make([]float64, n), make([]float64, n), make([]float64, n)
		for r, c := range cpus[i] {
			machine[r], process[r] = perMsg(c.machine), perMsg(c.process)
			busy[r] = c.machine.Seconds() * rates[i][r] / float64(s.n)
			stolen[r] = c.stolen.Seconds() * rates[i][r] / float64(s.n)
		}
		fmt.Printf("   %-72s %8.0f msg/s  (%.1f µs CPU/msg, %.1f of it here, %.1f cores busy, %.2f stolen; %s %s)\n", m.name, median(rates[i]), median(machine), median(process),
			median(busy), median(stolen), map[bool]string{true: "drains", false: "rounds"}[i == 0], thousands(rates[i]))
		record(part, m.name, m.what+fmt.Sprintf("; median of %d %s, and the machine's CPU a message (every process)", len(rates[i]), map[bool]string{true: "drains", false: "rounds"}[i == 0]),
			"%.0f msg/s, %.1f µs CPU/msg", median(rates[i]), median(machine))
		if m.publisher {
			ratios := make([]float64, s.rounds)
			for r := range s.rounds {
				ratios[r] = 100 * rates[i][r] / min(paired[i][r], rates[1][r])
			}
			fmt.Printf("      ratio to the lower ceiling: %.0f%% (target: at least 70%%); each round to the database ceiling drained just before it: %s\n",
				100*median(rates[i])/min(median(rates[0]), median(rates[1])), percents(ratios))
			record(part, strings.TrimSuffix(m.name, ":")+", ratio to the lower ceiling",
				"the line above's median over the lower of the two ceilings' medians (target: at least 70%); then each round's ratio to its paired database drain",
				"%.0f%% (rounds %s)", 100*median(rates[i])/min(median(rates[0]), median(rates[1])), percents(ratios))
			// The ratio is the cores it kept busy times what its CPU per
			// message would reach on all of them: this line tells which of
			// the two a shortfall comes from.
			if median(machine) > 0 { // 0 where /proc/stat cannot be read
				allBusy := make([]float64, s.rounds)
				for r := range s.rounds {
					allBusy[r] = 100 * float64(s.n) / cpus[i][r].machine.Seconds() * float64(runtime.NumCPU()) / min(median(rates[0]), rates[1][r])
				}
				fmt.Printf("      at its CPU per message with all %d cores busy: %.0f%% of the lower ceiling, rounds %s\n",
					runtime.NumCPU(), median(allBusy), percents(allBusy))
			}
		}
	}
	// Both ceilings' work on this machine's cores, with nothing else: the
	// CPU of every drain of the database ceiling (its median), and of each
	// round's broker ceiling.
	dbCPU := make([]float64, len(cpus[0]))
	for d, c := range cpus[0] {
		dbCPU[d] = c.machine.Seconds()
	}
	both := make([]float64, s.rounds)
	for r := range s.rounds {
		lower := min(median(rates[0]), rates[1][r])
		both[r] = 100 * float64(s.n) / (median(dbCPU) + cpus[1][r].machine.Seconds()) * float64(runtime.NumCPU()) / lower
	}
	fmt.Printf("   both ceilings' work on %d cores, if it were all CPU-bound: %.0f%% of the lower ceiling, rounds %s\n",
		runtime.NumCPU(), median(both), percents(both))
	record(part, "both ceilings' work on the machine's cores",
		"what a relay doing both ceilings' work at no cost of its own would reach if it kept every core busy: the most any relay can read here",
		"%.0f%% of the lower ceiling", median(both))
	return nil
}

// measured runs fn, a drain, and returns its rate and CPU time.
func measured(fn func() (float64, error)) (float64, cpuTime, error) {
	start := cpuNow()
	rate, err := fn()
	return rate, cpuNow().since(start), err
}

func percents(xs []float64) string { return each(xs, "%.0f%%", " ") }

// thousands prints rates in thousands per second: "92k 88k 95k".
func thousands(xs []float64) string {
	k := make([]float64, len(xs))
	for i, x := range xs {
		k[i] = x / 1000
	}
	return each(k, "%.0fk", " ")
}

// each formats every x with format and joins them with sep: one round's
// figure after another.
func each(xs []float64, format, sep string) string {
	out := make([]string, len(xs))
	for i, x := range xs {
		out[i] = fmt.Sprintf(format, x)
	}
	return strings.Join(out, sep)
}

// cpuTime is CPU time used by the whole machine and, of it, by this
// process (the Go side and the in-process broker); the rest is mostly
// PostgreSQL's. stolen is the time the hypervisor gave this machine's
// cores to other guests while they had work (steal in /proc/stat): not
// work done, so not in machine, but what a slow run lost to its neighbours.
// wall is the elapsed time.
type cpuTime struct{ machine, process, stolen, wall time.Duration }

// epoch anchors cpuTime's wall clock (monotonic).
var epoch = time.Now()

func cpuNow() cpuTime {
	var ru syscall.Rusage
	var process time.Duration
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) == nil {
		process = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	machine, stolen := machineCPU()
	return cpuTime{machine, process, stolen, time.Since(epoch)}
}

func (c cpuTime) since(start cpuTime) cpuTime {
	return cpuTime{c.machine - start.machine, c.process - start.process, c.stolen - start.stolen, c.wall - start.wall}
}

// stolenCores is how many of the machine's cores the hypervisor took, on
// average, over the span c measures.
func (c cpuTime) stolenCores() float64 {
	if c.wall <= 0 {
		return 0
	}
	return c.stolen.Seconds() / c.wall.Seconds()
}

// machineCPU is the CPU time all processes of the machine have used so
// far, and the time stolen from it by the hypervisor (0 where /proc/stat
// cannot be read). Steal is not counted as busy: it would make a message
// look costlier in the phases when the host takes more.
func machineCPU() (busy, stolen time.Duration) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	// cpu user nice system idle iowait irq softirq steal guest guest_nice;
	// guest time is already in user and nice.
	fields := strings.Fields(strings.SplitN(string(b), "\n", 2)[0])
	tick := func(i int) time.Duration {
		if i >= len(fields) {
			return 0
		}
		n, _ := strconv.ParseInt(fields[i], 10, 64)
		return time.Duration(n) * time.Second / 100 // USER_HZ
	}
	return tick(1) + tick(2) + tick(3) + tick(6) + tick(7), tick(8)
}

// publisherDrain starts a publisher on a filled outbox and returns its rate
// until no message is pending. span, if not nil, gets the time from the
// first send's start to the last acknowledgement.
func publisherDrain(ctx context.Context, db *gorm.DB, addrs []string, s settings, n int, span *time.Duration) (float64, error) {
	return drainThrough(ctx, db, addrs, s, n, span, atLeastOnce)
}

// drainThrough is publisherDrain with the sender newSender makes: the
// at-least-once one or the exactly-once one.
func drainThrough(ctx context.Context, db *gorm.DB, addrs []string, s settings, n int, span *time.Duration, newSender senderMaker) (float64, error) {
	sender, err := newSender(addrs, s)
	if err != nil {
		return 0, err
	}
	defer sender.Close()
	// The end is found by counting acknowledgements (in exactly-once mode,
	// committed transactions), then by stopping the publisher, which
	// returns once the results of every batch sent are recorded; the table
	// is asked only after the clock stops. Asking it for a pending row
	// while the clock runs steps over the index entries of every row
	// drained so far, a cost the database ceiling, ending on its own empty
	// DELETE, does not pay.
	var acked atomic.Int64
	var firstSend, lastAck atomic.Int64 // unix nanoseconds
	counting := observed(sender, sendHooks{
		before: func([]*outbox.OutboxMessage) { firstSend.CompareAndSwap(0, time.Now().UnixNano()) },
		after: func(msgs []*outbox.OutboxMessage, err error) {
			var partial *outbox.SendError
			switch {
			case err == nil:
				acked.Add(int64(len(msgs)))
			case errors.As(err, &partial):
				acked.Add(int64(len(msgs) - len(partial.Failed)))
			}
			for now, last := time.Now().UnixNano(), lastAck.Load(); now > last && !lastAck.CompareAndSwap(last, now); last = lastAck.Load() {
			}
		},
	})
	pub, err := outbox.NewPublisher(db, counting, outbox.WithBatchSize(s.batch), outbox.WithWorkers(s.workers),
		outbox.WithLogger(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))))
	if err != nil {
		return 0, err
	}
	start := time.Now()
	if err := pub.Start(ctx); err != nil {
		return 0, err
	}
	defer func() { _ = pub.Stop(ctx) }() // after an early return; the drain's own Stop below reports its error
	for acked.Load() < int64(n) && ctx.Err() == nil {
		time.Sleep(time.Millisecond)
	}
	if err := pub.Stop(ctx); err != nil {
		return 0, err
	}
	elapsed := time.Since(start)
	var left int64
	if err := db.Raw("SELECT count(*) FROM " + outbox.DefaultTableName + " WHERE state = 'pending'").Scan(&left).Error; err != nil {
		return 0, err
	}
	if left > 0 {
		return 0, fmt.Errorf("%d messages still pending after all %d were acknowledged and the publisher stopped", left, n)
	}
	if span != nil {
		*span = time.Duration(lastAck.Load() - firstSend.Load())
	}
	return float64(n) / elapsed.Seconds(), nil
}

// warmUp drains a backlog of warmUpMessages through the pool and the broker
// that the measured drains will use, then empties the table. A first drain
// pays for what a publisher pays once: the pool's new connections (pgx
// prepares each statement on each connection) and the new broker's first
// batches: a large share of a small drain's time, next to nothing of a
// deep one's, so it would bend the scaling part's ratios.
func warmUp(ctx context.Context, db *gorm.DB, addrs []string, s settings, payload []byte) error {
	return warmUpWith(ctx, db, addrs, s, payload, atLeastOnce)
}

// warmUpWith is warmUp through the sender newSender makes.
func warmUpWith(ctx context.Context, db *gorm.DB, addrs []string, s settings, payload []byte, newSender senderMaker) error {
	if err := fill(db, outbox.DefaultTableName, warmUpMessages, s.keys, payload); err != nil {
		return err
	}
	if _, err := drainThrough(ctx, db, addrs, s, warmUpMessages, nil, newSender); err != nil {
		return err
	}
	return db.Exec("TRUNCATE " + outbox.DefaultTableName).Error
}

const warmUpMessages = 10_000

// emptied returns a drain's results once table is truncated: every drain
// starts from a new table, not from the dead rows of the drains before it.
func emptied(db *gorm.DB, table string) func(float64, cpuTime, error) (float64, cpuTime, error) {
	return func(rate float64, cpu cpuTime, err error) (float64, cpuTime, error) {
		if err != nil {
			return 0, cpu, err
		}
		return rate, cpu, db.Exec("TRUNCATE " + table).Error
	}
}

// fill writes n pending messages with the outbox's own multi-row insert,
// after a settle: the fill and the drain after it write their WAL since
// the same checkpoint.
func fill(db *gorm.DB, table string, n, keys int, payload []byte) error {
	settle(db)
	if table != outbox.DefaultTableName {
		stmts, err := outbox.DDL("postgres", table)
		if err != nil {
			return err
		}
		for _, s := range stmts {
			if err := db.Exec(s).Error; err != nil {
				return err
			}
		}
	}
	store, err := outbox.NewStore(db, outbox.WithTableName(table), outbox.WithNotifyInterval(0))
	if err != nil {
		return err
	}
	if err := saveBacklog(db, store, n, keys, payload); err != nil {
		return err
	}
	return db.Exec("ANALYZE " + table).Error
}

// saveBacklog writes n pending messages through store, 5,000 a
// transaction, keyed over keys keys.
func saveBacklog(db *gorm.DB, store outbox.Store, n, keys int, payload []byte) error {
	const chunk = 5000
	for done := 0; done < n; done += chunk {
		err := db.Transaction(func(tx *gorm.DB) error {
			var msgs []*outbox.OutboxMessage
			now := time.Now().UTC()
			for i := done; i < min(done+chunk, n); i++ {
				id, _ := uuid.NewV7()
				msgs = append(msgs, &outbox.OutboxMessage{ID: id, Topic: "bench", Key: fmt.Sprint("k", i%keys), Payload: payload,
					Headers: outbox.Headers{}, State: outbox.StatePending, NextAttemptAt: now, CreatedAt: now})
			}
			return store.Save(context.Background(), tx, msgs...)
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// drainDB is the simplest correct drain of a queue table: delete a batch of
// the oldest rows, skipping those another worker holds, and return them.
func drainDB(ctx context.Context, db *gorm.DB, table string, batch, workers, n int) (float64, error) {
	sql := `DELETE FROM ` + table + ` WHERE id IN (SELECT id FROM ` + table + ` WHERE state = 'pending' ORDER BY id LIMIT ? FOR UPDATE SKIP LOCKED)
		RETURNING id, topic, message_key, payload, headers`
	return drainWith(workers, n, func() (int, error) {
		var rows []outbox.OutboxMessage
		err := db.WithContext(ctx).Raw(sql, batch).Scan(&rows).Error
		return len(rows), err
	})
}

// drainHeld relays the table with one transaction per batch held open
// across the send: lock the oldest rows, send them, delete them, commit.
func drainHeld(ctx context.Context, db *gorm.DB, addrs []string, table string, batch, workers, n int) (float64, error) {
	p, err := sarama.NewSyncProducer(addrs, kafka.NewConfig())
	if err != nil {
		return 0, err
	}
	defer p.Close()
	lock := `SELECT id, topic, message_key, payload, headers FROM ` + table +
		` WHERE state = 'pending' ORDER BY id LIMIT ? FOR UPDATE SKIP LOCKED`
	return drainWith(workers, n, func() (int, error) {
		var rows []outbox.OutboxMessage
		err := db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
			if err := tx.Raw(lock, batch).Scan(&rows).Error; err != nil || len(rows) == 0 {
				return err
			}
			msgs := make([]*sarama.ProducerMessage, len(rows))
			ids := make([]uuid.UUID, len(rows))
			for i, r := range rows {
				msgs[i] = &sarama.ProducerMessage{Topic: r.Topic, Key: sarama.StringEncoder(r.Key), Value: sarama.ByteEncoder(r.Payload),
					Headers: []sarama.RecordHeader{{Key: []byte(kafka.MessageIDHeader), Value: []byte(r.ID.String())}}}
				ids[i] = r.ID
			}
			if err := p.SendMessages(msgs); err != nil {
				return err
			}
			return tx.Exec("DELETE FROM "+table+" WHERE id IN ?", ids).Error
		})
		return len(rows), err
	})
}

// drainWith runs batch from workers goroutines until n messages are
// drained or a batch finds none, and returns the rate.
func drainWith(workers, n int, batch func() (int, error)) (float64, error) {
	var drained atomic.Int64
	var wg sync.WaitGroup
	var firstErr atomic.Value
	start := time.Now()
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for drained.Load() < int64(n) {
				got, err := batch()
				if err != nil {
					firstErr.Store(err)
					return
				}
				if got == 0 {
					return
				}
				drained.Add(int64(got))
			}
		}()
	}
	wg.Wait()
	if err, ok := firstErr.Load().(error); ok {
		return 0, err
	}
	return float64(drained.Load()) / time.Since(start).Seconds(), nil
}

// produceOnly sends n messages of the same shape with the publisher's
// producer settings and no database.
func produceOnly(addrs []string, batch, workers, n, keys int, payload []byte) (float64, error) {
	p, err := sarama.NewSyncProducer(addrs, kafka.NewConfig())
	if err != nil {
		return 0, err
	}
	defer p.Close()
	var sent atomic.Int64
	var wg sync.WaitGroup
	var firstErr atomic.Value
	start := time.Now()
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				if sent.Add(int64(batch)) > int64(n)+int64(batch) {
					return
				}
				msgs := make([]*sarama.ProducerMessage, batch)
				for j := range msgs {
					msgs[j] = &sarama.ProducerMessage{Topic: "bench", Key: sarama.StringEncoder(fmt.Sprint("k", (w*batch+j)%keys)),
						Value: sarama.ByteEncoder(payload), Headers: []sarama.RecordHeader{{Key: []byte(kafka.MessageIDHeader), Value: []byte(uuid.NewString())}}}
				}
				if err := p.SendMessages(msgs); err != nil {
					firstErr.Store(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if err, ok := firstErr.Load().(error); ok {
		return 0, err
	}
	return float64(min(sent.Load(), int64(n))) / time.Since(start).Seconds(), nil
}
