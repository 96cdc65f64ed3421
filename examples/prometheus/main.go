// Command prometheus shows the outbox's metrics through the standard
// OpenTelemetry Prometheus exporter: it serves /metrics, relays a few
// events (SQLite and an in-process Kafka, as the quickstart), scrapes itself
// once and prints the outbox's series.
//
//	go run ./examples/prometheus            # prints a scrape and exits
//	go run ./examples/prometheus -serve     # keeps serving on :9464
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/glebarez/sqlite"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/twmb/franz-go/pkg/kfake"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/kafka"
	"github.com/gorm-outbox/outbox/outboxtest"
)

func main() {
	serve := flag.Bool("serve", false, "keep serving /metrics on :9464 after the demo")
	flag.Parse()
	if err := run(*serve); err != nil {
		log.Fatal(err)
	}
}

func run(serve bool) error {
	ctx := context.Background()

	// The application's choice of exporter: Prometheus, through OpenTelemetry.
	registry := prometheus.NewRegistry()
	exporter, err := otelprom.New(otelprom.WithRegisterer(registry))
	if err != nil {
		return err
	}
	meterProvider := sdkmetric.NewMeterProvider(sdkmetric.WithReader(exporter))
	defer func() {
		if err := meterProvider.Shutdown(ctx); err != nil {
			log.Printf("shutting the meter provider down: %v", err)
		}
	}()

	addr := "127.0.0.1:0"
	if serve {
		addr = ":9464"
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: promhttp.HandlerFor(registry, promhttp.HandlerOpts{}), ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			log.Printf("serving /metrics: %v", err)
		}
	}()
	defer srv.Close()

	dir, err := os.MkdirTemp("", "outbox-prometheus")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	db, err := gorm.Open(sqlite.Open(outboxtest.SQLiteDSN(filepath.Join(dir, "app.db"))), &gorm.Config{Logger: logger.Discard})
	if err != nil {
		return err
	}
	if err := db.Use(outbox.Plugin(outbox.WithMeterProvider(meterProvider))); err != nil {
		return err
	}
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, "payments"))
	if err != nil {
		return err
	}
	defer cluster.Close()
	sender, err := kafka.NewSender(cluster.ListenAddrs(), nil)
	if err != nil {
		return err
	}
	defer sender.Close()
	pub, err := outbox.NewPublisher(db, sender, outbox.WithLogger(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))))
	if err != nil {
		return err
	}
	if err := pub.Start(ctx); err != nil {
		return err
	}
	defer func() {
		if err := pub.Stop(ctx); err != nil {
			log.Printf("stopping the publisher: %v", err)
		}
	}()

	for i := range 5 {
		err := db.Transaction(func(tx *gorm.DB) error {
			return outbox.Enqueue(tx, outbox.Message{Topic: "payments", Key: fmt.Sprint(i), Payload: fmt.Sprintf(`{"amount":%d}`, i*10)})
		})
		if err != nil {
			return err
		}
	}
	pub.Wake()
	if _, err := outboxtest.ReadAllRecords(cluster.ListenAddrs(), "payments", 5, 100*time.Millisecond, 20*time.Second); err != nil {
		return err
	}
	time.Sleep(50 * time.Millisecond) // the publisher records its metrics just after the ack

	resp, err := http.Get("http://" + ln.Addr().String() + "/metrics")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	fmt.Printf("scraped http://%s/metrics:\n", ln.Addr())
	sc := bufio.NewScanner(resp.Body)
	found := 0
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "outbox_") || strings.HasPrefix(line, "messaging_") {
			if !strings.Contains(line, "_bucket{") {
				fmt.Println(" ", line)
				found++
			}
		}
	}
	if found == 0 {
		return fmt.Errorf("no outbox series in the scrape")
	}
	if serve {
		fmt.Println("serving /metrics on :9464; Ctrl-C to stop")
		select {}
	}
	return nil
}
