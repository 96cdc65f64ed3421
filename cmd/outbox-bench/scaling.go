package main

import (
	"context"
	"fmt"
	"strings"
	"time"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
)

// scalingPart drains backlogs of growing depth (s.depths: 10k, 100k and
// 1M by default), then the second of them (100k) behind many published
// rows kept for retention (s.published), each in a fresh schema.
// The 10k drain, the base of the ratios, lasts a tenth of a second and
// moves with the machine from one run to the next, so it runs five times
// and the base is their median. Every measured drain comes after a
// warm-up drain on the same pool and broker (see warmUp), and its steady
// rate runs from its first send to its last acknowledgement, which counts
// every worker's first batch alike.
// After each, the database ceiling drains the same depth from the same
// table (the published rows kept, in the last step), so that a deep
// backlog's slower drain can be told from the database's own.
func scalingPart(ctx context.Context, admin *gorm.DB, s settings) error {
	const baseRuns = 5
	baseDepth := s.depths[0]
	baseName := count(baseDepth)
	fmt.Printf("\n4. scaling: drain throughput by backlog depth (the %s drain %d times, the base is its median)\n", baseName, baseRuns)
	payload := []byte(strings.Repeat("x", s.payloadBytes))
	// The cost per message, beside the rate: the machine's CPU per message
	// (the hypervisor's steal left out) moves less with the neighbours than
	// the rate does. It includes the publisher's start, a larger share of
	// a 10k drain than of a deeper one.
	var base, baseCPU, ceilingBase float64
	step := func(pending, kept int) (steady, cpuPerMsg, ceiling float64, err error) {
		// The closure sets the named results; they are returned after it
		// has run (in "return steady, f()" Go leaves unspecified whether
		// steady is read before or after f).
		err = withSchema(admin, s.dsn, func(db *gorm.DB, _ string) error {
			if err := db.Use(outbox.Plugin()); err != nil {
				return err
			}
			cluster, err := newBroker("bench")
			if err != nil {
				return err
			}
			defer cluster.Close()
			if err := warmUp(ctx, db, cluster.ListenAddrs(), s, payload); err != nil {
				return err
			}
			if kept > 0 {
				if err := fillPublished(db, kept, len(payload)); err != nil {
					return err
				}
			}
			if err := fill(db, outbox.DefaultTableName, pending, s.keys, payload); err != nil {
				return err
			}
			var span time.Duration
			before := readWAL(db)
			rate, cpu, err := measured(func() (float64, error) { return publisherDrain(ctx, db, cluster.ListenAddrs(), s, pending, &span) })
			if err != nil {
				return err
			}
			wal := readWAL(db).since(before)
			steady = float64(pending) / span.Seconds()
			cpuPerMsg = us(cpu.machine) / float64(pending)
			vsBase := ""
			if base > 0 {
				vsBase = fmt.Sprintf("  (%3.0f%% of the %s rate; CPU a message %3.0f%% of the %s's)", 100*steady/base, baseName, 100*cpuPerMsg/baseCPU, baseName)
			}
			fmt.Printf("   %8d pending, %8d published kept: %8.0f msg/s from the start, %8.0f msg/s from the first send to the last acknowledgement%s\n",
				pending, kept, rate, steady, vsBase)
			fmt.Printf("      %.1f µs CPU/msg (%.1f in this process; %.2f cores stolen by the hypervisor); WAL: %.0f bytes a message; %d checkpoint(s) counted in pg_stat_bgwriter during the drain\n",
				cpuPerMsg, us(cpu.process)/float64(pending), cpu.stolenCores(), float64(wal.bytes)/float64(pending), wal.checkpoints)
			if kept == 0 { // the publisher's published rows out, the kept ones stay
				if err := db.Exec("TRUNCATE " + outbox.DefaultTableName).Error; err != nil {
					return err
				}
			}
			ceiling, cpu, err = ceilingDrain(ctx, db, s, pending, payload)
			if err != nil {
				return err
			}
			vsBase = ""
			if ceilingBase > 0 {
				vsBase = fmt.Sprintf(" (%3.0f%% of its %s rate)", 100*ceiling/ceilingBase, baseName)
			}
			fmt.Printf("      database alone (DELETE ... SKIP LOCKED ... RETURNING), same depth: %.0f msg/s%s, %.1f µs CPU/msg (%.2f cores stolen)\n",
				ceiling, vsBase, us(cpu.machine)/float64(pending), cpu.stolenCores())
			if base > 0 { // the base's five drains are summed up in one line after them
				record("scaling", fmt.Sprintf("%s pending, %s published kept", count(pending), count(kept)),
					fmt.Sprintf("the publisher's drain (%d workers, published rows kept) from its first send to its last acknowledgement, against the %s base (target: within 20%%); then the database alone draining the same depth, against its own %s base",
						s.workers, baseName, baseName),
					"%.0f msg/s, %.0f%% of the %s rate; database alone %.0f msg/s, %.0f%% of its %s rate",
					steady, 100*steady/base, baseName, ceiling, 100*ceiling/ceilingBase, baseName)
			}
			return nil
		})
		return steady, cpuPerMsg, ceiling, err
	}
	var bases, baseCPUs, ceilings []float64
	for range baseRuns {
		steady, cpuPerMsg, ceiling, err := step(baseDepth, 0)
		if err != nil {
			return err
		}
		bases, baseCPUs, ceilings = append(bases, steady), append(baseCPUs, cpuPerMsg), append(ceilings, ceiling)
	}
	base, baseCPU, ceilingBase = median(bases), median(baseCPUs), median(ceilings)
	fmt.Printf("      %s rate, median of %d: %.0f msg/s; CPU a message, median: %.1f µs; database alone, median: %.0f msg/s\n",
		baseName, baseRuns, base, baseCPU, ceilingBase)
	record("scaling", fmt.Sprintf("%s pending (the base)", baseName),
		fmt.Sprintf("the publisher's drain of the smallest backlog, median of %d, the base of the lines below; then the database alone's median", baseRuns),
		"%.0f msg/s, %.1f µs CPU/msg; database alone %.0f msg/s", base, baseCPU, ceilingBase)
	for _, n := range s.depths[1:] {
		if _, _, _, err := step(n, 0); err != nil {
			return err
		}
	}
	_, _, _, err := step(s.depths[min(1, len(s.depths)-1)], s.published)
	return err
}

