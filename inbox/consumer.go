package inbox

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/IBM/sarama"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/internal/inboxstore"
)

// BatchHandler applies several messages of one partition, in offset order,
// on tx (see Handler). It lets an application write a batch's rows in one
// statement. When it fails, the consumer calls it again with one message
// at a time, to find the message that fails and retry only that one.
type BatchHandler func(tx *gorm.DB, ms []Message) error

// Consumer consumes topics with a Kafka consumer group and applies each
// message once in the database: the handler's transaction also records the
// message's identity in the inbox table, and a message already recorded (a
// redelivery after a crash or a rebalance, or the same event published
// twice) is skipped without calling the handler. Offsets are committed to
// Kafka only after the database commit.
type Consumer struct {
	db      *gorm.DB
	store   *inboxstore.Store
	brokers []string
	group   string
	topics  []string
	cfg     config
	tel     *telemetry

	mu      sync.Mutex
	running bool
	stop    context.CancelFunc
	done    chan struct{}
}

// NewConsumer returns a consumer of topics in the consumer group group, on
// the Kafka brokers, applying messages with handler on db, where
// db.Use(inbox.Plugin()) registered the inbox table. It connects to
// nothing until Start or Run.
func NewConsumer(db *gorm.DB, brokers []string, group string, topics []string, handler Handler, opts ...Option) (*Consumer, error) {
	if handler == nil {
		return nil, errors.New("inbox: the handler is nil")
	}
	c, err := newConsumer(db, brokers, group, topics, nil, opts)
	if err != nil {
		return nil, err
	}
	c.cfg.handler = handler
	return c, nil
}

// NewBatchConsumer is NewConsumer with a handler of batches (see
// BatchHandler and WithBatchSize).
func NewBatchConsumer(db *gorm.DB, brokers []string, group string, topics []string, handler BatchHandler, opts ...Option) (*Consumer, error) {
	if handler == nil {
		return nil, errors.New("inbox: the handler is nil")
	}
	return newConsumer(db, brokers, group, topics, handler, opts)
}

func newConsumer(db *gorm.DB, brokers []string, group string, topics []string, handler BatchHandler, opts []Option) (*Consumer, error) {
	store, err := storeOf(db)
	if err != nil {
		return nil, err
	}
	switch {
	case len(brokers) == 0:
		return nil, errors.New("inbox: no Kafka broker address given")
	case strings.TrimSpace(group) == "":
		return nil, errors.New("inbox: the consumer group is empty")
	case len(group) > 255:
		return nil, fmt.Errorf("inbox: the consumer group is %d characters long; at most 255", len(group))
	case len(topics) == 0:
		return nil, errors.New("inbox: no topic given")
	}
	for _, b := range brokers {
		if strings.TrimSpace(b) == "" {
			return nil, errors.New("inbox: a Kafka broker address is empty")
		}
	}
	for _, t := range topics {
		if t == "" {
			return nil, errors.New("inbox: a topic is empty")
		}
	}
	cfg, err := newConfig(opts)
	if err != nil {
		return nil, err
	}
	cfg.batchHandler = handler
	return &Consumer{db: db, store: store, brokers: append([]string(nil), brokers...), group: group,
		topics: append([]string(nil), topics...), cfg: cfg, tel: newTelemetry(cfg.meterProvider, cfg.tracerProvider)}, nil
}

// ErrConsumerRunning is returned by Start and Run on a running consumer.
var ErrConsumerRunning = errors.New("inbox: consumer is already running")

// Start runs the consumer in a goroutine until Stop, or until ctx is done.
func (c *Consumer) Start(ctx context.Context) error {
	runCtx, err := c.begin(ctx)
	if err != nil {
		return err
	}
	go c.run(runCtx)
	return nil
}

// Run runs the consumer until ctx is done or Stop is called. A broker that
// cannot be reached, or a database that fails, pauses it and it tries
// again; it returns nil once stopped.
func (c *Consumer) Run(ctx context.Context) error {
	runCtx, err := c.begin(ctx)
	if err != nil {
		return err
	}
	c.run(runCtx)
	return nil
}

