package main

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"gorm.io/driver/postgres"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/pgxpipeline"
)

// benchOrder is the domain row of the enqueue part.
type benchOrder struct {
	ID       int64 `gorm:"primaryKey"`
	Customer string
	Amount   int64
	Created  time.Time
}

// benchAudit is the table of the reference variant: a bare second INSERT.
type benchAudit struct {
	ID      int64 `gorm:"primaryKey"`
	OrderID int64
	Note    string
}

type orderPlaced struct {
	OrderID  int64  `json:"order_id"`
	Customer string `json:"customer"`
	Amount   int64  `json:"amount"`
}

// enqueuePart measures what one event adds to a one-row transaction, at
// s.writers concurrent writers, with the NOTIFY on (the default).
func enqueuePart(ctx context.Context, db *gorm.DB, dsn string, s settings) error {
	rounds := s.enqueueRounds
	roundSeconds := max(1, s.seconds/5)
	fmt.Printf("\n3. enqueue: one-row transactions per second, %d writers, %d rounds of %ds per variant, interleaved (medians)\n",
		s.writers, rounds, roundSeconds)
	if err := db.Use(outbox.Plugin()); err != nil {
		return err
	}
	if err := db.AutoMigrate(&benchOrder{}, &benchAudit{}); err != nil {
		return err
	}
	// The same outbox seen by a plugin whose enqueues send no NOTIFY.
	quiet, closeQuiet, err := open(dsn)
	if err != nil {
		return err
	}
	defer closeQuiet()
	if err := quiet.Use(outbox.Plugin(outbox.WithoutMigration(), outbox.WithNotifyInterval(0))); err != nil {
		return err
	}
	// The same outbox through the driver that sends the event with the COMMIT.
	pipelined, closePipelined, err := openWith(postgres.New(postgres.Config{DriverName: pgxpipeline.DriverName, DSN: dsn}))
	if err != nil {
		return err
	}
	defer closePipelined()
	if err := pipelined.Use(outbox.Plugin(outbox.WithoutMigration())); err != nil {
		return err
	}
	domainOnly := func(tx *gorm.DB) error {
		return tx.Create(&benchOrder{Customer: "c", Amount: 42, Created: time.Now()}).Error
	}
	withEvent := func(tx *gorm.DB) error {
		o := benchOrder{Customer: "c", Amount: 42, Created: time.Now()}
		if err := tx.Create(&o).Error; err != nil {
			return err
		}
		return outbox.Enqueue(tx, outbox.Message{Topic: "orders", Key: fmt.Sprint(o.ID), Payload: orderPlaced{o.ID, o.Customer, o.Amount}})
	}
	variants := []struct {
		name, what string // what: one line for -markdown
		db         *gorm.DB
		tx         func(tx *gorm.DB) error
	}{
		{"domain row only", "a one-row domain transaction through pgx's driver, GORM's default: the base of the next three", db, domainOnly},
		{"domain row + one event", "the same with outbox.Enqueue of one event (NOTIFY on, the default); the percentage is the time it adds to a transaction (target: at most 25%)", db, withEvent},
		{"domain row + one event, no NOTIFY", "the same through a plugin WithNotifyInterval(0)", quiet, withEvent},
		{"domain row + bare INSERT (reference)", "the same with a bare second INSERT of two small columns instead of the event: what any second statement costs", db, func(tx *gorm.DB) error {
			o := benchOrder{Customer: "c", Amount: 42, Created: time.Now()}
			if err := tx.Create(&o).Error; err != nil {
				return err
			}
			return tx.Exec("INSERT INTO bench_audits (order_id, note) VALUES (?, ?)", o.ID, "placed").Error
		}},
		{"pgxpipeline: domain row only", "the one-row domain transaction through the pgxpipeline driver: the base of the next", pipelined, domainOnly},
		{"pgxpipeline: domain row + one event", "the same with one event, whose INSERT goes with the COMMIT (target: at most 25%)", pipelined, withEvent},
	}
	const pipelinedBase = 4 // the variants from here on compare with this one
	// The machine is shared and noisy: the variants run in short rounds,
	// interleaved, every other round in reverse order (so that a drift of
	// the machine's speed within a round favours no variant), and each
	// overhead is the median of its rounds' ratios to the domain-only rate
	// of the same round: a few long rounds in one order move with the
	// machine more than the event's cost does.
	rates := make([][]float64, len(variants))
	cpu := make([][]cpuTime, len(variants)) // per transaction
	var stolen []float64                    // cores the hypervisor took, each variant's round
	round := s
	round.seconds = roundSeconds
	for r := range rounds {
		settle(db)
		for j := range variants {
			i := j
			if r%2 == 1 {
				i = len(variants) - 1 - j
			}
			v := variants[i]
			var n int64
			rate, c, err := measured(func() (float64, error) { return txRate(ctx, v.db, round, v.tx, &n) })
			if err != nil {
				return fmt.Errorf("%s: %w", v.name, err)
			}
			rates[i] = append(rates[i], rate)
			stolen = append(stolen, c.stolenCores())
			cpu[i] = append(cpu[i], cpuTime{machine: c.machine / time.Duration(n), process: c.process / time.Duration(n)})
		}
	}
	var overhead, pipelinedOverhead []float64
	for i, v := range variants {
		base := 0
		if i >= pipelinedBase {
			base = pipelinedBase
		}
		extra := ""
		if i != base {
			var ratios []float64
			for r := range rounds {
				ratios = append(ratios, 100*(rates[base][r]/rates[i][r]-1))
			}
			sort.Float64s(ratios)
			extra = fmt.Sprintf("  (%+.0f%% time per transaction; rounds %+.0f%% to %+.0f%%)", ratios[rounds/2], ratios[0], ratios[rounds-1])
			switch i {
			case 1:
				overhead = ratios
			case pipelinedBase + 1:
				pipelinedOverhead = ratios
			}
		}
		fmt.Printf("   %-42s %7.0f tx/s%s\n", v.name, median(rates[i]), extra)
		record("enqueue", v.name, fmt.Sprintf("%s; %d writers, median of %d rounds", v.what, s.writers, rounds), "%.0f tx/s%s", median(rates[i]), extra)
	}
	// The machine's CPU time per transaction, split as in the drain: it
	// tells the Go side's cost from the database's, which the rates cannot.
	for i, v := range variants {
		c := medianCPU(cpu[i])
		if i == 0 || i == pipelinedBase {
			fmt.Printf("   CPU per transaction (medians), %s: %.0f µs (%.0f in this process)\n", v.name, us(c.machine), us(c.process))
			continue
		}
		base := medianCPU(cpu[0])
		if i > pipelinedBase {
			base = medianCPU(cpu[pipelinedBase])
		}
		fmt.Printf("      %-42s +%.0f µs (+%.0f in this process, +%.0f elsewhere, mostly PostgreSQL)\n", v.name,
			us(c.machine-base.machine), us(c.process-base.process), us((c.machine-c.process)-(base.machine-base.process)))
	}
	fmt.Printf("   cores stolen by the hypervisor meanwhile: median %.2f, at most %.2f of a round\n", median(stolen), slices.Max(stolen))
	fmt.Printf("   overhead of one event: %.0f%% with GORM's default driver, %.0f%% with pgxpipeline (target: at most 25%%)\n",
		overhead[rounds/2], pipelinedOverhead[rounds/2])

	// One transaction with 500 events, enqueued in one call: one multi-row INSERT.
	var times []time.Duration
	for range 20 {
		msgs := make([]outbox.Message, 500)
		for i := range msgs {
			msgs[i] = outbox.Message{Topic: "orders", Key: fmt.Sprint(i), Payload: orderPlaced{int64(i), "c", 42}}
		}
		start := time.Now()
		if err := db.Transaction(func(tx *gorm.DB) error { return outbox.Enqueue(tx, msgs...) }); err != nil {
			return err
		}
		times = append(times, time.Since(start))
	}
	sort.Slice(times, func(i, j int) bool { return times[i] < times[j] })
	med := times[len(times)/2]
	fmt.Printf("   one transaction of 500 events: median %.1f ms (%.0f events/s)\n", float64(med.Microseconds())/1000, 500/med.Seconds())
	record("enqueue", "one transaction of 500 events", "one Enqueue call of 500 events (one multi-row INSERT) and its commit, alone; median of 20",
		"%.1f ms (%.0f events/s)", float64(med.Microseconds())/1000, 500/med.Seconds())
	return nil
}

// txRate runs tx in transactions from s.writers goroutines for s.seconds,
// and counts them in *n.
func txRate(ctx context.Context, db *gorm.DB, s settings, tx func(tx *gorm.DB) error, n *int64) (float64, error) {
	var done atomic.Int64
	var firstErr atomic.Value
	stop := time.Now().Add(time.Duration(s.seconds) * time.Second)
	var wg sync.WaitGroup
	start := time.Now()
	for range s.writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(stop) {
				if err := db.WithContext(ctx).Transaction(tx); err != nil {
					firstErr.Store(err)
					return
				}
				done.Add(1)
			}
		}()
	}
	wg.Wait()
	if err, ok := firstErr.Load().(error); ok {
		return 0, err
	}
	*n = max(1, done.Load())
	return float64(done.Load()) / time.Since(start).Seconds(), nil
}

func us(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1000 }

// medianCPU is the median of each part of cs, separately.
func medianCPU(cs []cpuTime) cpuTime {
	var m, p []float64
	for _, c := range cs {
		m, p = append(m, float64(c.machine)), append(p, float64(c.process))
	}
	return cpuTime{machine: time.Duration(median(m)), process: time.Duration(median(p))}
}

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	return s[len(s)/2]
}
