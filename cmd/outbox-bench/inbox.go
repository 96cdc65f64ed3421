package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"strings"
	"sync/atomic"
	"time"

	"github.com/IBM/sarama"
	"github.com/google/uuid"
	"github.com/twmb/franz-go/pkg/kfake"
	"gorm.io/driver/mysql"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/gorm-outbox/outbox/inbox"
	"github.com/gorm-outbox/outbox/kafka"
)

// The inbox part's topic, filled once and read from its start by a new
// consumer group in every run, and the domain table every consumer writes.
const (
	inboxTopic      = "inbox-bench"
	inboxPartitions = 6
	appliedTable    = "inbox_bench_applied"
)

// inboxTimeout bounds one run: a consumer that stops applying fails the
// part instead of hanging it.
const inboxTimeout = 5 * time.Minute

// appliedDDL is the domain table on each database: one row per message,
// under a key of its own, so that the ceiling writes it without
// deduplicating anything.
var appliedDDL = map[string]string{
	"postgres": `CREATE TABLE ` + appliedTable + ` (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
		message_id varchar(255) NOT NULL, message_key varchar(255) NOT NULL, kafka_partition integer NOT NULL,
		kafka_offset bigint NOT NULL, payload bytea NOT NULL)`,
	"mysql": `CREATE TABLE ` + appliedTable + ` (id bigint AUTO_INCREMENT PRIMARY KEY,
		message_id varchar(255) NOT NULL, message_key varchar(255) NOT NULL, kafka_partition int NOT NULL,
		kafka_offset bigint NOT NULL, payload blob NOT NULL) ENGINE=InnoDB`,
}

// inboxPart measures the inbox's consumption of a preloaded topic beside a
// ceiling measured in the same rounds, on PostgreSQL, then on MariaDB: a
// bare sarama consumer group with the inbox's consumer settings that
// writes each batch the claim has buffered (up to the inbox's batch size)
// in one multi-row INSERT in a transaction, and marks its last offset
// after the commit, with no deduplication. The inbox's batch handler
// writes the same rows with the same statement; its per-message handler,
// one INSERT a message, is measured too, for information.
func inboxPart(ctx context.Context, admin *gorm.DB, s settings) error {
	n := s.inboxN
	fmt.Printf("\n6. inbox: %d messages of %d B in %d partitions, batch %d, %d rounds, interleaved (medians)\n",
		n, s.payloadBytes, inboxPartitions, s.inboxBatch, s.rounds)
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(inboxPartitions, inboxTopic))
	if err != nil {
		return err
	}
	defer cluster.Close()
	addrs := cluster.ListenAddrs()
	start := time.Now()
	if err := preloadInbox(addrs, n, s.keys, []byte(strings.Repeat("x", s.payloadBytes))); err != nil {
		return fmt.Errorf("filling the topic: %w", err)
	}
	fmt.Printf("   (wrote the %d messages to the topic in %.1fs)\n", n, time.Since(start).Seconds())

	var version string
	admin.Raw("SHOW server_version").Scan(&version)
	err = withSchema(admin, s.dsn, func(db *gorm.DB, _ string) error {
		return inboxRounds(ctx, db, addrs, s, "PostgreSQL "+version, func() { settle(db) })
	})
	if err != nil {
		return fmt.Errorf("PostgreSQL: %w", err)
	}

	madmin, err := gorm.Open(mysql.Open(s.mariadbDSN), &gorm.Config{Logger: logger.Discard})
	if err != nil {
		return err
	}
	defer func() {
		if sqlDB, err := madmin.DB(); err == nil {
			sqlDB.Close()
		}
	}()
	if err := madmin.Raw("SELECT VERSION()").Scan(&version).Error; err != nil {
		return fmt.Errorf("MariaDB: %w", err)
	}
	dsn, drop, err := newMariaDBDatabase(madmin, s.mariadbDSN)
	if err != nil {
		return fmt.Errorf("MariaDB: %w", err)
	}
	defer drop()
	db, closeDB, err := openWith(mysql.Open(dsn))
	if err != nil {
		return fmt.Errorf("MariaDB: %w", err)
	}
	defer closeDB()
	// Nothing like PostgreSQL's CHECKPOINT: InnoDB flushes in the background.
	if err := inboxRounds(ctx, db, addrs, s, "MariaDB "+version, func() { runtime.GC() }); err != nil {
		return fmt.Errorf("MariaDB: %w", err)
	}
	return nil
}

