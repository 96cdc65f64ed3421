package outbox

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"sync"
	"time"

	"github.com/google/uuid"
	"gorm.io/gorm"
)

// Publisher relays committed outbox messages to a Sender: it claims a
// batch, sends it, and writes the result back. On MySQL/MariaDB and SQLite
// the claim is a lease written in a short transaction, and no transaction
// is open during the send; on PostgreSQL the batch's rows stay locked in
// one transaction from the claim to the write-back (see heldClaim), which
// writes each message once instead of twice. It is at-least-once: a crash
// between the send and the write-back sends that batch again (with the
// same message ids).
//
// Start it with Start (or Run) and stop it with Stop; it starts no goroutine
// before that.
type Publisher struct {
	store  Store
	sender Sender
	cfg    publisherConfig
	tel    *telemetry
	system string   // messaging.system of the sender, for spans
	txn    *txnMode // exactly-once mode; nil when at least once

	wake chan struct{}
	soon chan struct{} // see nudge

	outageMu sync.Mutex
	outage   string // the cause of the outage in progress, "" when none

	mu      sync.Mutex
	running bool
	failed  error              // why the last run ended on its own, for Run
	checked bool               // the server's version has been checked
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
	keyPolicy    KeyPolicy
	workers      int
	retention    *RetentionPolicy // nil: no cleanup
	cleanEvery   time.Duration
	noListen     bool
	storeSet     bool // WithStore was given, perhaps with nil
}

// WithoutListen makes a publisher on PostgreSQL poll only, without holding a
// connection that LISTENs for the enqueuers' NOTIFY: for a connection through
// PgBouncer in transaction pooling, where LISTEN does not work. Wake-ups in
// the same process still work.
func WithoutListen() PublisherOption { return func(c *publisherConfig) { c.noListen = true } }

// WithRetention sets the cleanup the publisher runs every interval
// (defaults to DefaultRetention every DefaultRetentionInterval). Only one publisher of a
// table cleans at a time; the others skip their turn.
func WithRetention(policy RetentionPolicy, interval time.Duration) PublisherOption {
	return func(c *publisherConfig) {
		p := policy
		c.retention, c.cleanEvery = &p, interval
	}
}

// WithoutRetention keeps every message: the publisher deletes nothing.
func WithoutRetention() PublisherOption { return func(c *publisherConfig) { c.retention = nil } }

// KeyPolicy says what a failing message does to the later messages of its key.
type KeyPolicy int

const (
	// KeyWait (the default) holds a key's later messages back while its
	// oldest unsent message waits for a retry, until it is published, dead
	// or requeued: the key's order is kept.
	KeyWait KeyPolicy = iota
	// KeySkip lets a key's later messages go ahead of a message waiting for
	// a retry, which then arrives out of order. A message in flight still
	// holds its key back.
	KeySkip
)

// WithKeyPolicy sets what a failing message does to its key. Defaults to KeyWait.
func WithKeyPolicy(k KeyPolicy) PublisherOption { return func(c *publisherConfig) { c.keyPolicy = k } }

// WithWorkers runs n claim-send-record loops in the publisher. Defaults to
// DefaultWorkers.
// Claims are serialized and a key is in at most one batch at a time, so
// per-key order holds whatever n; more workers overlap the round trips
// to the database and the broker.
func WithWorkers(n int) PublisherOption { return func(c *publisherConfig) { c.workers = n } }

// PublisherOption configures a Publisher.
type PublisherOption func(*publisherConfig)

// WithBatchSize sets how many messages one claim takes. Defaults to
// DefaultBatchSize.
func WithBatchSize(n int) PublisherOption { return func(c *publisherConfig) { c.batchSize = n } }

// WithPollInterval sets how long the publisher waits after finding less than
// a full batch; Wake cuts the wait short. Defaults to DefaultPollInterval.
func WithPollInterval(d time.Duration) PublisherOption {
	return func(c *publisherConfig) { c.pollInterval = d }
}

// WithLease sets how long a claim holds its messages (defaults to
// DefaultLease). It must
// outlast a batch's send: a claim that expires mid-send lets another
// publisher send the same messages again. Claims of a publisher that dies
// come back to work after it (on PostgreSQL at once, when its connection
// drops; the lease bounds a publisher that hangs).
func WithLease(d time.Duration) PublisherOption { return func(c *publisherConfig) { c.lease = d } }

