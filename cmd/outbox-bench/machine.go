package main

import (
	"crypto/sha256"
	"fmt"
	"slices"
	"time"

	"gorm.io/gorm"
)

// machineSpeed measures two things that differ from one day's machine to
// the next and move the benchmark's ratios: how fast one core hashes (the
// Go side: the publisher, sarama, the in-process broker) and how long a
// round trip to PostgreSQL takes (every statement, and on a virtual
// machine the cost of the context switches it needs). Printed with the
// conditions, they tell whether two runs ran on comparable machines.
func machineSpeed(db *gorm.DB) string {
	buf := make([]byte, 1<<20)
	var hashes []time.Duration
	for range 5 {
		start := time.Now()
		for range 16 {
			sha256.Sum256(buf)
		}
		hashes = append(hashes, time.Since(start))
	}
	slices.Sort(hashes)
	mbps := 16 / hashes[len(hashes)/2].Seconds()

	sqlDB, err := db.DB()
	if err != nil {
		return fmt.Sprintf("sha256 %.0f MB/s on one core", mbps)
	}
	var trips []time.Duration
	for range 200 {
		start := time.Now()
		if _, err := sqlDB.Exec("SELECT 1"); err != nil {
			return fmt.Sprintf("sha256 %.0f MB/s on one core; SELECT 1: %v", mbps, err)
		}
		trips = append(trips, time.Since(start))
	}
	slices.Sort(trips)
	return fmt.Sprintf("sha256 %.0f MB/s on one core; PostgreSQL round trip (SELECT 1) p50 %.0f µs, p90 %.0f µs",
		mbps, us(trips[len(trips)/2]), us(trips[len(trips)*9/10]))
}
