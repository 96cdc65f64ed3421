package kafka_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/IBM/sarama"
	"github.com/google/uuid"
	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/kafka"
	"github.com/gorm-outbox/outbox/outboxtest"
)

func TestNewConfigIsTheReliableOne(t *testing.T) {
	cfg := kafka.NewConfig()
	if !cfg.Producer.Idempotent || cfg.Producer.RequiredAcks != sarama.WaitForAll || cfg.Net.MaxOpenRequests != 1 ||
		cfg.Producer.Retry.Max < 1 || !cfg.Producer.Return.Successes || !cfg.Version.IsAtLeast(sarama.V0_11_0_0) {
		t.Fatalf("not the reliable producer: %+v", cfg.Producer)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
}

func TestNewSenderRefusesAnInvalidConfig(t *testing.T) {
	cfg := kafka.NewConfig()
	cfg.Net.MaxOpenRequests = 5 // idempotence forbids it
	if _, err := kafka.NewSender([]string{"127.0.0.1:1"}, cfg); err == nil {
		t.Fatal("accepted an idempotent producer with 5 requests in flight")
	}
	if _, err := kafka.NewSender(nil, nil); err == nil {
		t.Fatal("accepted no broker")
	}
}

func msg(topic, key, payload string, headers map[string]string) *outbox.OutboxMessage {
	id, _ := uuid.NewV7()
	return &outbox.OutboxMessage{ID: id, Topic: topic, Key: key, Payload: []byte(payload), Headers: headers}
}

func TestSendKeepsKeyPayloadHeadersAndPartition(t *testing.T) {
	_, addrs := outboxtest.Kafka(t, 4, "orders")
	s, err := kafka.NewSender(addrs, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var batch []*outbox.OutboxMessage
	for i := range 40 {
		batch = append(batch, msg("orders", fmt.Sprint("order-", i%5), fmt.Sprint(i), map[string]string{"n": fmt.Sprint(i)}))
	}
	batch = append(batch, msg("orders", "", "keyless", nil))
	if err := s.Send(t.Context(), batch); err != nil {
		t.Fatal(err)
	}
	recs := outboxtest.Consume(t, addrs, "orders", len(batch), 10*time.Second)
	if len(recs) != len(batch) {
		t.Fatalf("consumed %d of %d", len(recs), len(batch))
	}
	byID := map[string]*outbox.OutboxMessage{}
	for _, m := range batch {
		byID[m.ID.String()] = m
	}
	partitions := map[string]int32{}
	lastOfKey := map[string]int{}
	for _, r := range recs {
		id, _ := outboxtest.Header(r, kafka.MessageIDHeader)
		m := byID[id]
		if m == nil {
			t.Fatalf("unknown message id %q", id)
		}
		if string(r.Key) != m.Key || string(r.Value) != string(m.Payload) {
			t.Errorf("key/value %q/%q, want %q/%q", r.Key, r.Value, m.Key, m.Payload)
		}
		if m.Key == "" && r.Key != nil {
			t.Errorf("an empty key was sent as %q, want no key", r.Key)
		}
		if v, _ := outboxtest.Header(r, "n"); v != m.Headers["n"] {
			t.Errorf("header n = %q, want %q", v, m.Headers["n"])
		}
		if m.Key == "" {
			continue
		}
		if p, ok := partitions[m.Key]; ok && p != r.Partition {
			t.Errorf("key %s on partitions %d and %d", m.Key, p, r.Partition)
		}
		partitions[m.Key] = r.Partition
		var n int
		if _, err := fmt.Sscan(string(r.Value), &n); err != nil {
			t.Fatalf("value %q is not a number: %v", r.Value, err)
		}
		if last, ok := lastOfKey[m.Key]; ok && n < last {
			t.Errorf("key %s: %d arrived after %d", m.Key, n, last)
		}
		lastOfKey[m.Key] = n
	}
}

func TestSendReportsEachFailedMessage(t *testing.T) {
	_, addrs := outboxtest.Kafka(t, 1, "exists")
	s, err := kafka.NewSender(addrs, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ok1, bad, ok2 := msg("exists", "a", "1", nil), msg("not-created", "b", "2", nil), msg("exists", "c", "3", nil)
	err = s.Send(t.Context(), []*outbox.OutboxMessage{ok1, bad, ok2})
	var se *outbox.SendError
	if !errors.As(err, &se) || len(se.Failed) != 1 || se.Failed[bad.ID] == nil {
		t.Fatalf("err = %v, want a SendError for the one message to a missing topic", err)
	}
	if errors.Is(err, outbox.ErrBrokerUnavailable) {
		t.Fatal("a refused message was reported as an unavailable broker")
	}
}

func TestSendReportsAnUnreachableBroker(t *testing.T) {
	cluster, addrs := outboxtest.Kafka(t, 1, "t")
	s, err := kafka.NewSender(addrs, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	cluster.Close()
	err = s.Send(t.Context(), []*outbox.OutboxMessage{msg("t", "k", "v", nil)})
	if !errors.Is(err, outbox.ErrBrokerUnavailable) {
		t.Fatalf("err = %v, want ErrBrokerUnavailable", err)
	}
}

// TLS and SASL come through the caller's config, as the README shows.
func TestSenderKeepsTheCallersSecurityConfig(t *testing.T) {
	cfg := kafka.NewConfig()
	cfg.Net.TLS.Enable = true
	cfg.Net.TLS.Config = &tls.Config{MinVersion: tls.VersionTLS12}
	cfg.Net.SASL.Enable = true
	cfg.Net.SASL.Mechanism = sarama.SASLTypePlaintext
	cfg.Net.SASL.User, cfg.Net.SASL.Password = "svc", "secret"
	cfg.Net.DialTimeout, cfg.Net.ReadTimeout, cfg.Net.WriteTimeout = 300*time.Millisecond, 300*time.Millisecond, 300*time.Millisecond
	cfg.Metadata.Retry.Max = 0
	// The kfake broker speaks plaintext, so a TLS handshake must fail: the
	// config was used as given.
	_, addrs := outboxtest.Kafka(t, 1, "t")
	s, err := kafka.NewSender(addrs, cfg)
	if err != nil {
		t.Fatal(err) // it connects at the first send
	}
	defer s.Close()
	err = s.Send(t.Context(), []*outbox.OutboxMessage{msg("t", "k", "v", nil)})
	if err == nil {
		t.Fatal("a TLS producer connected to a plaintext broker")
	}
	if !errors.Is(err, outbox.ErrBrokerUnavailable) {
		t.Fatalf("a failed connection is %v, want it to cost no attempt (ErrBrokerUnavailable)", err)
	}
}

// A Sender is made while no broker listens, and sends once one does: a
// service can start during a Kafka outage.
func TestNewSenderConnectsAtTheFirstSend(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().(*net.TCPAddr)
	l.Close()
	s, err := kafka.NewSender([]string{addr.String()}, nil)
	if err != nil {
		t.Fatalf("NewSender with no broker listening: %v", err)
	}
	defer s.Close()
	m := msg("t", "k", "v", nil)
	if err := s.Send(t.Context(), []*outbox.OutboxMessage{m}); !errors.Is(err, outbox.ErrBrokerUnavailable) {
		t.Fatalf("Send with no broker = %v, want ErrBrokerUnavailable", err)
	}
	c, err := kfake.NewCluster(kfake.Ports(addr.Port), kfake.SeedTopics(1, "t"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := s.Send(t.Context(), []*outbox.OutboxMessage{m}); err != nil {
		t.Fatalf("Send once the broker listens: %v", err)
	}
	if n := len(outboxtest.ReadAll(t, []string{addr.String()}, "t", 1, 300*time.Millisecond)); n != 1 {
		t.Fatalf("topic holds %d records, want 1", n)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Send(t.Context(), []*outbox.OutboxMessage{m}); !errors.Is(err, outbox.ErrBrokerUnavailable) {
		t.Fatalf("Send after Close = %v, want ErrBrokerUnavailable", err)
	}
}

// What cannot work is refused with an error, never a panic.
func TestSenderRefusesWhatCannotWork(t *testing.T) {
	if _, err := kafka.NewSender([]string{"127.0.0.1:9092", " "}, nil); err == nil {
		t.Error("accepted an empty broker address")
	}
	if _, err := kafka.NewSenderWithProducer(nil, nil); err == nil {
		t.Error("accepted a nil producer")
	}
	s, err := kafka.NewSender([]string{"127.0.0.1:1"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Send(t.Context(), []*outbox.OutboxMessage{nil}); err == nil {
		t.Error("sent a nil message")
	}
	if kafka.ProducerMessage(nil) != nil {
		t.Error("ProducerMessage(nil) is not nil")
	}
	var nilSender *kafka.Sender
	if err := nilSender.Send(t.Context(), nil); !errors.Is(err, outbox.ErrBrokerUnavailable) {
		t.Errorf("a nil Sender's Send = %v", err)
	}
}

func TestSendHoldsBackAKeyBehindAMessageTooLargeForTheProducer(t *testing.T) {
	_, addrs := outboxtest.Kafka(t, 1, "t")
	cfg := kafka.NewConfig()
	cfg.Producer.MaxMessageBytes = 500
	s, err := kafka.NewSender(addrs, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	a1, a2, a3, b1 := msg("t", "a", "1", nil), msg("t", "a", string(make([]byte, 600)), nil), msg("t", "a", "3", nil), msg("t", "b", "1", nil)
	err = s.Send(t.Context(), []*outbox.OutboxMessage{a1, a2, a3, b1})
	var se *outbox.SendError
	if !errors.As(err, &se) || len(se.Failed) != 2 {
		t.Fatalf("err = %v, want a2 and a3 failed", err)
	}
	if !errors.Is(se.Failed[a3.ID], outbox.ErrHeldBack) || se.Failed[a2.ID] == nil || errors.Is(se.Failed[a2.ID], outbox.ErrHeldBack) {
		t.Fatalf("failed = %v", se.Failed)
	}
	if n := len(outboxtest.ReadAll(t, addrs, "t", 2, 300*time.Millisecond)); n != 2 {
		t.Fatalf("topic holds %d, want a1 and b1", n)
	}
}

// A Send connecting to brokers that do not answer returns when its
// context ends, as an outage; the connection goes on in the Sender, and
// Close waits for it, within sarama's timeouts, before it returns.
func TestAConnectingSendHonoursItsContext(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var held []net.Conn
	accepted := make(chan struct{})
	go func() { // accepts and never answers
		defer close(accepted)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			held = append(held, c)
		}
	}()
	defer func() {
		l.Close()
		<-accepted
		for _, c := range held {
			c.Close()
		}
	}()
	cfg := kafka.NewConfig()
	cfg.Net.ReadTimeout, cfg.Metadata.Retry.Max = 2*time.Second, 0
	s, err := kafka.NewSender([]string{l.Addr().String()}, cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	err = s.Send(ctx, []*outbox.OutboxMessage{msg("t", "k", "v", nil)})
	if !errors.Is(err, outbox.ErrBrokerUnavailable) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a Send whose context ended while connecting returned %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("the Send took %v, its context %v", d, 200*time.Millisecond)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("Close returned %v after the Send began; sarama's timeouts bound it", d)
	}
	if err := s.Send(t.Context(), []*outbox.OutboxMessage{msg("t", "k", "v", nil)}); !errors.Is(err, outbox.ErrBrokerUnavailable) {
		t.Fatalf("Send after Close = %v", err)
	}
}
