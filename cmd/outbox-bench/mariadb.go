package main

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/IBM/sarama"
	mysqldriver "github.com/go-sql-driver/mysql"
	"github.com/google/uuid"
	"gorm.io/driver/mysql"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/kafka"
)

// mariadbPart measures the publisher's drain on MariaDB beside two
// references taken in the same run, for each mode (published rows deleted,
// or kept): the simplest correct relay (one transaction per batch: lock the
// oldest pending rows FOR UPDATE SKIP LOCKED, send them, delete them or
// mark them published, commit) and MariaDB alone (the same loop without
// the send). Then the backlog's scaling: s.mariadbDepths drained by the
// publisher, each ratio to the first.
func mariadbPart(ctx context.Context, s settings) error {
	admin, err := gorm.Open(mysql.Open(s.mariadbDSN), &gorm.Config{Logger: logger.Discard})
	if err != nil {
		return err
	}
	defer func() {
		if sqlDB, err := admin.DB(); err == nil {
			sqlDB.Close()
		}
	}()
	var version string
	if err := admin.Raw("SELECT VERSION()").Scan(&version).Error; err != nil {
		return err
	}
	n := s.mariadbN
	var bufferPool int64
	if err := admin.Raw("SELECT @@innodb_buffer_pool_size").Scan(&bufferPool).Error; err != nil {
		return err
	}
	fmt.Printf("\n5. MariaDB %s (innodb_buffer_pool_size %d MiB): drain of %d pending messages, batch %d, %d rounds, interleaved (medians)\n",
		version, bufferPool>>20, n, s.batch, s.rounds)
	part := fmt.Sprintf("MariaDB drain, %s pending", count(n))
	record(part, "server", "the MariaDB server the part ran on", "%s, innodb_buffer_pool_size %d MiB", version, bufferPool>>20)
	dsn, drop, err := newMariaDBDatabase(admin, s.mariadbDSN)
	if err != nil {
		return err
	}
	defer drop()
	keep, closeKeep, err := openWith(mysql.Open(dsn))
	if err != nil {
		return err
	}
	defer closeKeep()
	if err := keep.Use(outbox.Plugin()); err != nil {
		return err
	}
	deleting, closeDeleting, err := openWith(mysql.Open(dsn))
	if err != nil {
		return err
	}
	defer closeDeleting()
	if err := deleting.Use(outbox.Plugin(outbox.WithoutMigration(), outbox.WithDeleteOnPublish())); err != nil {
		return err
	}
	cluster, err := newBroker("bench")
	if err != nil {
		return err
	}
	defer cluster.Close()
	addrs := cluster.ListenAddrs()
	payload := []byte(strings.Repeat("x", s.payloadBytes))
	if _, err := produceOnly(addrs, s.batch, s.workers, retentionMessages(s.payloadBytes), s.keys, payload); err != nil {
		return fmt.Errorf("warming up: %w", err)
	}

	type measure struct {
		name, what string
		mode       string // "delete" or "keep"
		publisher  bool
		run        func() (float64, error)
	}
	drained := func(run func() (float64, error)) func() (float64, error) {
		return func() (float64, error) {
			if err := fillMariaDB(keep, n, s.keys, payload); err != nil {
				return 0, err
			}
			rate, err := run()
			if err != nil {
				return 0, err
			}
			return rate, keep.Exec("TRUNCATE " + outbox.DefaultTableName).Error
		}
	}
	var measures []measure
	for _, mode := range []string{"delete", "keep"} {
		measures = append(measures,
			measure{fmt.Sprintf("MariaDB alone, %s, %d workers:", mode, s.workers),
				"one READ COMMITTED transaction per batch: lock the oldest pending rows (FOR UPDATE SKIP LOCKED), " + modeWords(mode) + ", commit; nothing sent", mode, false,
				drained(func() (float64, error) { return relayMariaDB(ctx, keep, nil, mode, s.batch, s.workers, n) })},
			measure{fmt.Sprintf("simplest relay, %s, %d workers:", mode, s.workers),
				"the same loop with the batch sent to the broker before the commit: no lease, no per-key order across workers", mode, false,
				drained(func() (float64, error) { return relayMariaDB(ctx, keep, addrs, mode, s.batch, s.workers, n) })})
	}
	for _, workers := range []int{2, s.workers} {
		for _, mode := range []string{"delete", "keep"} {
			pool := keep
			if mode == "delete" {
				pool = deleting
			}
			run := s
			run.workers = workers
			measures = append(measures, measure{fmt.Sprintf("publisher, %s, %d workers:", mode, workers),
				"the outbox's publisher draining the backlog to the broker, " + modeWords(mode), mode, true,
				drained(func() (float64, error) { return publisherDrain(ctx, pool, addrs, run, n, nil) })})
		}
		if s.workers == 2 {
			break
		}
	}
	// Every pool's first drain, not counted: new connections and the
	// first batches of a new table.
	for _, m := range measures {
		if _, err := m.run(); err != nil {
			return fmt.Errorf("warming up %s %w", m.name, err)
		}
	}
	rates := make([][]float64, len(measures))
	for r := range s.rounds {
		fmt.Fprintf(os.Stderr, "   MariaDB drain round %d of %d\n", r+1, s.rounds)
		for i, m := range measures {
			rate, err := m.run()
			if err != nil {
				return fmt.Errorf("%s %w", m.name, err)
			}
			rates[i] = append(rates[i], rate)
		}
	}
	reference := func(prefix, mode string) float64 {
		for i, m := range measures {
			if strings.HasPrefix(m.name, prefix) && m.mode == mode {
				return median(rates[i])
			}
		}
		return 0
	}
	for i, m := range measures {
		fmt.Printf("   %-42s %8.0f msg/s  (rounds %s)\n", m.name, median(rates[i]), thousands(rates[i]))
		record(part, strings.TrimSuffix(m.name, ":"), m.what+fmt.Sprintf("; median of %d rounds", s.rounds), "%.0f msg/s", median(rates[i]))
		if !m.publisher {
			continue
		}
		relay, alone := reference("simplest relay", m.mode), reference("MariaDB alone", m.mode)
		fmt.Printf("      %.2f× the simplest relay (target: at least 0.7×), %.2f× MariaDB alone (target: at least 0.6×)\n",
			median(rates[i])/relay, median(rates[i])/alone)
		record(part, strings.TrimSuffix(m.name, ":")+", ratios",
			"the line above over the simplest relay's and MariaDB alone's medians, same mode (targets: at least 0.7× and 0.6×)",
			"%.2f× the simplest relay, %.2f× MariaDB alone", median(rates[i])/relay, median(rates[i])/alone)
	}
	return mariadbScaling(ctx, deleting, keep, addrs, s, payload)
}

