package kafka

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/IBM/sarama"
	"github.com/google/uuid"

	"github.com/gorm-outbox/outbox"
)

// TransactionHeader carries, in exactly-once mode, the id of the Kafka
// transaction that delivered the message (its claim's token): the records
// of one transaction share it, so a consumer can tell transactions apart.
const TransactionHeader = "outbox-transaction"

// DefaultSlots is how many transactional producers the publishers of a
// table share (WithSlots): one per worker of every publisher, with room.
const DefaultSlots = 16

// TransactionalSender delivers each batch in one Kafka transaction, which
// makes the publisher exactly-once for consumers reading with
// isolation.level=read_committed (see docs/exactly-once.md). Its producers
// are the slots of outbox.TransactionalSender, with the transactional ids
// "<id>-0" to "<id>-<slots-1>".
//
// The transaction also commits a marker: the batch's claim token, as the
// committed offset of the consumer group named after the slot's
// transactional id, on partition 0 of the marker topic. Kafka keeps one
// such offset per slot (in __consumer_offsets, compacted), which bounds
// the markers; a publisher that takes a slot over reads it to tell whether
// the last batch its predecessor claimed was committed.
type TransactionalSender struct {
	brokers     []string
	cfg         *sarama.Config
	id          string
	slots       int
	markerTopic string

	mu          sync.Mutex
	topicExists bool
	closed      bool
	open        map[*slotProducer]bool
	opening     sync.WaitGroup // OpenSlot's goroutines, which Close waits for

	beforeCommit func() // a test's pause between a transaction's sends and its commit
}

var _ outbox.TransactionalSender = (*TransactionalSender)(nil)

// TransactionalOption configures a TransactionalSender.
type TransactionalOption func(*TransactionalSender)

// WithSlots sets how many producers the publishers of the table share
// (defaults to DefaultSlots). Every publisher of the table must use the
// same number, and it should cover every publisher's workers: a worker
// without a free slot waits for one.
func WithSlots(n int) TransactionalOption { return func(s *TransactionalSender) { s.slots = n } }

// WithMarkerTopic sets the topic whose partition 0 the markers are
// committed on (defaults to "<id>-markers"). The sender creates it, with
// one partition, if it does not exist; it never holds a record.
func WithMarkerTopic(topic string) TransactionalOption {
	return func(s *TransactionalSender) { s.markerTopic = topic }
}

// NewTransactionalSender returns the exactly-once Sender. transactionalID
// names the table's producers on the cluster: it must be the same for
// every publisher of one outbox table, and different for every other
// table and application on the cluster, or their producers fence each
// other. cfg nil means NewConfig(); of yours it keeps the network and
// security settings, and sets what a transactional producer needs
// (idempotence, acks from all in-sync replicas, one request in flight).
// The brokers need not be up yet.
func NewTransactionalSender(brokers []string, transactionalID string, cfg *sarama.Config, opts ...TransactionalOption) (*TransactionalSender, error) {
	if len(brokers) == 0 {
		return nil, fmt.Errorf("outbox/kafka: no broker addresses")
	}
	for i, b := range brokers {
		if strings.TrimSpace(b) == "" {
			return nil, fmt.Errorf("outbox/kafka: broker address %d of %d is empty", i+1, len(brokers))
		}
	}
	if strings.TrimSpace(transactionalID) == "" {
		return nil, fmt.Errorf("outbox/kafka: the transactional id is empty; name the outbox table's producers, e.g. \"orders-outbox\"")
	}
	if cfg == nil {
		cfg = NewConfig()
	} else {
		c := *cfg
		cfg = &c
	}
	cfg.Producer.Idempotent = true
	cfg.Producer.RequiredAcks = sarama.WaitForAll
	cfg.Net.MaxOpenRequests = 1
	cfg.Producer.Return.Successes = true
	cfg.Producer.Return.Errors = true
	if !cfg.Version.IsAtLeast(sarama.V0_11_0_0) {
		return nil, fmt.Errorf("outbox/kafka: transactions need a Kafka protocol version of at least 0.11 in the config (Version), got %v", cfg.Version)
	}
	s := &TransactionalSender{brokers: slices.Clone(brokers), cfg: cfg, id: transactionalID, slots: DefaultSlots,
		markerTopic: transactionalID + "-markers", open: map[*slotProducer]bool{}}
	for i, o := range opts {
		if o == nil {
			return nil, fmt.Errorf("outbox/kafka: transactional option %d of %d is nil", i+1, len(opts))
		}
		o(s)
	}
	if s.slots <= 0 {
		return nil, fmt.Errorf("outbox/kafka: slots (WithSlots) must be positive, got %d", s.slots)
	}
	if strings.TrimSpace(s.markerTopic) == "" {
		return nil, fmt.Errorf("outbox/kafka: the marker topic (WithMarkerTopic) is empty")
	}
	probe := *cfg
	probe.Producer.Transaction.ID = s.TransactionalID(s.slots - 1)
	if err := probe.Validate(); err != nil {
		return nil, fmt.Errorf("outbox/kafka: invalid producer config: %w", err)
	}
	return s, nil
}