// WithRetryPolicy sets the backoff and the attempt budget of failed messages.
func WithRetryPolicy(r RetryPolicy) PublisherOption {
	return func(c *publisherConfig) { c.retry = r }
}

// WithMaxPause caps the publisher's own backoff while the broker or the
// database is unreachable (defaults to DefaultMaxPause): it bounds how long after the outage
// ends the publisher resumes.
func WithMaxPause(d time.Duration) PublisherOption {
	return func(c *publisherConfig) { c.maxPause = d }
}

// WithLogger sets the logger. Defaults to slog.Default(); nil means the default.
func WithLogger(l *slog.Logger) PublisherOption { return func(c *publisherConfig) { c.logger = l } }

// WithStore makes the publisher use store instead of the plugin's.
func WithStore(s Store) PublisherOption {
	return func(c *publisherConfig) { c.store, c.storeSet = s, true }
}

// NewPublisher returns a stopped publisher for the outbox that Plugin
// registered on db, sending with sender. It refuses what cannot work (a nil
// sender, a nil db without WithStore, a store of another *gorm.DB, a size
// or an interval that is not positive) with an error that names it.
func NewPublisher(db *gorm.DB, sender Sender, opts ...PublisherOption) (*Publisher, error) {
	retention := DefaultRetention
	cfg := publisherConfig{
		batchSize:    DefaultBatchSize,
		pollInterval: DefaultPollInterval,
		lease:        DefaultLease,
		retry:        DefaultRetryPolicy,
		maxPause:     DefaultMaxPause,
		workers:      DefaultWorkers,
		retention:    &retention,
		cleanEvery:   DefaultRetentionInterval,
	}
	for i, o := range opts {
		if o == nil {
			return nil, fmt.Errorf("outbox: publisher option %d of %d is nil", i+1, len(opts))
		}
		o(&cfg)
	}
	if isNil(sender) {
		return nil, fmt.Errorf("outbox: sender is nil (%T); did the sender's constructor return an error?", sender)
	}
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	cfg.retry = cfg.retry.withDefaults()
	if cfg.retention != nil {
		p := retentionDefaults(*cfg.retention)
		cfg.retention = &p
	}
	if cfg.logger == nil {
		cfg.logger = slog.Default()
	}
	store := cfg.store
	switch {
	case cfg.storeSet && isNil(store):
		return nil, fmt.Errorf("outbox: WithStore was given a nil store")
	case store == nil && db == nil:
		return nil, fmt.Errorf("outbox: NewPublisher needs the *gorm.DB the plugin is registered on, got nil")
	case store == nil:
		s, err := StoreOf(db)
		if err != nil {
			return nil, err
		}
		store = s
	}
	if s, ok := store.(interface{ servesPool(*gorm.DB) bool }); ok && cfg.storeSet && db != nil && !s.servesPool(db) {
		return nil, fmt.Errorf("outbox: WithStore was given the store of another *gorm.DB than the publisher's")
	}
	p := &Publisher{store: store, sender: sender, cfg: cfg, wake: make(chan struct{}, cfg.workers),
		soon: make(chan struct{}, 1), system: "unknown"}
	if s, ok := store.(instrumented); ok {
		p.tel = s.telemetry()
	} else {
		p.tel = newTelemetry(nil, nil)
	}
	if sys, ok := sender.(interface{ System() string }); ok {
		p.system = sys.System()
	}
	if ts, ok := sender.(TransactionalSender); ok {
		m, err := newTxnMode(ts, store, cfg.lease, p.tel)
		if err != nil {
			return nil, err
		}
		if err := m.checkPool(cfg.workers); err != nil {
			return nil, err
		}
		p.txn = m
	}
	return p, nil
}

