package outbox

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/google/uuid"
	"gorm.io/gorm"
)

// Publisher relays committed outbox messages to a Sender: it claims a batch
// in a short transaction, sends it with no transaction open, and writes the
// result back. It is at-least-once: a crash between the send and the write-
// back sends that batch again (with the same message ids).
//
// Start it with Start (or Run) and stop it with Stop; it starts no goroutine
// before that.
type Publisher struct {
	store  Store
	sender Sender
	cfg    publisherConfig

	wake chan struct{}

	mu      sync.Mutex
	running bool
	stop    context.CancelFunc // ends the loop after the batch in flight
	abort   context.CancelFunc // cancels the batch in flight
	done    chan struct{}
}

type publisherConfig struct {
	batchSize    int
	pollInterval time.Duration
	lease        time.Duration
	retry        RetryPolicy
	maxPause     time.Duration
	logger       *slog.Logger
	store        Store
}

// PublisherOption configures a Publisher.
type PublisherOption func(*publisherConfig)

// WithBatchSize sets how many messages one claim takes (default 100).
func WithBatchSize(n int) PublisherOption { return func(c *publisherConfig) { c.batchSize = n } }

// WithPollInterval sets how long the publisher waits after finding less than
// a full batch (default 100ms). Wake cuts the wait short.
func WithPollInterval(d time.Duration) PublisherOption {
	return func(c *publisherConfig) { c.pollInterval = d }
}

// WithLease sets how long a claim holds its messages (default 30s). It must
// outlast a batch's send: a claim that expires mid-send lets another
// publisher send the same messages again. Claims of a publisher that dies
// come back to work after it.
func WithLease(d time.Duration) PublisherOption { return func(c *publisherConfig) { c.lease = d } }

// WithRetryPolicy sets the backoff and the attempt budget of failed messages.
func WithRetryPolicy(r RetryPolicy) PublisherOption {
	return func(c *publisherConfig) { c.retry = r }
}

// WithMaxPause caps the publisher's own backoff while the broker or the
// database is unreachable (default 5s): it bounds how long after the outage
// ends the publisher resumes.
func WithMaxPause(d time.Duration) PublisherOption {
	return func(c *publisherConfig) { c.maxPause = d }
}

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) PublisherOption { return func(c *publisherConfig) { c.logger = l } }

// WithStore makes the publisher use store instead of the plugin's.
func WithStore(s Store) PublisherOption { return func(c *publisherConfig) { c.store = s } }

// NewPublisher returns a stopped publisher for the outbox that Plugin
// registered on db, sending with sender.
func NewPublisher(db *gorm.DB, sender Sender, opts ...PublisherOption) (*Publisher, error) {
	cfg := publisherConfig{
		batchSize:    100,
		pollInterval: 100 * time.Millisecond,
		lease:        30 * time.Second,
		retry:        DefaultRetryPolicy,
		maxPause:     5 * time.Second,
	}
	for _, o := range opts {
		o(&cfg)
	}
	if sender == nil {
		return nil, fmt.Errorf("outbox: sender is nil")
	}
	if cfg.batchSize <= 0 {
		return nil, fmt.Errorf("outbox: batch size must be positive, got %d", cfg.batchSize)
	}
	if cfg.pollInterval <= 0 || cfg.lease <= 0 || cfg.maxPause <= 0 {
		return nil, fmt.Errorf("outbox: poll interval, lease and max pause must be positive")
	}
	cfg.retry = cfg.retry.withDefaults()
	if cfg.logger == nil {
		cfg.logger = slog.Default()
	}
	store := cfg.store
	if store == nil {
		s, err := StoreOf(db)
		if err != nil {
			return nil, err
		}
		store = s
	}
	return &Publisher{store: store, sender: sender, cfg: cfg, wake: make(chan struct{}, 1)}, nil
}

// ErrPublisherRunning is returned by Start and Run on a running publisher.
var ErrPublisherRunning = errors.New("outbox: publisher is already running")

// Start runs the publisher in a goroutine until Stop, or until ctx is done.
func (p *Publisher) Start(ctx context.Context) error {
	loopCtx, err := p.begin(ctx)
	if err != nil {
		return err
	}
	go p.loop(loopCtx)
	return nil
}

// Run runs the publisher until ctx is done or Stop is called, then returns
// nil once the batch in flight is finished or handed back.
func (p *Publisher) Run(ctx context.Context) error {
	loopCtx, err := p.begin(ctx)
	if err != nil {
		return err
	}
	p.loop(loopCtx)
	return nil
}

type abortKey struct{}

func (p *Publisher) begin(ctx context.Context) (context.Context, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.running {
		return nil, ErrPublisherRunning
	}
	loopCtx, stop := context.WithCancel(ctx)
	// The batch in flight runs on a context that a stop does not cancel, so
	// that what was sent is also recorded; only Stop's deadline aborts it.
	abortCtx, abort := context.WithCancel(context.WithoutCancel(ctx))
	p.running, p.stop, p.abort, p.done = true, stop, abort, make(chan struct{})
	return context.WithValue(loopCtx, abortKey{}, abortCtx), nil
}

// Stop asks the publisher to stop and waits until it has: the batch in
// flight is sent and recorded, or, if it was not yet sent, handed back. If
// ctx ends first, the batch in flight is cancelled (what it had not recorded
// becomes due again when its lease expires), and Stop still waits for the
// goroutine before returning ctx's error.
func (p *Publisher) Stop(ctx context.Context) error {
	p.mu.Lock()
	if !p.running {
		p.mu.Unlock()
		return nil
	}
	stop, abort, done := p.stop, p.abort, p.done
	p.mu.Unlock()
	stop()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		abort()
		<-done
		return ctx.Err()
	}
}