// mariadbScaling drains s.mariadbDepths pending messages with the
// publisher (published rows deleted, s.workers workers), then the simplest
// relay and MariaDB alone drain the same depth, so that a deep backlog's
// slower drain can be told from the server's and the machine's own; the
// first depth, the base, five times and the medians taken.
func mariadbScaling(ctx context.Context, deleting, keep *gorm.DB, addrs []string, s settings, payload []byte) error {
	const baseRuns = 5
	baseName := count(s.mariadbDepths[0])
	type line struct {
		name  string
		drain func(depth int) (float64, error)
	}
	lines := []line{
		{"publisher", func(depth int) (float64, error) {
			var span time.Duration
			if _, err := publisherDrain(ctx, deleting, addrs, s, depth, &span); err != nil {
				return 0, err
			}
			return float64(depth) / span.Seconds(), nil
		}},
		{"simplest relay", func(depth int) (float64, error) {
			return relayMariaDB(ctx, keep, addrs, "delete", s.batch, s.workers, depth)
		}},
		{"MariaDB alone", func(depth int) (float64, error) {
			return relayMariaDB(ctx, keep, nil, "delete", s.batch, s.workers, depth)
		}},
	}
	// Beside each rate, the machine's CPU a message over the whole drain
	// (the server's included, its purge and page flushing too) and, of
	// it, this process's: on a machine whose cores are all busy, a deep
	// drain is slower by what it costs more. And InnoDB's history list as
	// the drain ends: the transactions whose deleted rows the server has
	// yet to purge, work a short drain leaves for after its end and a long
	// one does as it goes.
	base, baseCPU := make([]float64, len(lines)), make([]float64, len(lines))
	for i, depth := range s.mariadbDepths {
		runs := 1
		if i == 0 {
			runs = baseRuns
		}
		rates := make([][]float64, len(lines))
		machine, process, unpurged := make([][]float64, len(lines)), make([][]float64, len(lines)), make([][]float64, len(lines))
		for range runs {
			for l, ln := range lines {
				if err := fillMariaDB(keep, depth, s.keys, payload); err != nil {
					return err
				}
				rate, cpu, err := measured(func() (float64, error) { return ln.drain(depth) })
				if err != nil {
					return fmt.Errorf("%s, %d pending: %w", ln.name, depth, err)
				}
				var history float64
				if err := keep.Raw("SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME = 'INNODB_HISTORY_LIST_LENGTH'").Scan(&history).Error; err != nil {
					return err
				}
				unpurged[l] = append(unpurged[l], history)
				rates[l] = append(rates[l], rate)
				machine[l] = append(machine[l], us(cpu.machine)/float64(depth))
				process[l] = append(process[l], us(cpu.process)/float64(depth))
				if err := keep.Exec("TRUNCATE " + outbox.DefaultTableName).Error; err != nil {
					return err
				}
			}
		}
		var parts []string
		for l, ln := range lines {
			rate, cpu, here, history := median(rates[l]), median(machine[l]), median(process[l]), median(unpurged[l])
			if i == 0 {
				base[l], baseCPU[l] = rate, cpu
				parts = append(parts, fmt.Sprintf("%s %.0f msg/s, %.1f µs CPU/msg (%.1f in this process), history list %.0f at its end",
					ln.name, rate, cpu, here, history))
				continue
			}
			parts = append(parts, fmt.Sprintf("%s %.0f msg/s, %.0f%% of its %s rate, %.1f µs CPU/msg, %.0f%% of its %s's (%.1f in this process), history list %.0f at its end",
				ln.name, rate, 100*rate/base[l], baseName, cpu, 100*cpu/baseCPU[l], baseName, here, history))
		}
		if i > 0 {
			parts = append(parts, fmt.Sprintf("the publisher at %.2f× MariaDB alone's rate at this depth", median(rates[0])/median(rates[len(lines)-1])))
		}
		if i == 0 {
			fmt.Printf("   delete, %d workers, %7d pending (the base, medians of %d): %s\n", s.workers, depth, runs, strings.Join(parts, "; "))
			record("MariaDB scaling", baseName+" pending (the base)",
				fmt.Sprintf("steady drain rates (the publisher's from its first send to its last acknowledgement), medians of %d; "+
					"the machine's CPU a message over each whole drain, the server's included, and of it this process's (the Go side and the in-process broker); "+
					"InnoDB's history list as the drain ends (transactions whose deleted rows the server has yet to purge, after the drain)", runs),
				"%s", strings.Join(parts, "; "))
			continue
		}
		fmt.Printf("   delete, %d workers, %7d pending: %s (target for the publisher: at least 80%% of its rate)\n", s.workers, depth, strings.Join(parts, "; "))
		record("MariaDB scaling", count(depth)+" pending",
			"each drain's rate and CPU a message beside its own base's (target for the publisher's rate: at least 80%), its history list as it ends; then the publisher's rate against MariaDB alone's at this depth", "%s", strings.Join(parts, "; "))
	}
	return nil
}

