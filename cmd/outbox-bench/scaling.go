package main

import (
	"context"
	"fmt"
	"strings"
	"time"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
)

// scalingPart drains backlogs of growing depth, then one of 100k pending
// behind many published rows kept for retention, each in a fresh schema.
// The 10k drain, the base of the ratios, lasts a tenth of a second: one
// read 86k msg/s and the next 102k, minutes apart, so it runs five times
// and the base is their median.
func scalingPart(ctx context.Context, admin *gorm.DB, s settings, published int) error {
	const baseRuns = 5
	fmt.Printf("\n4. scaling: drain throughput by backlog depth (the 10k drain %d times, the base is its median)\n", baseRuns)
	payload := []byte(strings.Repeat("x", s.payloadBytes))
	var base float64
	step := func(pending, kept int) (steady float64, err error) {
		return steady, withSchema(admin, s.dsn, func(db *gorm.DB, _ string) error {
			if err := db.Use(outbox.Plugin()); err != nil {
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
			cluster, err := newBroker("bench")
			if err != nil {
				return err
			}
			defer cluster.Close()
			started := time.Now()
			rate, err := publisherDrain(ctx, db, cluster.ListenAddrs(), s, pending)
			if err != nil {
				return err
			}
			steady, err = steadyRate(db, started)
			if err != nil {
				return err
			}
			vsBase := ""
			if base > 0 {
				vsBase = fmt.Sprintf("  (%3.0f%% of the 10k rate)", 100*steady/base)
			}
			fmt.Printf("   %8d pending, %8d published kept: %8.0f msg/s from the start, %8.0f msg/s from the first batch's mark to the last's%s\n",
				pending, kept, rate, steady, vsBase)
			return nil
		})
	}
	var bases []float64
	for range baseRuns {
		steady, err := step(10_000, 0)
		if err != nil {
			return err
		}
		bases = append(bases, steady)
	}
	base = median(bases)
	fmt.Printf("      10k rate, median of %d: %.0f msg/s\n", baseRuns, base)
	for _, n := range []int{100_000, 1_000_000} {
		if _, err := step(n, 0); err != nil {
			return err
		}
	}
	_, err := step(100_000, published)
	return err
}

// steadyRate is the rate between the first and the last batch marked
// published after since: the drain without the publisher's start (new
// connections, the LISTEN) and the 20 ms steps in which publisherDrain
// looks for its end, which are most of a 10k drain's 0.2 s.
func steadyRate(db *gorm.DB, since time.Time) (float64, error) {
	var span struct{ First, Last time.Time }
	err := db.Raw("SELECT min(published_at) AS first, max(published_at) AS last FROM "+outbox.DefaultTableName+
		" WHERE state = 'published' AND published_at >= ?", since).Scan(&span).Error
	if err != nil {
		return 0, err
	}
	var after int64
	err = db.Raw("SELECT count(*) FROM "+outbox.DefaultTableName+" WHERE state = 'published' AND published_at > ?", span.First).Scan(&after).Error
	if err != nil {
		return 0, err
	}
	seconds := span.Last.Sub(span.First).Seconds()
	if seconds <= 0 {
		return 0, fmt.Errorf("the drain's marks span %.3fs", seconds)
	}
	return float64(after) / seconds, nil
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
