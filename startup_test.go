package outbox_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"gorm.io/driver/mysql"
	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/kafka"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// freePort returns a loopback address nothing listens on (yet).
func freePort(t *testing.T) (string, int) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().(*net.TCPAddr)
	l.Close()
	return addr.String(), addr.Port
}

// A service that starts while Kafka is down, written as the README writes
// it: the sender and the publisher are made, the publisher starts and
// pauses as in an outage (no attempt spent, one Warn line, the paused
// gauge), enqueuing goes on, and once a broker answers at the address the
// events go out.
func TestPublisherStartsWhileTheBrokerIsDown(t *testing.T) {
	reader := sdkmetric.NewManualReader()
	db := setup(t, outboxtest.SQLite(t, nil), outbox.WithMeterProvider(sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))))
	addr, port := freePort(t)
	sender, err := kafka.NewSender([]string{addr}, nil)
	if err != nil {
		t.Fatalf("NewSender with the broker down: %v", err)
	}
	t.Cleanup(func() { _ = sender.Close() })
	var logs syncBuffer
	const maxPause = 200 * time.Millisecond
	pub, err := outbox.NewPublisher(db, sender, outbox.WithPollInterval(10*time.Millisecond), outbox.WithMaxPause(maxPause),
		outbox.WithLogger(slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo}))))
	if err != nil {
		t.Fatal(err)
	}
	enqueueN(t, db, "boot", 3)
	if err := pub.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Stop(context.Background()) })
	waitFor(t, "a Warn line saying the broker is unreachable", func() bool {
		return strings.Contains(logs.String(), "level=WARN") && strings.Contains(logs.String(), "broker is unreachable")
	})
	waitFor(t, "the paused gauge", func() bool { return metricsByName(t, reader)["outbox.publisher.paused{broker}"] == 1 })
	enqueueN(t, db, "boot", 2) // enqueuing goes on during the outage
	time.Sleep(3 * maxPause)
	for _, m := range messages(t, db) {
		if m.State != outbox.StatePending || m.Attempts != 0 {
			t.Fatalf("during the outage a message is %s with %d attempts, want pending with none", m.State, m.Attempts)
		}
	}

	cluster, err := kfake.NewCluster(kfake.Ports(port), kfake.SeedTopics(1, "boot"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cluster.Close)
	up := time.Now()
	if got := len(outboxtest.Consume(t, []string{addr}, "boot", 5, 30*time.Second)); got != 5 {
		t.Fatalf("Kafka holds %d events, want 5", got)
	}
	t.Logf("published %v after the broker came up", time.Since(up))
	waitFor(t, "the paused gauge to drop", func() bool { return metricsByName(t, reader)["outbox.publisher.paused{broker}"] == 0 })
	if !strings.Contains(logs.String(), "resumed") {
		t.Errorf("no 'resumed' line:\n%s", logs.String())
	}
}

// switchProxy forwards TCP connections to target while up, and refuses
// them (closing every forwarded one) while down: a database outage without
// stopping the shared server.
type switchProxy struct {
	l      net.Listener
	target string
	mu     sync.Mutex
	up     bool
	conns  []net.Conn
	wg     sync.WaitGroup
}

func newSwitchProxy(t *testing.T, target string) *switchProxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &switchProxy{l: l, target: target, up: true}
	p.wg.Add(1)
	go p.serve()
	t.Cleanup(func() {
		l.Close()
		p.set(false)
		p.wg.Wait()
	})
	return p
}

func (p *switchProxy) addr() string { return p.l.Addr().String() }

func (p *switchProxy) set(up bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.up = up
	if !up {
		for _, c := range p.conns {
			c.Close()
		}
		p.conns = nil
	}
}

func (p *switchProxy) serve() {
	defer p.wg.Done()
	for {
		c, err := p.l.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		if !p.up {
			p.mu.Unlock()
			c.Close()
			continue
		}
		s, err := net.Dial("tcp", p.target)
		if err != nil {
			p.mu.Unlock()
			c.Close()
			continue
		}
		p.conns = append(p.conns, c, s)
		p.mu.Unlock()
		p.wg.Add(2)
		go func() { defer p.wg.Done(); _, _ = io.Copy(s, c); s.Close() }()
		go func() { defer p.wg.Done(); _, _ = io.Copy(c, s); c.Close() }()
	}
}