// preloadInbox writes n messages to the inbox part's topic, keyed over keys
// keys, each with the outbox-message-id header the outbox's publisher sets.
func preloadInbox(addrs []string, n, keys int, payload []byte) error {
	p, err := sarama.NewSyncProducer(addrs, kafka.NewConfig())
	if err != nil {
		return err
	}
	defer p.Close()
	const chunk = 1000
	for done := 0; done < n; done += chunk {
		msgs := make([]*sarama.ProducerMessage, 0, chunk)
		for i := done; i < min(done+chunk, n); i++ {
			id, _ := uuid.NewV7()
			msgs = append(msgs, &sarama.ProducerMessage{Topic: inboxTopic, Key: sarama.StringEncoder(fmt.Sprint("k", i%keys)),
				Value: sarama.ByteEncoder(payload), Headers: []sarama.RecordHeader{{Key: []byte(inbox.MessageIDHeader), Value: []byte(id.String())}}})
		}
		if err := p.SendMessages(msgs); err != nil {
			return err
		}
	}
	return nil
}

// consumerConfig is the inbox's own consumer settings (see inbox's
// newConfig), given to both sides so that they fetch and commit alike.
func consumerConfig() *sarama.Config {
	cfg := sarama.NewConfig()
	cfg.Version = sarama.V3_6_0_0
	cfg.Consumer.Offsets.Initial = sarama.OffsetOldest
	cfg.Consumer.Offsets.AutoCommit.Enable = true
	cfg.Consumer.Offsets.AutoCommit.Interval = time.Second
	cfg.Consumer.IsolationLevel = sarama.ReadCommitted
	cfg.Consumer.Return.Errors = true
	return cfg
}

// consumer is what a run starts and stops: the inbox's Consumer, or the
// ceiling's.
type consumer interface {
	Start(ctx context.Context) error
	Stop(ctx context.Context) error
}

// inboxRounds runs the ceiling and the two inbox consumers on db, once
// each before the rounds (not counted), then once a round each, and prints
// and records their medians and the ratios. settle runs before each run.
func inboxRounds(ctx context.Context, db *gorm.DB, addrs []string, s settings, server string, settle func()) error {
	n := s.inboxN
	fmt.Printf("   %s:\n", server)
	part := fmt.Sprintf("inbox, %s, %s messages", strings.Fields(server)[0], count(n))
	record(part, "setup", "a new consumer group reads the whole topic in every run, into emptied tables (the domain table and the inbox's), "+
		"not analyzed during the run; a run is timed from the consumer's start, the group's join included, until the domain table "+
		"holds a row for every message",
		"%s; a kfake topic of %d partitions holding %d messages of %d B over %d keys, each with an outbox-message-id header; "+
			"batch %d; the inbox's other options at their defaults", server, inboxPartitions, n, s.payloadBytes, s.keys, s.inboxBatch)
	if err := db.Use(inbox.Plugin()); err != nil {
		return err
	}
	if err := db.Exec(appliedDDL[db.Dialector.Name()]).Error; err != nil {
		return err
	}
	var handled atomic.Int64 // messages handed to a transaction, across the run
	cfg := consumerConfig()
	opts := []inbox.Option{inbox.WithSaramaConfig(cfg), inbox.WithBatchSize(s.inboxBatch),
		inbox.WithLogger(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))}
	measures := []struct {
		name, what string
		inbox      bool // a line set beside the ceiling
		consumer   func(group string) (consumer, error)
	}{
		{"ceiling, bare consumer group, one multi-row INSERT a batch:",
			"a sarama consumer group with the inbox's consumer settings, no inbox: per partition, what the claim has buffered " +
				"(up to the batch size) written in one multi-row INSERT in a transaction, its last offset marked after the commit; no deduplication",
			false, func(group string) (consumer, error) {
				return &ceilingConsumer{db: db, addrs: addrs, cfg: cfg, group: group, batch: s.inboxBatch, handled: &handled}, nil
			}},
		{"inbox, NewBatchConsumer, one multi-row INSERT a batch:",
			"inbox.NewBatchConsumer whose handler writes the same rows with the same statement on the inbox's transaction",
			true, func(group string) (consumer, error) {
				return inbox.NewBatchConsumer(db, addrs, group, []string{inboxTopic}, func(tx *gorm.DB, ms []inbox.Message) error {
					rows := make([]appliedRow, len(ms))
					for i, m := range ms {
						rows[i] = appliedRow{m.ID, m.Key, m.Partition, m.Offset, m.Value}
					}
					handled.Add(int64(len(ms)))
					return insertApplied(tx, rows)
				}, opts...)
			}},
		{"inbox, NewConsumer, one INSERT a message:",
			"inbox.NewConsumer whose handler writes each message's row with its own INSERT, in the inbox's transaction of up to the batch size",
			true, func(group string) (consumer, error) {
				return inbox.NewConsumer(db, addrs, group, []string{inboxTopic}, func(tx *gorm.DB, m inbox.Message) error {
					handled.Add(1)
					return insertApplied(tx, []appliedRow{{m.ID, m.Key, m.Partition, m.Offset, m.Value}})
				}, opts...)
			}},
	}
	// run consumes until want messages are applied, from emptied tables;
	// with want the whole topic, it checks that none was applied twice.
	run := func(i, want int) (float64, cpuTime, error) {
		for _, t := range []string{appliedTable, inbox.DefaultTableName} {
			if err := db.Exec("TRUNCATE TABLE " + t).Error; err != nil {
				return 0, cpuTime{}, err
			}
		}
		settle()
		c, err := measures[i].consumer("bench-" + uuid.NewString())
		if err != nil {
			return 0, cpuTime{}, err
		}
		handled.Store(0)
		return measured(func() (float64, error) { return consumeAll(ctx, db, c, want, n, &handled) })
	}
	for i, m := range measures {
		if _, _, err := run(i, min(n, warmUpMessages)); err != nil {
			return fmt.Errorf("warming up %s %w", m.name, err)
		}
	}
	rates := make([][]float64, len(measures))
	cpus := make([][]float64, len(measures))
	for r := range s.rounds {
		fmt.Fprintf(os.Stderr, "   inbox round %d of %d (%s)\n", r+1, s.rounds, server)
		for i, m := range measures {
			rate, cpu, err := run(i, n)
			if err != nil {
				return fmt.Errorf("%s %w", m.name, err)
			}
			rates[i] = append(rates[i], rate)
			cpus[i] = append(cpus[i], us(cpu.machine)/float64(n))
		}
	}
	for i, m := range measures {
		fmt.Printf("   %-56s %8.0f msg/s  (%.1f µs CPU/msg; rounds %s)\n", m.name, median(rates[i]), median(cpus[i]), thousands(rates[i]))
		record(part, strings.TrimSuffix(m.name, ":"), m.what+fmt.Sprintf("; median of %d rounds, and the machine's CPU a message (every process)", s.rounds),
			"%.0f msg/s, %.1f µs CPU/msg", median(rates[i]), median(cpus[i]))
		if !m.inbox {
			continue
		}
		ratios := make([]float64, s.rounds)
		for r := range ratios {
			ratios[r] = rates[i][r] / rates[0][r]
		}
		target := "target: at least 0.7×"
		if i == 2 {
			target = "for information: the same rows, one statement each"
		}
		ratio := median(rates[i]) / median(rates[0])
		fmt.Printf("      %.2f× the ceiling (%s); each round to its own ceiling: %s\n", ratio, target, each(ratios, "%.2f×", " "))
		record(part, strings.TrimSuffix(m.name, ":")+", ratio to the ceiling",
			"the line above's median over the ceiling's ("+target+"); then each round's ratio to the same round's ceiling",
			"%.2f× (rounds %s)", ratio, each(ratios, "%.2f×", " "))
	}
	return nil
}