// newMariaDBDatabase creates a database of its own on admin's server and
// returns its DSN (baseDSN's, in that database) and what drops it.
func newMariaDBDatabase(admin *gorm.DB, baseDSN string) (string, func(), error) {
	cfg, err := mysqldriver.ParseDSN(baseDSN)
	if err != nil {
		return "", nil, fmt.Errorf("-mariadb-dsn: %w", err)
	}
	name := "bench_" + strings.ReplaceAll(uuid.NewString(), "-", "")[:12]
	if err := admin.Exec("CREATE DATABASE " + name).Error; err != nil {
		return "", nil, err
	}
	cfg.DBName, cfg.ParseTime = name, true
	return cfg.FormatDSN(), func() { admin.Exec("DROP DATABASE " + name) }, nil
}

func modeWords(mode string) string {
	if mode == "delete" {
		return "each row deleted once acknowledged"
	}
	return "published rows kept"
}

// fillMariaDB writes n pending messages with the outbox's own multi-row
// insert.
func fillMariaDB(db *gorm.DB, n, keys int, payload []byte) error {
	store, err := outbox.StoreOf(db)
	if err != nil {
		return err
	}
	if err := saveBacklog(db, store, n, keys, payload); err != nil {
		return err
	}
	return db.Exec("ANALYZE TABLE " + outbox.DefaultTableName).Error
}