// validate names the first setting that cannot work.
func (c *publisherConfig) validate() error {
	positive := []struct {
		name string
		bad  bool
		got  any
	}{
		{"workers (WithWorkers)", c.workers <= 0, c.workers},
		{"batch size (WithBatchSize)", c.batchSize <= 0, c.batchSize},
		{"poll interval (WithPollInterval)", c.pollInterval <= 0, c.pollInterval},
		{"lease (WithLease)", c.lease <= 0, c.lease},
		{"max pause (WithMaxPause)", c.maxPause <= 0, c.maxPause},
		{"retention interval (WithRetention)", c.retention != nil && c.cleanEvery <= 0, c.cleanEvery},
	}
	for _, p := range positive {
		if p.bad {
			return fmt.Errorf("outbox: %s must be positive, got %v", p.name, p.got)
		}
	}
	r := c.retry
	switch {
	case r.MaxAttempts < 0:
		return fmt.Errorf("outbox: retry policy's MaxAttempts must not be negative (0 means the default), got %d", r.MaxAttempts)
	case r.MinBackoff < 0:
		return fmt.Errorf("outbox: retry policy's MinBackoff must not be negative (0 means the default), got %v", r.MinBackoff)
	case r.MaxBackoff < 0:
		return fmt.Errorf("outbox: retry policy's MaxBackoff must not be negative (0 means the default), got %v", r.MaxBackoff)
	}
	if rp := c.retention; rp != nil {
		switch {
		case rp.Published < 0:
			return fmt.Errorf("outbox: retention policy's Published must not be negative (0 means the default), got %v", rp.Published)
		case rp.Dead < 0:
			return fmt.Errorf("outbox: retention policy's Dead must not be negative (0 keeps dead messages), got %v", rp.Dead)
		case rp.BatchSize < 0:
			return fmt.Errorf("outbox: retention policy's BatchSize must not be negative (0 means the default), got %d", rp.BatchSize)
		}
	}
	if c.keyPolicy != KeyWait && c.keyPolicy != KeySkip {
		return fmt.Errorf("outbox: key policy %d is neither KeyWait nor KeySkip", c.keyPolicy)
	}
	return nil
}

// isNil reports whether v is nil, or an interface holding a nil pointer,
// func, map, channel or slice: a typed nil that would fail only when used.
func isNil(v any) bool {
	if v == nil {
		return true
	}
	switch rv := reflect.ValueOf(v); rv.Kind() {
	case reflect.Pointer, reflect.Func, reflect.Map, reflect.Chan, reflect.Slice:
		return rv.IsNil()
	}
	return false
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
// nil once the batch in flight is finished or handed back. It returns an
// error at once if the publisher is running, and when the database server
// turns out to be one the publisher cannot use.
func (p *Publisher) Run(ctx context.Context) error {
	loopCtx, err := p.begin(ctx)
	if err != nil {
		return err
	}
	p.loop(loopCtx)
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.failed
}

type abortKey struct{}

func (p *Publisher) begin(ctx context.Context) (context.Context, error) {
	if p == nil {
		return nil, errors.New("outbox: the *Publisher is nil (did NewPublisher return an error?)")
	}
	if ctx == nil {
		return nil, errors.New("outbox: the publisher's context is nil")
	}
	if p.sender == nil || p.store == nil {
		return nil, errors.New("outbox: the Publisher was not made by NewPublisher")
	}
	// A server too old for the publisher is refused now; one that cannot be
	// reached is checked again before the first claim (see checkServer).
	if err := p.checkServerOnce(ctx); errors.Is(err, errUnsupportedServer) {
		return nil, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.running {
		return nil, ErrPublisherRunning
	}
	p.failed = nil
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
// becomes due again: at once on PostgreSQL, when its lease expires
// elsewhere), and Stop still waits for the
// goroutine before returning ctx's error.
func (p *Publisher) Stop(ctx context.Context) error {
	if p == nil {
		return nil
	}
	if ctx == nil {
		ctx = context.Background()
	}
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
//
// It wakes one worker: a worker whose claim comes back full wakes another,
// so that a backlog brings every worker in while a trickle keeps one busy
// instead of all of them claiming a few messages each.
func (p *Publisher) Wake() {
	if p == nil {
		return
	}
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

func (p *Publisher) loop(ctx context.Context) {
	abortCtx := ctx.Value(abortKey{}).(context.Context)
	log := p.cfg.logger
	log.Info("outbox publisher started", "workers", p.cfg.workers, "batch_size", p.cfg.batchSize, "poll_interval", p.cfg.pollInterval)
	// What the run set up is undone before Stop returns: a publisher
	// started again at once must not lose its wake-ups to this run's end.
	var undo []func()
	finish := func(failed error) {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
		p.endOutage()
		p.mu.Lock()
		p.abort()
		p.stop()
		p.running, p.failed = false, failed
		close(p.done)
		p.mu.Unlock()
	}
	if err := p.checkServer(ctx); errors.Is(err, errUnsupportedServer) {
		log.Error("outbox publisher stopped: the database server cannot run it", "error", err)
		finish(err)
		return
	}
	if s, ok := p.store.(statser); ok {
		reg, err := p.tel.observeStore(func(ctx context.Context) (Stats, error) { return s.Stats(ctx, p.cfg.retry.MaxAttempts) })
		if err != nil {
			log.Warn("outbox: cannot register the backlog gauges", "error", err)
		} else {
			undo = append(undo, func() { _ = reg.Unregister() })
		}
	}
	if s, ok := p.store.(wakeSource); ok {
		undo = append(undo, s.subscribe(p))
	}
	var wg sync.WaitGroup
	if s, ok := p.store.(cleaner); ok && p.cfg.retention != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.clean(ctx, s)
		}()
	}
	if s, ok := p.store.(notifyListener); ok && s.listens() && !p.cfg.noListen {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.listen(ctx, s)
		}()
	}
	if s, ok := p.store.(pooled); ok {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.watchPool(ctx, s)
		}()
	}
	if p.txn != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.sweepSlots(ctx)
		}()
	}
	for range p.cfg.workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.work(ctx, abortCtx)
		}()
	}
	wg.Wait()
	log.Info("outbox publisher stopped")
	finish(nil)
}

