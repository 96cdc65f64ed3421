package outbox_test

import (
	"fmt"
	"io"
	"log"
	"log/slog"
	"os"
	"testing"
	"time"

	mysqldriver "github.com/go-sql-driver/mysql"
	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/outboxtest"
	"gorm.io/gorm"
)

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// driverLog collects what go-sql-driver/mysql logs (it logs through a
// logger of its own, not through the publisher's).
type driverLog struct{ syncBuffer }

func (l *driverLog) Print(v ...any) { fmt.Fprintln(&l.syncBuffer, v...) }

// A publisher stopped in the middle of its work logs nothing at error
// level, and neither does the database driver: the claims it ends are
// rolled back, not failures.
func TestStopLogsNothingAtErrorLevel(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 4, "t")
		enqueueN(t, db, "t", 3000)
		var driver driverLog
		if err := mysqldriver.SetLogger(&driver); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = mysqldriver.SetLogger(log.New(os.Stderr, "[mysql] ", log.Ldate|log.Ltime|log.Lshortfile)) }()
		var logs syncBuffer
		pub, err := outbox.NewPublisher(db, kafkaSender(t, addrs), outbox.WithWorkers(4), outbox.WithBatchSize(50),
			outbox.WithLogger(slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelError}))))
		if err != nil {
			t.Fatal(err)
		}
		if err := pub.Start(t.Context()); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for count(t, db, outbox.DefaultTableName, "state = ?", outbox.StatePublished) < 100 && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		if err := pub.Stop(t.Context()); err != nil {
			t.Fatal(err)
		}
		if n := count(t, db, outbox.DefaultTableName, "state = ?", outbox.StatePending); n == 0 {
			t.Log("every message was sent before the stop: the stop ended no claim")
		}
		if logs.String() != "" || driver.String() != "" {
			t.Fatalf("logged at a stop:\npublisher: %s\ndriver: %s", logs.String(), driver.String())
		}
	})
}
