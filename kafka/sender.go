package kafka

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
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
	producer sarama.SyncProducer
	owned    bool // Close closes the producer only if the Sender made it
	// maxMessageBytes is the producer's Producer.MaxMessageBytes (0: unknown).
	// sarama refuses a larger message alone and sends the rest of the
	// batch, which would let a key's later messages overtake it; Send
	// checks first and holds them back.
	maxMessageBytes int
	recordVersion   int
}

var _ outbox.Sender = (*Sender)(nil)

// NewSender connects a producer to brokers. cfg nil means NewConfig(); a
// config of yours (for TLS, SASL...) is used as you set it, except that the
// producer must return successes and errors, which a SyncProducer needs.
func NewSender(brokers []string, cfg *sarama.Config) (*Sender, error) {
	if len(brokers) == 0 {
		return nil, fmt.Errorf("outbox/kafka: no broker addresses")
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
	p, err := sarama.NewSyncProducer(brokers, cfg)
	if err != nil {
		return nil, fmt.Errorf("outbox/kafka: connecting to %v: %w", brokers, err)
	}
	return &Sender{producer: p, owned: true, maxMessageBytes: cfg.Producer.MaxMessageBytes, recordVersion: recordVersion(cfg)}, nil
}

// NewSenderWithProducer sends with a producer you made and will close. cfg
// is the producer's config, or nil if unknown; with it, Send refuses a
// message over Producer.MaxMessageBytes without letting the later messages
// of its key overtake it.
func NewSenderWithProducer(p sarama.SyncProducer, cfg *sarama.Config) *Sender {
	s := &Sender{producer: p}
	if cfg != nil {
		s.maxMessageBytes, s.recordVersion = cfg.Producer.MaxMessageBytes, recordVersion(cfg)
	}
	return s
}

func recordVersion(cfg *sarama.Config) int {
	if cfg.Version.IsAtLeast(sarama.V0_11_0_0) {
		return 2
	}
	return 1
}

// Close closes the producer if NewSender made it.
func (s *Sender) Close() error {
	if !s.owned {
		return nil
	}
	return s.producer.Close()
}

// Send implements outbox.Sender with one SendMessages call for the batch.
// sarama cannot be cancelled mid-send; ctx is checked before it starts, and
// sarama's own timeouts (Net.*Timeout, Producer.Timeout, Producer.Retry) bound it.
func (s *Sender) Send(ctx context.Context, msgs []*outbox.OutboxMessage) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	batch := make([]*sarama.ProducerMessage, 0, len(msgs))
	byMsg := make(map[*sarama.ProducerMessage]uuid.UUID, len(msgs))
	failed := map[uuid.UUID]error{}
	tooLargeKeys := map[string]bool{}
	for _, m := range msgs {
		if m.Key != "" && tooLargeKeys[m.Key] {
			failed[m.ID] = outbox.ErrHeldBack
			continue
		}
		pm := ProducerMessage(m)
		if size := pm.ByteSize(s.recordVersion); s.maxMessageBytes > 0 && size > s.maxMessageBytes {
			failed[m.ID] = fmt.Errorf("outbox/kafka: message of %d bytes is larger than Producer.MaxMessageBytes (%d)", size, s.maxMessageBytes)
			if m.Key != "" {
				tooLargeKeys[m.Key] = true
			}
			continue
		}
		batch = append(batch, pm)
		byMsg[pm] = m.ID
	}
	var err error
	if len(batch) > 0 {
		err = s.producer.SendMessages(batch)
	}
	if err == nil {
		if len(failed) == 0 {
			return nil
		}
		return &outbox.SendError{Failed: failed}
	}
	var perMsg sarama.ProducerErrors
	if !errors.As(err, &perMsg) {
		if len(failed) == 0 {
			return classify(err)
		}
		for _, pm := range batch {
			failed[byMsg[pm]] = classify(err)
		}
		return &outbox.SendError{Failed: failed}
	}
	allUnavailable := len(failed) == 0
	for _, pe := range perMsg {
		id, ok := byMsg[pe.Msg]
		if !ok {
			continue
		}
		e := classify(pe.Err)
		failed[id] = e
		allUnavailable = allUnavailable && errors.Is(e, outbox.ErrBrokerUnavailable)
	}
	if len(failed) == len(msgs) && allUnavailable {
		return classify(perMsg[0].Err)
	}
	return &outbox.SendError{Failed: failed}
}

// ProducerMessage is the Kafka record for an outbox message: its key, its
// payload, its headers, and the MessageIDHeader.
func ProducerMessage(m *outbox.OutboxMessage) *sarama.ProducerMessage {
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