// checkServerOnce checks the database server's version once, within a
// few seconds; nil where the store has nothing to check.
func (p *Publisher) checkServerOnce(ctx context.Context) error {
	s, ok := p.store.(serverChecker)
	p.mu.Lock()
	done := p.checked
	p.mu.Unlock()
	if !ok || done {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	err := s.checkServer(ctx)
	if err == nil {
		p.mu.Lock()
		p.checked = true
		p.mu.Unlock()
	}
	return err
}

// checkServer waits until the server's version could be checked, pausing as
// in an outage while the database cannot be reached: a publisher started
// during a database outage waits for it instead of exiting. It returns nil,
// an error wrapping errUnsupportedServer for a server the publisher cannot
// use, or ctx's error.
func (p *Publisher) checkServer(ctx context.Context) error {
	var pause time.Duration
	for {
		err := p.checkServerOnce(ctx)
		switch {
		case err == nil:
			p.noteOutage(nil)
			return nil
		case errors.Is(err, errUnsupportedServer):
			return err
		case ctx.Err() != nil:
			return ctx.Err()
		}
		p.noteOutage(&outage{"database", err})
		pause = min(max(2*pause, p.cfg.pollInterval), p.cfg.maxPause)
		p.wait(ctx, jitter(pause), false)
	}
}

// followUp is how soon a worker looks again after the work stopped.
const followUp = 2 * DefaultNotifyInterval

// work is one worker: claim, send, record, and wait when there is nothing to do.
func (p *Publisher) work(ctx, abortCtx context.Context) {
	var pause time.Duration // grows while the broker or the database is down
	busy := false           // the last claim found work
	// After a nudge, empty claims look again at growing intervals: the
	// nudging transaction may not have committed within followUp (a
	// loaded machine), and nothing else would wake this worker for it.
	var recheck time.Duration
	var slot *slotHolder // the worker's slot in exactly-once mode
	if p.txn != nil {
		slot = p.txn.holder()
		defer slot.release(context.WithoutCancel(abortCtx))
	}
	for ctx.Err() == nil {
		res, err := p.publishBatch(ctx, abortCtx, slot)
		if err != nil && ctx.Err() == nil {
			p.noteOutage(err)
			pause = min(max(2*pause, p.cfg.pollInterval), p.cfg.maxPause)
		} else if err == nil {
			// An empty claim says nothing of the broker, but that the
			// database answers.
			if res.Claimed > 0 || p.pausedBy("database") {
				p.noteOutage(nil)
			}
			pause = 0
		}
		if err == nil && res.Claimed > 0 {
			if res.Claimed == p.cfg.batchSize {
				p.Wake() // more is waiting: bring in another worker
			}
			// Look again at once, for what committed while this batch was out.
			busy = true
			continue
		}
		wait := p.cfg.pollInterval
		switch {
		case pause > 0:
			wait = pause
		case busy:
			// The work just stopped: look once more shortly, for what
			// committed without a wake-up of its own (an enqueuing process
			// sends its NOTIFY at most once per interval).
			wait = min(wait, followUp)
		case recheck > 0:
			wait = min(wait, recheck)
		}
		busy = false
		switch nudged := p.wait(ctx, jitter(wait), pause == 0); {
		case nudged:
			recheck = 4 * followUp
		case recheck > 0 && recheck < 16*followUp:
			recheck *= 4 // 40 ms, 160 ms, 640 ms, then the poll again
		default:
			recheck = 0
		}
	}
}

// wait returns after d, on a wake-up, or when ctx ends. A nudge shortens the
// wait to followUp, unless the wait is an outage's pause; nudged says it did.
func (p *Publisher) wait(ctx context.Context, d time.Duration, nudgeable bool) (nudged bool) {
	timer := time.NewTimer(d)
	defer timer.Stop()
	deadline := time.Now().Add(d)
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
			return
		case <-p.wake:
			return
		case <-p.soon:
			nudged = nudged || nudgeable
			if nudgeable && time.Until(deadline) > followUp {
				timer.Reset(followUp)
				deadline = time.Now().Add(followUp)
			}
		}
	}
}

