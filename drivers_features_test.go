package outbox_test

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	pgstore "github.com/gorm-outbox/outbox/internal/postgres"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// Every PostgreSQL driver the docs support gets the features the docs
// promise for it: through pgx's driver, its simple protocol and pgxpipeline
// the publisher LISTENs and the held claim reads through pgx; through
// lib/pq neither can work, and the publisher says so at Warn level, once.
func TestEachPostgresDriverGetsItsFeatures(t *testing.T) {
	for _, c := range []struct {
		name string
		open func(testing.TB, *gorm.Config) *gorm.DB
		pgx  bool
	}{
		{"pgx", outboxtest.Postgres, true},
		{"pgx-simple-protocol", outboxtest.PostgresSimpleProtocol, true},
		{"pgxpipeline", postgresPipelined, true},
		{"lib/pq", postgresLibPQ, false},
	} {
		t.Run(strings.ReplaceAll(c.name, "/", "-"), func(t *testing.T) {
			db := setup(t, c.open(t, nil))
			pgxPath, err := pgstore.TakesPgxPath(t.Context(), db)
			if err != nil {
				t.Fatal(err)
			}
			if pgxPath != c.pgx {
				t.Fatalf("held claim's pgx path taken: %v, want %v", pgxPath, c.pgx)
			}

			var channel string
			if err := db.Raw("SELECT 'outbox_' || left(md5(current_schema() || '.outbox_messages'), 16)").Scan(&channel).Error; err != nil {
				t.Fatal(err)
			}
			_, addrs := outboxtest.Kafka(t, 1, "t")
			var logs syncBuffer
			pub, err := outbox.NewPublisher(db, kafkaSender(t, addrs),
				outbox.WithLogger(slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))))
			if err != nil {
				t.Fatal(err)
			}
			if err := pub.Start(t.Context()); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = pub.Stop(context.Background()) })

			listening := func() bool {
				var n int64
				err := db.Raw("SELECT count(*) FROM pg_stat_activity WHERE query = ?", `LISTEN "`+channel+`"`).Scan(&n).Error
				if err != nil {
					t.Fatal(err)
				}
				return n == 1
			}
			if c.pgx {
				waitFor(t, "the publisher's LISTEN in pg_stat_activity", listening)
				if strings.Contains(logs.String(), "LISTEN") {
					t.Fatalf("the publisher warned about LISTEN through %s: %s", c.name, logs.String())
				}
				return
			}
			waitFor(t, "a warning that the publisher polls only", func() bool { return strings.Contains(logs.String(), "cannot LISTEN") })
			time.Sleep(200 * time.Millisecond)
			if listening() {
				t.Fatal("a LISTEN is active through lib/pq")
			}
			if n := strings.Count(logs.String(), "cannot LISTEN"); n != 1 {
				t.Fatalf("the warning was logged %d times, want once:\n%s", n, logs.String())
			}
		})
	}
}