// A publisher started while the database is unreachable waits and resumes,
// instead of failing to start (MariaDB's start checks the server's version;
// PostgreSQL's LISTEN and claims meet the outage first).
func TestPublisherStartsWhileTheDatabaseIsDown(t *testing.T) {
	for _, name := range []string{"postgres", "mariadb"} {
		t.Run(name, func(t *testing.T) {
			var db *gorm.DB
			var proxy *switchProxy
			if name == "postgres" {
				_, dsn := outboxtest.PostgresSchema(t, nil)
				host, port := "127.0.0.1", "5432"
				for _, kv := range strings.Fields(dsn) {
					if v, ok := strings.CutPrefix(kv, "host="); ok {
						host = v
					}
					if v, ok := strings.CutPrefix(kv, "port="); ok {
						port = v
					}
				}
				proxy = newSwitchProxy(t, net.JoinHostPort(host, port))
				ph, pp, _ := net.SplitHostPort(proxy.addr())
				db = openDown(t, postgres.Open(dsn+" host="+ph+" port="+pp))
			} else {
				_, dsn := outboxtest.MariaDBDatabase(t, nil)
				start, end := strings.Index(dsn, "tcp(")+len("tcp("), strings.Index(dsn, ")/")
				if start < len("tcp(") || end < start {
					t.Fatalf("cannot find the server's address in %q", dsn)
				}
				proxy = newSwitchProxy(t, dsn[start:end])
				db = openDown(t, mysql.Open(dsn[:start]+proxy.addr()+dsn[end:]))
			}
			setup(t, db)
			enqueueN(t, db, "dbdown", 3)
			proxy.set(false)

			_, addrs := outboxtest.Kafka(t, 1, "dbdown")
			var logs syncBuffer
			pub, err := outbox.NewPublisher(db, kafkaSender(t, addrs), outbox.WithPollInterval(10*time.Millisecond),
				outbox.WithMaxPause(200*time.Millisecond), outbox.WithLogger(slog.New(slog.NewTextHandler(&logs, nil))))
			if err != nil {
				t.Fatal(err)
			}
			if err := pub.Start(t.Context()); err != nil {
				t.Fatalf("Start with the database down: %v", err)
			}
			t.Cleanup(func() { _ = pub.Stop(context.Background()) })
			waitFor(t, "a Warn line saying the database is unreachable", func() bool {
				return strings.Contains(logs.String(), "database is unreachable")
			})
			proxy.set(true)
			if got := len(outboxtest.Consume(t, addrs, "dbdown", 3, 30*time.Second)); got != 3 {
				t.Fatalf("Kafka holds %d events, want 3", got)
			}
		})
	}
}

// openDown opens GORM without the ping that would fail during an outage.
func openDown(t *testing.T, d gorm.Dialector) *gorm.DB {
	t.Helper()
	db, err := gorm.Open(d, &gorm.Config{Logger: logger.Discard, DisableAutomaticPing: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if sqlDB, err := db.DB(); err == nil {
			sqlDB.Close()
		}
	})
	return db
}

// The README's opening lines with the error of NewSender ignored: a nil
// *kafka.Sender is refused by NewPublisher instead of panicking in the
// first batch, and a nil Sender's methods return errors.
func TestNilSenderIsRefused(t *testing.T) {
	db := setup(t, outboxtest.SQLite(t, nil))
	var sender *kafka.Sender
	if _, err := outbox.NewPublisher(db, sender); err == nil || !strings.Contains(err.Error(), "sender is nil") {
		t.Fatalf("NewPublisher(nil *kafka.Sender) = %v, want an error naming the sender", err)
	}
	if err := sender.Send(t.Context(), nil); !errors.Is(err, outbox.ErrBrokerUnavailable) {
		t.Fatalf("nil Sender's Send = %v", err)
	}
	if err := sender.Close(); err != nil {
		t.Fatal(err)
	}
}

// When Stop returns, the publisher is out of the paused gauge, even if it
// stopped in the middle of an outage.
func TestStopDuringAnOutageLeavesThePausedGaugeAtZero(t *testing.T) {
	reader := sdkmetric.NewManualReader()
	db := setup(t, outboxtest.SQLite(t, nil), outbox.WithMeterProvider(sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))))
	enqueueN(t, db, "down", 3)
	away := outbox.SenderFunc(func(context.Context, []*outbox.OutboxMessage) error {
		return fmt.Errorf("dial: %w", outbox.ErrBrokerUnavailable)
	})
	pub, err := outbox.NewPublisher(db, away, outbox.WithPollInterval(5*time.Millisecond), outbox.WithMaxPause(20*time.Millisecond),
		outbox.WithLogger(discardLogger()))
	if err != nil {
		t.Fatal(err)
	}
	if err := pub.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the paused gauge", func() bool { return metricsByName(t, reader)["outbox.publisher.paused{broker}"] == 1 })
	if err := pub.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := metricsByName(t, reader)["outbox.publisher.paused{broker}"]; n != 0 {
		t.Fatalf("paused gauge %v after Stop returned, want 0", n)
	}
}