// nudge tells a waiting worker that a transaction of this process has just
// enqueued and will probably commit within moments: it looks again after
// followUp instead of at its next poll. It is how events enqueued in a
// plain db.Transaction leave promptly on every database, though no
// callback sees that transaction's commit. It never blocks.
func (p *Publisher) nudge() {
	select {
	case p.soon <- struct{}{}:
	default:
	}
}

// clean runs the retention cleanup every cleanEvery until ctx ends.
func (p *Publisher) clean(ctx context.Context, store cleaner) {
	ticker := time.NewTicker(p.cfg.cleanEvery)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
		n, err := store.Cleanup(ctx, *p.cfg.retention, nil)
		switch {
		case errors.Is(err, ErrCleanupRunning) || ctx.Err() != nil:
		case err != nil:
			p.cfg.logger.Warn("outbox cleanup failed", "error", err, "deleted", n)
		case n > 0:
			p.cfg.logger.Info("outbox cleanup", "deleted", n)
		}
	}
}

// noteOutage logs the start and the end of an outage once each, however
// many workers see it and however long it lasts, and keeps the paused
// gauge; err nil says the work went through.
func (p *Publisher) noteOutage(err error) {
	p.outageMu.Lock()
	defer p.outageMu.Unlock()
	cause := ""
	if err != nil {
		var o *outage
		switch {
		case errors.As(err, &o):
			cause = o.cause
		case errors.Is(err, ErrBrokerUnavailable):
			cause = "broker"
		default:
			cause = "database"
		}
	}
	if cause == p.outage {
		return
	}
	if p.outage != "" {
		p.tel.notePaused(p.outage, -1)
		if cause == "" {
			p.cfg.logger.Info("outbox publisher resumed", "after", p.outage+" outage")
		}
	}
	p.outage = cause
	if cause != "" {
		p.tel.notePaused(cause, 1)
		p.cfg.logger.Warn("outbox publisher paused: the "+cause+" is unreachable or failing; messages wait in the table and no attempt is counted",
			"error", err, "max_pause", p.cfg.maxPause)
	}
}

// outage is an error of the relay, with the side it came from: "broker"
// or "database".
type outage struct {
	cause string
	err   error
}

func (o *outage) Error() string { return o.err.Error() }
func (o *outage) Unwrap() error { return o.err }

// pausedBy reports whether an outage of cause is in progress.
func (p *Publisher) pausedBy(cause string) bool {
	p.outageMu.Lock()
	defer p.outageMu.Unlock()
	return p.outage == cause
}

