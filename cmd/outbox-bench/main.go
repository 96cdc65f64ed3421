// Command outbox-bench measures the publisher's drain throughput beside its
// two ceilings, measured in the same run on the same table shape and
// payloads: the database alone (the simplest correct drain, one
// DELETE ... RETURNING per batch, nothing sent) and the broker alone (the
// same sarama producer settings, no database).
//
//	go run ./cmd/outbox-bench                 # 100k messages against the local PostgreSQL and kfake
//	go run ./cmd/outbox-bench -n 1000000
//
// It prints its conditions first. Only the drain is measured so far; the
// latency, enqueue-overhead and backlog-scaling parts of issue #4 are to come.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"log/slog"
	"os"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/IBM/sarama"
	"github.com/google/uuid"
	"github.com/twmb/franz-go/pkg/kfake"
	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/kafka"
)

func main() {
	dsn := flag.String("dsn", envOr("OUTBOX_BENCH_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test sslmode=disable"), "PostgreSQL DSN")
	n := flag.Int("n", 100_000, "messages in the backlog")
	batch := flag.Int("batch", 500, "batch size")
	workers := flag.Int("workers", 4, "publisher workers (and ceiling goroutines)")
	payload := flag.Int("payload", 200, "payload bytes")
	keys := flag.Int("keys", 10_000, "distinct message keys")
	flag.Parse()
	if err := run(*dsn, *n, *batch, *workers, *payload, *keys); err != nil {
		log.Fatal(err)
	}
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func run(dsn string, n, batch, workers, payloadBytes, keys int) error {
	ctx := context.Background()
	schema := "bench_" + strings.ReplaceAll(uuid.NewString(), "-", "")[:12]
	admin, err := gorm.Open(postgres.Open(dsn), &gorm.Config{Logger: logger.Discard})
	if err != nil {
		return err
	}
	if err := admin.Exec("CREATE SCHEMA " + schema).Error; err != nil {
		return err
	}
	defer admin.Exec("DROP SCHEMA " + schema + " CASCADE")
	db, err := gorm.Open(postgres.Open(dsn+" search_path="+schema), &gorm.Config{Logger: logger.Discard})
	if err != nil {
		return err
	}
	if err := db.Use(outbox.Plugin()); err != nil {
		return err
	}
	var pgVersion string
	db.Raw("SHOW server_version").Scan(&pgVersion)
	version := "(devel)"
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		version = bi.Main.Version
	}
	host, _ := os.Hostname()
	fmt.Printf("conditions: host=%s cpus=%d %s/%s go=%s postgresql=%s outbox=%s kafka=kfake(in-process, TCP)\n",
		host, runtime.NumCPU(), runtime.GOOS, runtime.GOARCH, runtime.Version(), pgVersion, version)
	fmt.Printf("            messages=%d batch=%d workers=%d payload=%dB keys=%d\n", n, batch, workers, payloadBytes, keys)

	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(8, "bench"))
	if err != nil {
		return err
	}
	defer cluster.Close()
	payload := []byte(strings.Repeat("x", payloadBytes))

	// Ceiling 1: the database alone, on the same table shape.
	if err := fill(db, "bench_db", n, keys, payload); err != nil {
		return err
	}
	dbRate, err := drainDB(ctx, db, "bench_db", batch, workers, n)
	if err != nil {
		return err
	}
	fmt.Printf("ceiling, database alone (DELETE ... SKIP LOCKED ... RETURNING): %8.0f msg/s\n", dbRate)

	// Ceiling 2: the broker alone, same producer settings.
	brokerRate, err := produceOnly(cluster.ListenAddrs(), batch, workers, n, keys, payload)
	if err != nil {
		return err
	}
	fmt.Printf("ceiling, broker alone (sarama SendMessages):                %8.0f msg/s\n", brokerRate)

	// The publisher.
	if err := fill(db, outbox.DefaultTableName, n, keys, payload); err != nil {
		return err
	}
	sender, err := kafka.NewSender(cluster.ListenAddrs(), nil)
	if err != nil {
		return err
	}
	defer sender.Close()
	pub, err := outbox.NewPublisher(db, sender, outbox.WithBatchSize(batch), outbox.WithWorkers(workers),
		outbox.WithPollInterval(5*time.Millisecond), outbox.WithLogger(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))))
	if err != nil {
		return err
	}
	start := time.Now()
	if err := pub.Start(ctx); err != nil {
		return err
	}
	for {
		var pending int64
		if err := db.Table(outbox.DefaultTableName).Where("state = 'pending'").Count(&pending).Error; err != nil {
			return err
		}
		if pending == 0 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	elapsed := time.Since(start)
	_ = pub.Stop(ctx)
	pubRate := float64(n) / elapsed.Seconds()
	lower := min(dbRate, brokerRate)
	fmt.Printf("publisher (claim, send, mark):                              %8.0f msg/s\n", pubRate)
	fmt.Printf("ratio publisher / lower ceiling: %.0f%% (target: at least 70%%)\n", 100*pubRate/lower)
	return nil
}

// fill writes n pending messages with the outbox's own multi-row insert.
func fill(db *gorm.DB, table string, n, keys int, payload []byte) error {
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
	store, err := outbox.NewStore(db, outbox.WithTableName(table))
	if err != nil {
		return err
	}
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
	return db.Exec("ANALYZE " + table).Error
}

func drainDB(ctx context.Context, db *gorm.DB, table string, batch, workers, n int) (float64, error) {
	sql := `DELETE FROM ` + table + ` WHERE id IN (SELECT id FROM ` + table + ` WHERE state = 'pending' ORDER BY id LIMIT ? FOR UPDATE SKIP LOCKED)
		RETURNING id, topic, message_key, payload, headers`
	var drained atomic.Int64
	var wg sync.WaitGroup
	var firstErr atomic.Value
	start := time.Now()
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for drained.Load() < int64(n) {
				var rows []outbox.OutboxMessage
				if err := db.WithContext(ctx).Raw(sql, batch).Scan(&rows).Error; err != nil {
					firstErr.Store(err)
					return
				}
				if len(rows) == 0 {
					return
				}
				drained.Add(int64(len(rows)))
			}
		}()
	}
	wg.Wait()
	if err, ok := firstErr.Load().(error); ok {
		return 0, err
	}
	return float64(drained.Load()) / time.Since(start).Seconds(), nil
}

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
			for i := 0; ; i++ {
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