// count names a number of messages the way the docs do: 10k, 1M.
func count(n int) string {
	switch {
	case n >= 1_000_000 && n%1_000_000 == 0:
		return fmt.Sprintf("%dM", n/1_000_000)
	case n >= 1000 && n%1000 == 0:
		return fmt.Sprintf("%dk", n/1000)
	}
	return fmt.Sprint(n)
}

// ceilingDrain fills the outbox table with n pending messages and drains
// them as the drain part's database ceiling does, after a drain of
// warmUpMessages not counted, as that part's ceiling has one: the first
// drain of a new (truncated) table is markedly slower than the later ones.
func ceilingDrain(ctx context.Context, db *gorm.DB, s settings, n int, payload []byte) (float64, cpuTime, error) {
	drain := func(n int) (float64, cpuTime, error) {
		if err := fill(db, outbox.DefaultTableName, n, s.keys, payload); err != nil {
			return 0, cpuTime{}, err
		}
		return measured(func() (float64, error) { return drainDB(ctx, db, outbox.DefaultTableName, s.batch, s.workers, n) })
	}
	if _, _, err := drain(warmUpMessages); err != nil {
		return 0, cpuTime{}, err
	}
	return drain(n)
}

// fillPublished writes n published rows, older than any pending one, in
// SQL: ids are UUIDv7 built from timestamps of the day before.
func fillPublished(db *gorm.DB, n, payloadBytes int) error {
	start := time.Now()
	const chunk = 1_000_000
	for done := 0; done < n; done += chunk {
		err := db.Exec(`INSERT INTO `+outbox.DefaultTableName+`
			(id, topic, message_key, payload, headers, state, attempts, last_error, next_attempt_at, created_at, published_at)
			SELECT (lpad(to_hex(ms), 12, '0') || '7' || substr(h, 1, 3) || '8' || substr(h, 4, 15))::uuid,
				'bench', 'k' || (i % 10000), convert_to(repeat('x', ?), 'UTF8'), '{}', 'published', 0, '', ts, ts, ts
			FROM (SELECT i, md5(i::text) AS h, now() - interval '1 day' + i * interval '1 microsecond' AS ts,
				(extract(epoch FROM now() - interval '1 day') * 1000)::bigint + i / 1000 AS ms
				FROM generate_series(?::bigint, ?::bigint) i) g`, payloadBytes, done, min(done+chunk, n)-1).Error
		if err != nil {
			return err
		}
	}
	fmt.Printf("   (wrote %d published rows in %.0fs)\n", n, time.Since(start).Seconds())
	return db.Exec("VACUUM ANALYZE " + outbox.DefaultTableName).Error
}

// walCounters are PostgreSQL's server-wide WAL position and checkpoint
// count. A deep backlog's drain writes enough WAL to start a checkpoint,
// after which the first change to each page writes the whole page to the
// WAL again: a cost of the database's settings (max_wal_size), not of the
// claim's work, which the scaling lines show beside the rates. The WAL is
// read from its position, not from pg_stat_wal, which each backend
// reports up to seconds later: a short drain would read little of its own
// WAL there and some of the drain's before it.
type walCounters struct{ bytes, checkpoints int64 }

func readWAL(db *gorm.DB) walCounters {
	var c walCounters
	row := db.Raw("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint, checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter").Row()
	_ = row.Scan(&c.bytes, &c.checkpoints) // zeros where the functions are not allowed
	return c
}

func (c walCounters) since(before walCounters) walCounters {
	return walCounters{c.bytes - before.bytes, c.checkpoints - before.checkpoints}
}