// endOutage takes a stopping publisher out of the paused gauge.
func (p *Publisher) endOutage() {
	p.outageMu.Lock()
	defer p.outageMu.Unlock()
	if p.outage != "" {
		p.tel.notePaused(p.outage, -1)
		p.outage = ""
	}
}

// BatchResult counts what one batch did.
type BatchResult struct {
	Claimed   int // messages claimed
	Published int // acknowledged by the broker and marked published
	Failed    int // refused: an attempt counted, retried later or dead
	Dead      int // of Failed, those that used their last attempt
	Released  int // handed back with no attempt counted (broker down, held back, or stopping)
	HeldBack  int // of Released, those held back behind a failed older message of their key
}

// PublishOnce runs one batch: claim, send, record. It is the step the
// running publisher repeats; use it to drain in tests or from a scheduler.
func (p *Publisher) PublishOnce(ctx context.Context) (BatchResult, error) {
	if p == nil {
		return BatchResult{}, errors.New("outbox: the *Publisher is nil (did NewPublisher return an error?)")
	}
	if ctx == nil {
		return BatchResult{}, errors.New("outbox: PublishOnce's context is nil")
	}
	if p.sender == nil || p.store == nil {
		return BatchResult{}, errors.New("outbox: the Publisher was not made by NewPublisher")
	}
	var slot *slotHolder
	if p.txn != nil {
		slot = p.txn.holder()
		defer slot.release(context.WithoutCancel(ctx))
	}
	return p.publishBatch(ctx, ctx, slot)
}

// PublishFromOutbox is the design document's call: it claims up to limit
// due messages from store, sends them with sender, records the results with
// the default retry policy, and returns. Failed messages are kept with their
// error and attempt count; the error returned is only for a failure of the
// store or an unreachable broker.
func PublishFromOutbox(ctx context.Context, store Store, sender Sender, limit int) error {
	if isNil(store) || isNil(sender) {
		return fmt.Errorf("outbox: PublishFromOutbox needs a store and a sender")
	}
	if limit <= 0 {
		return fmt.Errorf("outbox: PublishFromOutbox's limit must be positive, got %d", limit)
	}
	p, err := NewPublisher(nil, sender, WithStore(store), WithBatchSize(limit))
	if err != nil {
		return err
	}
	_, err = p.PublishOnce(ctx)
	return err
}

// publishBatch claims with ctx (a stop before the claim claims nothing) and
// sends and records with work (a stop after the claim still finishes).
// In exactly-once mode, slot is the worker's.
func (p *Publisher) publishBatch(ctx, work context.Context, slot *slotHolder) (BatchResult, error) {
	if slot != nil {
		return p.publishTxn(ctx, work, slot)
	}
	var res BatchResult
	opts := ClaimOptions{Limit: p.cfg.batchSize, Lease: p.cfg.lease, SkipFailedKeys: p.cfg.keyPolicy == KeySkip}
	batch, err := claimBatch(p.store, ctx, work, opts)
	if err != nil {
		return res, &outage{"database", err}
	}
	defer batch.End() // whatever happens below, the claim ends
	msgs := batch.Messages()
	res.Claimed = len(msgs)
	if len(msgs) == 0 {
		return res, nil
	}
	if ctx.Err() != nil { // stopping: hand the claim back unsent
		res.Released = len(msgs)
		return res, batch.GiveBack(work)
	}
	started := time.Now()
	sendCtx, span := p.tel.startSend(work, p.system, msgs)
	errs := p.send(sendCtx, msgs)
	now := time.Now()
	o := p.outcomes(msgs, errs, now, &res)
	defer func() { p.tel.recordBatch(work, span, started, now, msgs, errs, o.deadIDs) }()
	published, failures, released, unavailable := o.published, o.failures, o.released, o.unavailable
	if err := batch.Record(work, published, failures, released); err != nil {
		return res, &outage{"database", err}
	}
	if unavailable != nil {
		// The broker is down: tell the loop to pause rather than spin.
		return res, &outage{"broker", fmt.Errorf("%d messages handed back: %w", len(released), unavailable)}
	}
	return res, nil
}

// batchOutcomes are a sent batch's messages by what their send did.
type batchOutcomes struct {
	published, released []uuid.UUID
	failures            []Failure
	unavailable         error           // the first broker outage met, if any
	deadIDs             map[string]bool // of failures, those that used their last attempt
}