// Slots implements outbox.TransactionalSender.
func (s *TransactionalSender) Slots() int { return s.slots }

// TransactionalID implements outbox.TransactionalSender.
func (s *TransactionalSender) TransactionalID(slot int) string {
	return fmt.Sprintf("%s-%d", s.id, slot)
}

// MarkerTopic is the topic the markers are committed on.
func (s *TransactionalSender) MarkerTopic() string { return s.markerTopic }

// System is the messaging.system of the sender's spans.
func (s *TransactionalSender) System() string { return "kafka" }

// Send implements outbox.Sender for a use outside a publisher's
// exactly-once mode, which has no slot to send in: it refuses.
func (s *TransactionalSender) Send(context.Context, []*outbox.OutboxMessage) error {
	return errors.New("outbox/kafka: a TransactionalSender sends only through an outbox.Publisher, which holds its slots")
}

// Close closes the slots' producers still open; their open transactions
// are aborted by the broker.
func (s *TransactionalSender) Close() error {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	s.closed = true
	open := make([]*slotProducer, 0, len(s.open))
	for p := range s.open {
		open = append(open, p)
	}
	s.mu.Unlock()
	s.opening.Wait()
	var errs []error
	for _, p := range open {
		errs = append(errs, p.Close())
	}
	return errors.Join(errs...)
}

// OpenSlot implements outbox.TransactionalSender. sarama cannot be
// cancelled: the connection and the producer's initialisation run in a
// goroutine of the sender's, and a ctx that ends first returns at once
// while that goroutine closes what it made.
func (s *TransactionalSender) OpenSlot(ctx context.Context, slot int) (outbox.SlotProducer, error) {
	if slot < 0 || slot >= s.slots {
		return nil, fmt.Errorf("outbox/kafka: slot %d is out of range [0, %d)", slot, s.slots)
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, fmt.Errorf("%w: outbox/kafka: sender is closed", outbox.ErrBrokerUnavailable)
	}
	s.opening.Add(1)
	s.mu.Unlock()
	type opened struct {
		p   *slotProducer
		err error
	}
	done := make(chan opened, 1)
	go func() {
		defer s.opening.Done()
		p, err := s.openSlot(slot)
		done <- opened{p, err}
	}()
	select {
	case o := <-done:
		return o.p, o.err
	case <-ctx.Done():
		go func() {
			if o := <-done; o.p != nil {
				_ = o.p.Close()
			}
		}()
		return nil, fmt.Errorf("%w: outbox/kafka: opening slot %d: %w", outbox.ErrBrokerUnavailable, slot, ctx.Err())
	}
}

func (s *TransactionalSender) openSlot(slot int) (*slotProducer, error) {
	id := s.TransactionalID(slot)
	cfg := *s.cfg
	cfg.Producer.Transaction.ID = id
	client, err := sarama.NewClient(s.brokers, &cfg)
	if err != nil {
		return nil, fmt.Errorf("%w: outbox/kafka: connecting to %v: %w", outbox.ErrBrokerUnavailable, s.brokers, err)
	}
	if err := s.ensureMarkerTopic(client); err != nil {
		_ = client.Close()
		return nil, err
	}
	// The producer's InitProducerId is the fence: the broker bumps the
	// transactional id's epoch and ends its predecessor's transaction.
	producer, err := sarama.NewSyncProducerFromClient(client)
	if err != nil {
		_ = client.Close()
		return nil, openError(id, err)
	}
	p := &slotProducer{s: s, id: id, client: client, producer: producer}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		_ = p.close()
		return nil, fmt.Errorf("%w: outbox/kafka: sender is closed", outbox.ErrBrokerUnavailable)
	}
	s.open[p] = true
	return p, nil
}