// consumeAll starts c and returns the rate at which it applies want
// messages, timed from its start until the domain table holds want rows;
// then it stops c. With want the whole topic (total), a row more after the
// stop is a message applied twice, and fails the run.
func consumeAll(ctx context.Context, db *gorm.DB, c consumer, want, total int, handled *atomic.Int64) (float64, error) {
	start := time.Now()
	if err := c.Start(ctx); err != nil {
		return 0, err
	}
	waited := waitApplied(db, c, want, handled)
	elapsed := time.Since(start)
	stopCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := errors.Join(waited, c.Stop(stopCtx)); err != nil {
		return 0, err
	}
	if want == total {
		rows, err := appliedRows(db)
		if err != nil {
			return 0, err
		}
		if rows != int64(total) {
			return 0, fmt.Errorf("%d rows applied for %d messages", rows, total)
		}
	}
	return float64(want) / elapsed.Seconds(), nil
}

// waitApplied waits until the domain table holds want rows. It reads the
// handlers' count first, for free, and the table only once every message
// has been handed to a transaction: counting a growing table all along
// would take a share of the two cores from the consumers it times, and
// from the slower consumer the larger share.
func waitApplied(db *gorm.DB, c consumer, want int, handled *atomic.Int64) error {
	deadline := time.Now().Add(inboxTimeout)
	failed := func() error { return nil }
	if cc, ok := c.(*ceilingConsumer); ok {
		failed = cc.failed
	}
	for handled.Load() < int64(want) {
		if err := failed(); err != nil {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d of %d messages handled after %v", handled.Load(), want, inboxTimeout)
		}
		time.Sleep(time.Millisecond)
	}
	for {
		rows, err := appliedRows(db)
		if err != nil || rows >= int64(want) {
			return err
		}
		if err := failed(); err != nil {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d of %d messages applied after %v", rows, want, inboxTimeout)
		}
		time.Sleep(time.Millisecond)
	}
}