// outcomes sorts msgs by their send's errors (errs[i] is msgs[i]'s) and
// counts them in res.
func (p *Publisher) outcomes(msgs []*OutboxMessage, errs []error, now time.Time, res *BatchResult) batchOutcomes {
	o := batchOutcomes{deadIDs: map[string]bool{}}
	for i, m := range msgs {
		err := errs[i]
		switch {
		case err == nil:
			o.published = append(o.published, m.ID)
		case errors.Is(err, ErrHeldBack):
			o.released = append(o.released, m.ID)
			res.HeldBack++
		case isUnavailable(err):
			o.released = append(o.released, m.ID)
			if o.unavailable == nil {
				o.unavailable = err
			}
		default:
			f := p.failure(m, err, now)
			o.failures = append(o.failures, f)
			if f.Dead {
				res.Dead++
				o.deadIDs[m.ID.String()] = true
			}
		}
	}
	res.Published, res.Failed, res.Released = len(o.published), len(o.failures), len(o.released)
	return o
}

// failure is a refused send of m: an attempt counted, and a retry after
// the backoff or, at the last attempt, dead.
func (p *Publisher) failure(m *OutboxMessage, err error, now time.Time) Failure {
	attempts := m.Attempts + 1
	f := Failure{ID: m.ID, Err: errorText(err), Dead: attempts >= p.cfg.retry.MaxAttempts, NextAttemptAt: now}
	if !f.Dead {
		f.NextAttemptAt = now.Add(p.cfg.retry.Backoff(attempts))
	}
	return f
}

func isUnavailable(err error) bool {
	return errors.Is(err, ErrBrokerUnavailable) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

// send sends a batch and returns each message's error.
//
// When the broker refuses more than one message of a batch, it may have
// refused them all for one poison message among them (Kafka rejects a
// partition's whole record batch). So each refused message is sent again
// alone, oldest first, and only what fails alone counts an attempt; behind
// a message that fails alone, the later messages of its key are held back.
func (p *Publisher) send(ctx context.Context, msgs []*OutboxMessage) []error {
	errs := perMessage(p.sender.Send(ctx, msgs), msgs)
	var refused []int
	for i, err := range errs {
		if err != nil && !isUnavailable(err) && !errors.Is(err, ErrHeldBack) {
			refused = append(refused, i)
		}
	}
	if len(refused) > 1 {
		failedKeys := map[string]bool{}
		for n, i := range refused {
			m := msgs[i]
			if m.Key != "" && failedKeys[m.Key] {
				errs[i] = ErrHeldBack
				continue
			}
			errs[i] = perMessage(p.sender.Send(ctx, msgs[i:i+1]), msgs[i:i+1])[0]
			if isUnavailable(errs[i]) {
				for _, j := range refused[n+1:] {
					errs[j] = errs[i]
				}
				break
			}
			if errs[i] != nil && m.Key != "" {
				failedKeys[m.Key] = true
			}
		}
	}
	p.checkKeyOrder(msgs, errs)
	return errs
}

// checkKeyOrder reports a message delivered after an older one of its key
// failed: the Sender broke the order it must keep. It cannot be undone, but
// it must not go unseen.
func (p *Publisher) checkKeyOrder(msgs []*OutboxMessage, errs []error) {
	failed := map[string]bool{}
	for i, m := range msgs {
		if m.Key == "" {
			continue
		}
		if errs[i] != nil {
			failed[m.Key] = true
		} else if failed[m.Key] {
			p.cfg.logger.Error("outbox: a message was delivered after an older message of its key failed; the key's order is broken",
				"key", m.Key, "message_id", m.ID)
		}
	}
}

// perMessage spreads a Sender's error over the messages of its batch.
func perMessage(err error, msgs []*OutboxMessage) []error {
	errs := make([]error, len(msgs))
	if err == nil {
		return errs
	}
	var se *SendError
	if !errors.As(err, &se) {
		for i := range errs {
			errs[i] = err
		}
		return errs
	}
	for i, m := range msgs {
		errs[i] = se.Failed[m.ID]
	}
	return errs
}