// ensureMarkerTopic creates the marker topic once, if it is missing.
func (s *TransactionalSender) ensureMarkerTopic(client sarama.Client) error {
	s.mu.Lock()
	exists := s.topicExists
	s.mu.Unlock()
	if exists {
		return nil
	}
	if err := client.RefreshMetadata(s.markerTopic); err == nil {
		if parts, err := client.Partitions(s.markerTopic); err == nil && len(parts) > 0 {
			s.mu.Lock()
			s.topicExists = true
			s.mu.Unlock()
			return nil
		}
	}
	admin, err := sarama.NewClusterAdminFromClient(client)
	if err != nil {
		return fmt.Errorf("%w: outbox/kafka: %w", outbox.ErrBrokerUnavailable, err)
	}
	// Not closed: closing the admin closes the client, which the slot keeps.
	err = admin.CreateTopic(s.markerTopic, &sarama.TopicDetail{NumPartitions: 1, ReplicationFactor: -1}, false)
	if err != nil && !errors.Is(err, sarama.ErrTopicAlreadyExists) {
		var te *sarama.TopicError
		if errors.As(err, &te) && te.Err == sarama.ErrTopicAlreadyExists {
			err = nil
		}
	}
	if err != nil && !errors.Is(err, sarama.ErrTopicAlreadyExists) {
		return &outbox.SlotError{TransactionalID: s.id, Err: fmt.Errorf(
			"the marker topic %q does not exist and cannot be created (%w); create it with one partition, or name another with WithMarkerTopic", s.markerTopic, err)}
	}
	s.mu.Lock()
	s.topicExists = true
	s.mu.Unlock()
	return nil
}

// openError says in plain words why the broker refuses a transactional
// producer, where the cause is one a user can act on.
func openError(id string, err error) error {
	switch {
	case errors.Is(err, sarama.ErrTransactionalIDAuthorizationFailed):
		return &outbox.SlotError{TransactionalID: id, Err: fmt.Errorf("not authorized: grant WRITE and DESCRIBE on TransactionalId %q (or its prefix) in the cluster's ACLs: %w", id, err)}
	case errors.Is(err, sarama.ErrUnsupportedVersion), errors.Is(err, sarama.ErrUnsupportedForMessageFormat):
		return &outbox.SlotError{TransactionalID: id, Err: fmt.Errorf("the broker does not support transactions (Kafka 0.11 or later, with a message format of 0.11 or later, is needed): %w", err)}
	case errors.Is(err, sarama.ErrClusterAuthorizationFailed):
		return &outbox.SlotError{TransactionalID: id, Err: fmt.Errorf("not authorized: grant IDEMPOTENT_WRITE on the cluster: %w", err)}
	case errors.Is(err, sarama.ErrConsumerCoordinatorNotAvailable), errors.Is(err, sarama.ErrNotEnoughReplicas):
		return fmt.Errorf("%w: outbox/kafka: no transaction coordinator for %q: a cluster with fewer brokers than transaction.state.log.replication.factor (3 by default) cannot run transactions until it is lowered: %w",
			outbox.ErrBrokerUnavailable, id, err)
	}
	return classify(fmt.Errorf("outbox/kafka: starting the transactional producer %q: %w", id, err))
}

// slotProducer is one slot's transactional producer and the client it
// reads its marker with.
type slotProducer struct {
	s        *TransactionalSender
	id       string
	client   sarama.Client
	producer sarama.SyncProducer
	once     sync.Once
	closeErr error
}