// Wake makes a waiting publisher look for work now instead of at its next
// poll. Call it after committing a transaction that enqueued; it never blocks.
func (p *Publisher) Wake() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

func (p *Publisher) loop(ctx context.Context) {
	abortCtx := ctx.Value(abortKey{}).(context.Context)
	defer func() {
		p.mu.Lock()
		p.abort()
		p.stop()
		p.running = false
		close(p.done)
		p.mu.Unlock()
	}()
	log := p.cfg.logger
	log.Info("outbox publisher started", "batch_size", p.cfg.batchSize, "poll_interval", p.cfg.pollInterval)
	var pause time.Duration // grows while the broker or the database is down
	var outage error
	for ctx.Err() == nil {
		res, err := p.publishBatch(ctx, abortCtx)
		switch {
		case err != nil && ctx.Err() == nil:
			if outage == nil {
				log.Warn("outbox publisher paused: broker or database unavailable", "error", err)
			}
			outage = err
			pause = min(max(2*pause, p.cfg.pollInterval), p.cfg.maxPause)
		default:
			if outage != nil {
				log.Info("outbox publisher resumed", "after_error", outage)
				outage = nil
			}
			pause = 0
		}
		if err == nil && res.Claimed == p.cfg.batchSize {
			continue // more is waiting
		}
		wait := p.cfg.pollInterval
		if pause > 0 {
			wait = pause
		}
		timer := time.NewTimer(jitter(wait))
		select {
		case <-ctx.Done():
		case <-timer.C:
		case <-p.wake:
		}
		timer.Stop()
	}
	log.Info("outbox publisher stopped")
}

// BatchResult counts what one batch did.
type BatchResult struct {
	Claimed   int // messages claimed
	Published int // acknowledged by the broker and marked published
	Failed    int // refused: an attempt counted, retried later or dead
	Dead      int // of Failed, those that used their last attempt
	Released  int // handed back with no attempt counted (broker down, or stopping)
}

// PublishOnce runs one batch: claim, send, record. It is the step the
// running publisher repeats; use it to drain in tests or from a scheduler.
func (p *Publisher) PublishOnce(ctx context.Context) (BatchResult, error) {
	return p.publishBatch(ctx, ctx)
}

// PublishFromOutbox is the design document's call: it claims up to limit
// due messages from store, sends them with sender, records the results with
// the default retry policy, and returns. Failed messages are kept with their
// error and attempt count; the error returned is only for a failure of the
// store or an unreachable broker.
func PublishFromOutbox(ctx context.Context, store Store, sender Sender, limit int) error {
	if store == nil || sender == nil {
		return fmt.Errorf("outbox: PublishFromOutbox needs a store and a sender")
	}
	p, err := NewPublisher(nil, sender, WithStore(store), WithBatchSize(max(limit, 1)))
	if err != nil {
		return err
	}
	_, err = p.PublishOnce(ctx)
	return err
}

// publishBatch claims with ctx (a stop before the claim claims nothing) and
// sends and records with work (a stop after the claim still finishes).
func (p *Publisher) publishBatch(ctx, work context.Context) (BatchResult, error) {
	var res BatchResult
	token, msgs, err := p.store.Claim(ctx, p.cfg.batchSize, p.cfg.lease)
	if err != nil {
		return res, err
	}
	res.Claimed = len(msgs)
	if len(msgs) == 0 {
		return res, nil
	}
	if ctx.Err() != nil { // stopping: hand the claim back unsent
		res.Released = len(msgs)
		return res, p.store.Release(work, token, ids(msgs))
	}
	sendErr := p.sender.Send(work, msgs)
	var (
		published, released []uuid.UUID
		failures            []Failure
		failed              map[uuid.UUID]error
		batchErr            error
	)
	var se *SendError
	switch {
	case sendErr == nil:
	case errors.As(sendErr, &se):
		failed = se.Failed
	default:
		batchErr = sendErr
	}
	now := time.Now()
	for _, m := range msgs {
		err := batchErr
		if err == nil {
			err = failed[m.ID]
		}
		switch {
		case err == nil:
			published = append(published, m.ID)
		case errors.Is(err, ErrBrokerUnavailable) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded):
			released = append(released, m.ID)
		default:
			attempts := m.Attempts + 1
			f := Failure{ID: m.ID, Err: errorText(err), Dead: attempts >= p.cfg.retry.MaxAttempts}
			f.NextAttemptAt = now
			if !f.Dead {
				f.NextAttemptAt = now.Add(p.cfg.retry.Backoff(attempts))
			}
			failures = append(failures, f)
			if f.Dead {
				res.Dead++
			}
		}
	}
	res.Published, res.Failed, res.Released = len(published), len(failures), len(released)
	err = errors.Join(
		p.store.MarkPublished(work, token, published),
		p.store.MarkFailed(work, token, failures),
		p.store.Release(work, token, released),
	)
	if err != nil {
		return res, err
	}
	if len(released) > 0 {
		// The broker is down: tell the loop to pause rather than spin.
		return res, fmt.Errorf("%d messages handed back: %w", len(released), firstUnavailable(sendErr))
	}
	return res, nil
}

func firstUnavailable(err error) error {
	if err == nil {
		return ErrBrokerUnavailable
	}
	return err
}

func ids(msgs []*OutboxMessage) []uuid.UUID {
	out := make([]uuid.UUID, len(msgs))
	for i, m := range msgs {
		out[i] = m.ID
	}
	return out
}
