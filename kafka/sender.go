package kafka

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/IBM/sarama"
	"github.com/eapache/go-resiliency/breaker"
	"github.com/google/uuid"

	"github.com/gorm-outbox/outbox"
)

// MessageIDHeader carries the outbox message's id (a UUIDv7). It is the same
// on every send of a message, so consumers drop duplicates by it.
const MessageIDHeader = "outbox-message-id"

// Sender sends outbox messages with a sarama SyncProducer.
type Sender struct {
	// mu guards producer, closed and dial: Send shares the producer, a
	// (re)connection replaces it, Close ends it.
	mu       sync.RWMutex
	producer sarama.SyncProducer // nil until the first send connects
	closed   bool
	dial     *dialing       // the connection in progress, if any
	dials    sync.WaitGroup // the goroutine of dial, which Close waits for
	owned    bool           // the Sender makes its producer, and closes it
	// brokers and cfg make an owned producer, at the first send and again
	// after an outage: sarama's circuit breakers keep a producer failing
	// for 10s after its broker returns, a fresh producer connects at once.
	brokers []string
	cfg     *sarama.Config
	stale   atomic.Bool // the producer saw the broker unavailable
	// maxMessageBytes is the producer's Producer.MaxMessageBytes (0: unknown).
	// sarama refuses a larger message alone and sends the rest of the
	// batch, which would let a key's later messages overtake it; Send
	// checks first and holds them back.
	maxMessageBytes int
	recordVersion   int
}

var _ outbox.Sender = (*Sender)(nil)

// NewSender returns a Sender whose producer connects to brokers at the
// first Send, so that a service can start while Kafka is down: until the
// brokers answer, each Send fails with outbox.ErrBrokerUnavailable, which
// costs the messages no attempt, and the publisher pauses and tries again.
// cfg nil means NewConfig(); a config of yours (for TLS, SASL...) is used as
// you set it, except that the producer must return successes and errors,
// which a SyncProducer needs. It returns an error only for what no retry
// mends: no broker address, or a config that sarama refuses.
func NewSender(brokers []string, cfg *sarama.Config) (*Sender, error) {
	if len(brokers) == 0 {
		return nil, fmt.Errorf("outbox/kafka: no broker addresses")
	}
	for i, b := range brokers {
		if strings.TrimSpace(b) == "" {
			return nil, fmt.Errorf("outbox/kafka: broker address %d of %d is empty", i+1, len(brokers))
		}
	}
	if cfg == nil {
		cfg = NewConfig()
	} else {
		c := *cfg
		cfg = &c
		cfg.Producer.Return.Successes = true
		cfg.Producer.Return.Errors = true
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("outbox/kafka: invalid producer config: %w", err)
	}
	return &Sender{owned: true, brokers: slices.Clone(brokers), cfg: cfg,
		maxMessageBytes: cfg.Producer.MaxMessageBytes, recordVersion: recordVersion(cfg)}, nil
}

// NewSenderWithProducer sends with a producer you made and will close. cfg
// is the producer's config, or nil if unknown; with it, Send refuses a
// message over Producer.MaxMessageBytes without letting the later messages
// of its key overtake it. A nil producer is refused.
func NewSenderWithProducer(p sarama.SyncProducer, cfg *sarama.Config) (*Sender, error) {
	if p == nil || reflect.ValueOf(p).Kind() == reflect.Pointer && reflect.ValueOf(p).IsNil() {
		return nil, fmt.Errorf("outbox/kafka: the producer is nil")
	}
	s := &Sender{producer: p}
	if cfg != nil {
		s.maxMessageBytes, s.recordVersion = cfg.Producer.MaxMessageBytes, recordVersion(cfg)
	}
	return s, nil
}

func recordVersion(cfg *sarama.Config) int {
	if cfg.Version.IsAtLeast(sarama.V0_11_0_0) {
		return 2
	}
	return 1
}

// System is the messaging.system of the sender's spans.
func (s *Sender) System() string { return "kafka" }

// Close closes the producer if NewSender made it; a closed Sender's Send
// fails with outbox.ErrBrokerUnavailable. A connection in progress is
// waited for (sarama's Net timeouts bound it) and closed.
func (s *Sender) Close() error {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	s.closed = true
	p := s.producer
	if s.owned {
		s.producer = nil
	}
	s.mu.Unlock()
	s.dials.Wait()
	if !s.owned || p == nil {
		return nil
	}
	return p.Close()
}

// errNoSender is what a nil *Sender's Send returns: it costs the messages no
// attempt, and says what to fix.
var errNoSender = fmt.Errorf("%w: outbox/kafka: the *kafka.Sender is nil (did NewSender return an error?)", outbox.ErrBrokerUnavailable)