// SendInTransaction implements outbox.SlotProducer.
func (p *slotProducer) SendInTransaction(ctx context.Context, token string, msgs []*outbox.OutboxMessage, ready func() error) error {
	if slices.Contains(msgs, nil) {
		return fmt.Errorf("outbox/kafka: the batch holds a nil message")
	}
	// A message the producer would refuse alone is refused before the
	// transaction begins: the rest then goes in the next one, and the
	// refused message's key waits behind it.
	batch := make([]*sarama.ProducerMessage, 0, len(msgs))
	byMsg := make(map[*sarama.ProducerMessage]*outbox.OutboxMessage, len(msgs))
	max, version := p.s.cfg.Producer.MaxMessageBytes, recordVersion(p.s.cfg)
	for _, m := range msgs {
		pm := ProducerMessage(m)
		pm.Headers = append(pm.Headers, sarama.RecordHeader{Key: []byte(TransactionHeader), Value: []byte(token)})
		if size := pm.ByteSize(version); max > 0 && size > max {
			return &outbox.SendError{Failed: heldBehind(msgs, m, fmt.Errorf("outbox/kafka: message of %d bytes is larger than Producer.MaxMessageBytes (%d)", size, max))}
		}
		batch = append(batch, pm)
		byMsg[pm] = m
	}
	if err := ctx.Err(); err != nil {
		return asOutage(err)
	}
	// A broker refuses a record batch larger than its message.max.bytes
	// (or the topic's max.message.bytes), which can be below the
	// producer's Producer.MaxMessageBytes: then every record of the batch
	// comes back "too large", though none may be. While a send has more
	// than one such record, the transaction is aborted and sent again in
	// halved sends; a record refused alone in its send is refused for
	// itself.
	for chunk := len(batch); ; chunk = (chunk + 1) / 2 {
		if err := p.producer.BeginTxn(); err != nil {
			return p.inDoubt("beginning a transaction", err)
		}
		sendErr := p.sendInChunks(batch, chunk)
		if sendErr == nil {
			break
		}
		var perMsg sarama.ProducerErrors
		hasPerMsg := errors.As(sendErr, &perMsg)
		tooLarge := chunk > 1 && batchTooLarge(perMsg)
		err := p.abort(sendErr, func() error {
			switch {
			case tooLarge:
				return nil // sent again, in smaller sends
			case !hasPerMsg:
				// The transaction failed, not a record of it: no message
				// is to blame, and none is charged an attempt.
				return asOutage(sendErr)
			}
			se := &outbox.SendError{Failed: make(map[uuid.UUID]error, len(perMsg))}
			for _, pe := range perMsg {
				if m, ok := byMsg[pe.Msg]; ok {
					se.Failed[m.ID] = refusalOrOutage(pe.Err)
				}
			}
			return se
		})
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return asOutage(err)
		}
	}
	if ready != nil {
		if err := ready(); err != nil {
			return p.abort(err, func() error { return fmt.Errorf("outbox/kafka: the batch may not be committed: %w", err) })
		}
	}
	offset := time.Now().UnixMilli()
	marker := map[string][]*sarama.PartitionOffsetMetadata{
		p.s.markerTopic: {{Partition: 0, Offset: offset, Metadata: &token}},
	}
	if err := p.producer.AddOffsetsToTxn(marker, p.id); err != nil {
		return p.abort(err, func() error {
			return asOutage(fmt.Errorf("outbox/kafka: adding the marker to the transaction: %w", err))
		})
	}
	if p.s.beforeCommit != nil {
		p.s.beforeCommit()
	}
	if err := p.producer.CommitTxn(); err != nil {
		return p.inDoubt("committing", err)
	}
	return nil
}

// batchTooLarge reports whether more than one record of a send came back
// too large: then a record batch of several was refused, and not
// necessarily for any one record. Counted across partitions: a refused
// record batch's error can also come back on records of the same send that
// another partition took.
func batchTooLarge(errs sarama.ProducerErrors) bool {
	refused := 0
	for _, pe := range errs {
		if pe.Msg != nil && errors.Is(pe.Err, sarama.ErrMessageSizeTooLarge) {
			if refused++; refused > 1 {
				return true
			}
		}
	}
	return false
}

// sendInChunks sends batch in the open transaction, chunk records a send:
// each send's records of one partition make one record batch.
func (p *slotProducer) sendInChunks(batch []*sarama.ProducerMessage, chunk int) error {
	for start := 0; start < len(batch); start += chunk {
		if err := p.producer.SendMessages(batch[start:min(start+chunk, len(batch))]); err != nil {
			return err
		}
	}
	return nil
}

// abort ends a transaction that failed before its commit. If the abort
// succeeds nothing was committed and cause() says why; if it fails, the
// outcome is left to the slot's next opening.
func (p *slotProducer) abort(err error, cause func() error) error {
	if p.producer.TxnStatus()&sarama.ProducerTxnFlagFatalError != 0 {
		return p.inDoubt("sending", err)
	}
	if abortErr := p.producer.AbortTxn(); abortErr != nil {
		return p.inDoubt("aborting after "+err.Error(), abortErr)
	}
	return cause()
}

// asOutage is err as an outage (outbox.ErrBrokerUnavailable): the batch
// is handed back whole, with no attempt counted, and the publisher pauses.
func asOutage(err error) error {
	if errors.Is(err, outbox.ErrBrokerUnavailable) {
		return err
	}
	return fmt.Errorf("%w: %w", outbox.ErrBrokerUnavailable, err)
}