// relayMariaDB is the simplest correct relay on InnoDB: one transaction per
// batch that locks the oldest pending rows, sends them (unless addrs is
// nil: MariaDB alone), deletes them or marks them published, and commits.
func relayMariaDB(ctx context.Context, db *gorm.DB, addrs []string, mode string, batch, workers, n int) (float64, error) {
	var p sarama.SyncProducer
	if addrs != nil {
		var err error
		if p, err = sarama.NewSyncProducer(addrs, kafka.NewConfig()); err != nil {
			return 0, err
		}
		defer p.Close()
	}
	table := outbox.DefaultTableName
	lock := "SELECT id, topic, message_key, payload, headers FROM " + table +
		" WHERE state = 'pending' ORDER BY id LIMIT ? FOR UPDATE SKIP LOCKED"
	relayBatch := func() (int, error) {
		var rows []outbox.OutboxMessage
		err := db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
			if err := tx.Raw(lock, batch).Scan(&rows).Error; err != nil || len(rows) == 0 {
				return err
			}
			ids := make([]uuid.UUID, len(rows))
			msgs := make([]*sarama.ProducerMessage, len(rows))
			for i, r := range rows {
				ids[i] = r.ID
				msgs[i] = &sarama.ProducerMessage{Topic: r.Topic, Key: sarama.StringEncoder(r.Key), Value: sarama.ByteEncoder(r.Payload),
					Headers: []sarama.RecordHeader{{Key: []byte(kafka.MessageIDHeader), Value: []byte(r.ID.String())}}}
			}
			if p != nil {
				if err := p.SendMessages(msgs); err != nil {
					return err
				}
			}
			if mode == "delete" {
				return tx.Exec("DELETE FROM "+table+" WHERE id IN ?", ids).Error
			}
			// The hint keeps the UPDATE on the primary key: without it, a batch
			// that is a large share of the table is found by a full scan.
			return tx.Exec("UPDATE "+table+" FORCE INDEX (PRIMARY) SET state = 'published', published_at = ?, claim_token = NULL WHERE id IN ?", time.Now().UTC(), ids).Error
		}, &sql.TxOptions{Isolation: sql.LevelReadCommitted})
		return len(rows), err
	}
	return drainWith(workers, n, func() (int, error) {
		for {
			got, err := relayBatch()
			// InnoDB picks a deadlock's victim among the workers' batches:
			// a relay runs that batch again.
			if err != nil && strings.Contains(err.Error(), "Error 1213") {
				continue
			}
			return got, err
		}
	})
}