// Send implements outbox.Sender.
//
// A batch goes out in waves, each one SendMessages call: the first holds
// the oldest message of every key (and every keyless message), the second
// the next of every key, and so on. sarama may split one call into several
// produce requests, and a refused request does not stop a later one, so a
// key's second message could otherwise land while its first was refused.
// After a wave, the later messages of a key that failed are held back
// (outbox.ErrHeldBack). A batch of distinct keys is a single wave.
//
// sarama cannot be cancelled mid-send; ctx is checked before each wave, and
// sarama's own timeouts (Net.*Timeout, Producer.Timeout, Producer.Retry)
// bound it.
func (s *Sender) Send(ctx context.Context, msgs []*outbox.OutboxMessage) error {
	if s == nil {
		return errNoSender
	}
	if slices.Contains(msgs, nil) {
		return fmt.Errorf("outbox/kafka: the batch holds a nil message")
	}
	if err := s.connect(ctx); err != nil {
		return err
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.producer == nil || s.closed {
		return fmt.Errorf("%w: outbox/kafka: sender is closed", outbox.ErrBrokerUnavailable)
	}
	err := s.send(ctx, msgs)
	if s.owned && errors.Is(err, outbox.ErrBrokerUnavailable) {
		s.stale.Store(true)
	}
	return err
}

// dialing is one connection of the producer, shared by the Sends that
// wait for it.
type dialing struct {
	done chan struct{}
	err  error // set before done is closed
}

// connect makes an owned producer where there is none yet, or replaces one
// that saw an outage, and waits for it as long as ctx allows. While the
// brokers are away the new producer cannot connect: a stale one is kept
// for the next try, and the error says the broker is unavailable, whatever
// sarama's reason (refused, timed out, a TLS or SASL handshake that
// failed), so that it costs no attempt. sarama cannot be cancelled, so the
// connection runs in a goroutine of the Sender's: a Send whose ctx ends
// returns, and the connection serves the next one.
func (s *Sender) connect(ctx context.Context) error {
	// The common case under a read lock: the write lock would wait for
	// every other worker's send in flight, and serialize them.
	s.mu.RLock()
	connected := !s.owned || s.closed || s.producer != nil && !s.stale.Load()
	s.mu.RUnlock()
	if connected {
		return nil
	}
	s.mu.Lock()
	if !s.owned || s.closed || s.producer != nil && !s.stale.Load() {
		s.mu.Unlock()
		return nil
	}
	d := s.dial
	if d == nil {
		d = &dialing{done: make(chan struct{})}
		s.dial = d
		s.dials.Add(1)
		go s.dialProducer(d)
	}
	s.mu.Unlock()
	select {
	case <-d.done:
		return d.err
	case <-ctx.Done():
		return fmt.Errorf("%w: outbox/kafka: connecting to %v: %w", outbox.ErrBrokerUnavailable, s.brokers, ctx.Err())
	}
}

// dialProducer connects a producer for d and puts it in place.
func (s *Sender) dialProducer(d *dialing) {
	defer s.dials.Done()
	p, err := sarama.NewSyncProducer(s.brokers, s.cfg)
	s.mu.Lock()
	defer s.mu.Unlock()
	defer close(d.done)
	s.dial = nil
	switch {
	case err != nil:
		d.err = fmt.Errorf("%w: outbox/kafka: connecting to %v: %w", outbox.ErrBrokerUnavailable, s.brokers, err)
	case s.closed:
		_ = p.Close()
		d.err = fmt.Errorf("%w: outbox/kafka: sender is closed", outbox.ErrBrokerUnavailable)
	default:
		if s.producer != nil {
			_ = s.producer.Close()
		}
		s.producer = p
		s.stale.Store(false)
	}
}

func (s *Sender) send(ctx context.Context, msgs []*outbox.OutboxMessage) error {
	failed := map[uuid.UUID]error{}
	failedKeys := map[string]bool{}
	var waves [][]*outbox.OutboxMessage
	depth := map[string]int{}
	for _, m := range msgs {
		w := 0
		if m.Key != "" {
			w = depth[m.Key]
			depth[m.Key]++
		}
		if w == len(waves) {
			waves = append(waves, nil)
		}
		waves[w] = append(waves[w], m)
	}
	var stop error // the broker is away, or ctx ended: the rest is not tried
	for _, wave := range waves {
		var send []*outbox.OutboxMessage
		for _, m := range wave {
			switch {
			case stop != nil:
				failed[m.ID] = stop
			case m.Key != "" && failedKeys[m.Key]:
				failed[m.ID] = outbox.ErrHeldBack
			default:
				send = append(send, m)
			}
		}
		if len(send) == 0 {
			continue
		}
		if err := ctx.Err(); err != nil {
			stop = err
			for _, m := range send {
				failed[m.ID] = err
			}
			continue
		}
		for id, err := range s.sendWave(send) {
			failed[id] = err
			if errors.Is(err, outbox.ErrBrokerUnavailable) {
				stop = err
			}
		}
		for _, m := range send {
			if failed[m.ID] != nil && m.Key != "" {
				failedKeys[m.Key] = true
			}
		}
	}
	if len(failed) == 0 {
		return nil
	}
	if len(failed) == len(msgs) {
		// The broker as a whole was away: say so, rather than the same
		// error once per message.
		var first error
		away := true
		for _, err := range failed {
			if first == nil {
				first = err
			}
			away = away && errors.Is(err, outbox.ErrBrokerUnavailable)
		}
		if away {
			return first
		}
	}
	return &outbox.SendError{Failed: failed}
}

// sendWave sends messages of distinct keys with one SendMessages and returns
// the errors of those that failed.
func (s *Sender) sendWave(msgs []*outbox.OutboxMessage) map[uuid.UUID]error {
	failed := map[uuid.UUID]error{}
	batch := make([]*sarama.ProducerMessage, 0, len(msgs))
	byMsg := make(map[*sarama.ProducerMessage]uuid.UUID, len(msgs))
	for _, m := range msgs {
		pm := ProducerMessage(m)
		if size := pm.ByteSize(s.recordVersion); s.maxMessageBytes > 0 && size > s.maxMessageBytes {
			// sarama would refuse it alone and send the rest; refusing it
			// here lets Send hold its key's later messages back.
			failed[m.ID] = fmt.Errorf("outbox/kafka: message of %d bytes is larger than Producer.MaxMessageBytes (%d)", size, s.maxMessageBytes)
			continue
		}
		batch = append(batch, pm)
		byMsg[pm] = m.ID
	}
	if len(batch) == 0 {
		return failed
	}
	err := s.producer.SendMessages(batch)
	if err == nil {
		return failed
	}
	var perMsg sarama.ProducerErrors
	if !errors.As(err, &perMsg) {
		for _, pm := range batch {
			failed[byMsg[pm]] = classify(err)
		}
		return failed
	}
	for _, pe := range perMsg {
		if id, ok := byMsg[pe.Msg]; ok {
			failed[id] = classify(pe.Err)
		}
	}
	return failed
}

// ProducerMessage is the Kafka record for an outbox message: its key, its
// payload, its headers, and the MessageIDHeader.
func ProducerMessage(m *outbox.OutboxMessage) *sarama.ProducerMessage {
	if m == nil {
		return nil
	}
	pm := &sarama.ProducerMessage{Topic: m.Topic, Value: sarama.ByteEncoder(m.Payload)}
	if m.Key != "" {
		pm.Key = sarama.StringEncoder(m.Key)
	}
	pm.Headers = make([]sarama.RecordHeader, 0, len(m.Headers)+1)
	for k, v := range m.Headers {
		pm.Headers = append(pm.Headers, sarama.RecordHeader{Key: []byte(k), Value: []byte(v)})
	}
	pm.Headers = append(pm.Headers, sarama.RecordHeader{Key: []byte(MessageIDHeader), Value: []byte(m.ID.String())})
	return pm
}

// unavailable are the errors that say the cluster could not take the message
// now, whatever the message: they cost it no attempt.
var unavailable = []error{
	sarama.ErrOutOfBrokers, sarama.ErrNotConnected, sarama.ErrClosedClient, sarama.ErrShuttingDown,
	sarama.ErrLeaderNotAvailable, sarama.ErrNotLeaderForPartition, sarama.ErrRequestTimedOut,
	sarama.ErrBrokerNotAvailable, sarama.ErrNetworkException, sarama.ErrNotEnoughReplicas,
	sarama.ErrNotEnoughReplicasAfterAppend, sarama.ErrKafkaStorageError, breaker.ErrBreakerOpen,
	io.EOF, io.ErrUnexpectedEOF, syscall.ECONNREFUSED, syscall.ECONNRESET, syscall.EPIPE,
}

func classify(err error) error {
	for _, u := range unavailable {
		if errors.Is(err, u) {
			return fmt.Errorf("%w: %w", outbox.ErrBrokerUnavailable, err)
		}
	}
	var ne net.Error
	if errors.As(err, &ne) {
		return fmt.Errorf("%w: %w", outbox.ErrBrokerUnavailable, err)
	}
	return err
}