func (p *slotProducer) inDoubt(what string, err error) error {
	if fenced(err) {
		return fmt.Errorf("%w: %w: outbox/kafka: %s in slot %s: %w", outbox.ErrTransactionInDoubt, outbox.ErrFenced, what, p.id, err)
	}
	return fmt.Errorf("%w: outbox/kafka: %s in slot %s: %w", outbox.ErrTransactionInDoubt, what, p.id, err)
}

// LastCommitted implements outbox.SlotProducer: the marker's metadata.
func (p *slotProducer) LastCommitted(context.Context) (string, error) {
	coordinator, err := p.client.Coordinator(p.id)
	if err != nil {
		return "", classify(fmt.Errorf("outbox/kafka: finding the group coordinator of %s: %w", p.id, err))
	}
	req := sarama.NewOffsetFetchRequest(p.s.cfg.Version, p.id, map[string][]int32{p.s.markerTopic: {0}})
	req.RequireStable = true
	resp, err := coordinator.FetchOffset(req)
	if err != nil {
		return "", classify(fmt.Errorf("outbox/kafka: reading the marker of %s: %w", p.id, err))
	}
	if errors.Is(resp.Err, sarama.ErrGroupIDNotFound) {
		return "", nil // no transaction of the slot ever committed
	}
	if resp.Err != sarama.ErrNoError {
		return "", classify(fmt.Errorf("outbox/kafka: reading the marker of %s: %w", p.id, resp.Err))
	}
	block := resp.GetBlock(p.s.markerTopic, 0)
	if block == nil {
		return "", nil
	}
	if errors.Is(block.Err, sarama.ErrGroupIDNotFound) {
		return "", nil
	}
	if block.Err != sarama.ErrNoError {
		return "", classify(fmt.Errorf("outbox/kafka: reading the marker of %s: %w", p.id, block.Err))
	}
	if block.Offset < 0 {
		return "", nil
	}
	return block.Metadata, nil
}

// Close implements outbox.SlotProducer.
func (p *slotProducer) Close() error {
	p.s.mu.Lock()
	delete(p.s.open, p)
	p.s.mu.Unlock()
	return p.close()
}

func (p *slotProducer) close() error {
	p.once.Do(func() {
		p.closeErr = errors.Join(p.producer.Close(), p.client.Close())
	})
	return p.closeErr
}

// heldBehind is the failures of a batch one of whose messages is refused
// before anything is sent: that one with its error, the later messages of
// its key held back; the others are not named and go in the next batch.
func heldBehind(msgs []*outbox.OutboxMessage, refused *outbox.OutboxMessage, err error) map[uuid.UUID]error {
	failed := map[uuid.UUID]error{refused.ID: err}
	seen := false
	for _, m := range msgs {
		if m == refused {
			seen = true
			continue
		}
		if seen && refused.Key != "" && m.Key == refused.Key {
			failed[m.ID] = outbox.ErrHeldBack
		}
	}
	return failed
}

// fenced reports whether err, or the error of any message it reports,
// says a newer producer of the transactional id fenced this one.
func fenced(err error) bool {
	isFenced := func(err error) bool {
		return errors.Is(err, sarama.ErrProducerFenced) || errors.Is(err, sarama.ErrInvalidProducerEpoch)
	}
	if isFenced(err) {
		return true
	}
	var perMsg sarama.ProducerErrors
	if errors.As(err, &perMsg) {
		for _, pe := range perMsg {
			if isFenced(pe.Err) {
				return true
			}
		}
	}
	return false
}

// refusals are the broker's answers that refuse a record for what it is:
// in an aborted transaction, only these cost the record an attempt.
var refusals = []error{
	sarama.ErrInvalidMessage, sarama.ErrMessageSizeTooLarge, sarama.ErrInvalidTopic,
	sarama.ErrTopicAuthorizationFailed, sarama.ErrInvalidRecord, sarama.ErrUnknownTopicOrPartition,
}

// refusalOrOutage classifies a record's error in a transaction that was
// aborted: a refusal of the record, or else (a transaction's state, a
// broker's trouble) an outage that costs no attempt.
func refusalOrOutage(err error) error {
	for _, r := range refusals {
		if errors.Is(err, r) {
			return err
		}
	}
	return asOutage(err)
}