func appliedRows(db *gorm.DB) (int64, error) {
	var rows int64
	err := db.Raw("SELECT count(*) FROM " + appliedTable).Scan(&rows).Error
	return rows, err
}

// appliedRow is the domain row written for one message.
type appliedRow struct {
	id        string
	key       []byte
	partition int32
	offset    int64
	payload   []byte
}

// insertApplied writes rows in one multi-row INSERT: what every consumer of
// the part does with a batch.
func insertApplied(tx *gorm.DB, rows []appliedRow) error {
	var b strings.Builder
	b.WriteString("INSERT INTO " + appliedTable + " (message_id, message_key, kafka_partition, kafka_offset, payload) VALUES ")
	args := make([]any, 0, 5*len(rows))
	for i, r := range rows {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString("(?, ?, ?, ?, ?)")
		args = append(args, r.id, string(r.key), r.partition, r.offset, r.payload)
	}
	return tx.Exec(b.String(), args...).Error
}

// ceilingConsumer is the ceiling: a bare sarama consumer group that
// consumes as the inbox does (a batch of what the claim has buffered, one
// transaction, the last offset marked after the commit, auto-committed)
// with nothing of the inbox's own: no reading or writing of the inbox
// table, no per-message spans or metrics.
type ceilingConsumer struct {
	db      *gorm.DB
	addrs   []string
	cfg     *sarama.Config
	group   string
	batch   int
	handled *atomic.Int64

	err    atomic.Pointer[error] // the first failure
	cancel context.CancelFunc
	done   chan struct{}
}

func (c *ceilingConsumer) fail(err error) { c.err.CompareAndSwap(nil, &err) }

func (c *ceilingConsumer) failed() error {
	if err := c.err.Load(); err != nil {
		return *err
	}
	return nil
}

// Start joins the group and consumes in a goroutine until Stop.
func (c *ceilingConsumer) Start(ctx context.Context) error {
	group, err := sarama.NewConsumerGroup(c.addrs, c.group, c.cfg)
	if err != nil {
		return err
	}
	ctx, c.cancel = context.WithCancel(ctx)
	c.done = make(chan struct{})
	go func() {
		for err := range group.Errors() {
			c.fail(err)
		}
	}()
	go func() {
		defer close(c.done)
		defer group.Close()
		for ctx.Err() == nil {
			if err := group.Consume(ctx, []string{inboxTopic}, c); err != nil && ctx.Err() == nil {
				c.fail(err)
				return
			}
		}
	}()
	return nil
}

// Stop leaves the group, committing the marked offsets.
func (c *ceilingConsumer) Stop(ctx context.Context) error {
	c.cancel()
	select {
	case <-c.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (c *ceilingConsumer) Setup(sarama.ConsumerGroupSession) error   { return nil }
func (c *ceilingConsumer) Cleanup(sarama.ConsumerGroupSession) error { return nil }

func (c *ceilingConsumer) ConsumeClaim(session sarama.ConsumerGroupSession, claim sarama.ConsumerGroupClaim) error {
	ctx := session.Context()
	batch := make([]*sarama.ConsumerMessage, 0, c.batch)
	rows := make([]appliedRow, 0, c.batch)
	for {
		select {
		case <-ctx.Done():
			return nil
		case r, ok := <-claim.Messages():
			if !ok {
				return nil
			}
			batch = append(batch[:0], r)
		fill:
			for len(batch) < c.batch {
				select {
				case r, ok := <-claim.Messages():
					if !ok {
						break fill
					}
					batch = append(batch, r)
				default:
					break fill
				}
			}
			rows = rows[:0]
			for _, r := range batch {
				rows = append(rows, appliedRow{messageID(r), r.Key, r.Partition, r.Offset, r.Value})
			}
			err := c.db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
				c.handled.Add(int64(len(rows)))
				return insertApplied(tx, rows)
			})
			if err != nil {
				if ctx.Err() == nil {
					c.fail(err)
				}
				return nil
			}
			session.MarkMessage(batch[len(batch)-1], "")
		}
	}
}

// messageID is r's outbox-message-id header: the id the row is written with.
func messageID(r *sarama.ConsumerMessage) string {
	for _, h := range r.Headers {
		if h != nil && string(h.Key) == inbox.MessageIDHeader {
			return string(h.Value)
		}
	}
	return fmt.Sprintf("%s/%d/%d", r.Topic, r.Partition, r.Offset)
}