// Stop stops the consumer and waits until it has: the batch in flight is
// committed or rolled back, the marked offsets are committed to Kafka and
// the group is left. If ctx ends first, Stop returns ctx's error; the
// consumer still stops.
func (c *Consumer) Stop(ctx context.Context) error {
	if c == nil {
		return nil
	}
	if ctx == nil {
		ctx = context.Background()
	}
	c.mu.Lock()
	if !c.running {
		c.mu.Unlock()
		return nil
	}
	stop, done := c.stop, c.done
	c.mu.Unlock()
	stop()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (c *Consumer) begin(ctx context.Context) (context.Context, error) {
	if c == nil || c.store == nil {
		return nil, errors.New("inbox: the Consumer was not made by NewConsumer")
	}
	if ctx == nil {
		return nil, errors.New("inbox: the consumer's context is nil")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.running {
		return nil, ErrConsumerRunning
	}
	runCtx, stop := context.WithCancel(ctx)
	c.running, c.stop, c.done = true, stop, make(chan struct{})
	return runCtx, nil
}

func (c *Consumer) run(ctx context.Context) {
	var wg sync.WaitGroup
	defer func() {
		wg.Wait()
		c.mu.Lock()
		c.running = false
		c.stop()
		close(c.done)
		c.mu.Unlock()
	}()
	reg, err := c.tel.observeLag()
	if err == nil {
		defer func() { _ = reg.Unregister() }()
	}
	if c.cfg.retention > 0 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.retain(ctx)
		}()
	}
	log := c.cfg.logger.With("consumer_group", c.group)
	for failures := 0; ctx.Err() == nil; failures++ {
		group, err := sarama.NewConsumerGroup(c.brokers, c.group, c.cfg.sarama)
		if err != nil {
			log.Warn("inbox: cannot reach the Kafka brokers; trying again", "brokers", c.brokers, "error", err)
			sleep(ctx, pause(failures))
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for err := range group.Errors() {
				log.Warn("inbox: consumer group error", "error", err)
			}
		}()
		c.consume(ctx, group, log)
		if err := group.Close(); err != nil {
			log.Warn("inbox: leaving the consumer group", "error", err)
		}
		return
	}
}

// consume runs the group's sessions, one per rebalance, until ctx ends.
func (c *Consumer) consume(ctx context.Context, group sarama.ConsumerGroup, log interface {
	Warn(string, ...any)
}) {
	h := &groupHandler{c: c}
	for failures := 0; ctx.Err() == nil; {
		err := group.Consume(ctx, c.topics, h)
		switch {
		case err == nil:
			failures = 0
		case errors.Is(err, sarama.ErrClosedConsumerGroup):
			return
		default:
			if ctx.Err() != nil {
				return
			}
			log.Warn("inbox: consuming; trying again", "topics", c.topics, "error", err)
			sleep(ctx, pause(failures))
			failures++
		}
	}
}

// retain deletes the identities of applied messages older than the
// retention window, every interval, until ctx ends.
func (c *Consumer) retain(ctx context.Context) {
	t := time.NewTicker(c.cfg.retentionInterval)
	defer t.Stop()
	for {
		n, err := c.store.Cleanup(ctx, c.group, time.Now().Add(-c.cfg.retention), retentionBatch)
		if err != nil && ctx.Err() == nil {
			c.cfg.logger.Warn("inbox: retention", "consumer_group", c.group, "error", err)
		} else if n > 0 {
			c.cfg.logger.Debug("inbox: retention deleted applied messages", "consumer_group", c.group, "rows", n)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// retentionBatch bounds one retention DELETE, so that it holds its locks
// briefly.
const retentionBatch = 1000

// pause is the wait after failures consecutive failures of the database or
// the broker: 100 ms doubling up to 5 s.
func pause(failures int) time.Duration {
	d := 100 * time.Millisecond
	for i := 0; i < failures && d < 5*time.Second; i++ {
		d *= 2
	}
	return min(d, 5*time.Second)
}

// sleep waits d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// databaseUp tells whether the database answers and its inbox table can be
// read: a message that failed while it does not failed because of the
// outage, and is not charged an attempt.
func (c *Consumer) databaseUp(ctx context.Context) bool {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if sqlDB, err := c.db.DB(); err == nil && sqlDB.PingContext(ctx) != nil {
		return false
	}
	return c.store.Readable(ctx) == nil
}
