package inbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/IBM/sarama"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/internal/inboxstore"
)

// groupHandler is the consumer's sarama.ConsumerGroupHandler: sarama calls
// ConsumeClaim once per partition, each in its own goroutine.
type groupHandler struct{ c *Consumer }

func (h *groupHandler) Setup(sarama.ConsumerGroupSession) error   { return nil }
func (h *groupHandler) Cleanup(sarama.ConsumerGroupSession) error { return nil }

func (h *groupHandler) ConsumeClaim(session sarama.ConsumerGroupSession, claim sarama.ConsumerGroupClaim) error {
	c := h.c
	ctx := session.Context()
	p := &partition{c: c, topic: claim.Topic(), partition: claim.Partition(), holds: map[string]bool{}}
	defer c.tel.forgetLag(p.topic, p.partition)
	// The keys held by parked messages, as this partition's last owner left
	// them; a database that cannot be read yet is waited for.
	for failures := 0; ; failures++ {
		err := p.loadHolds(ctx)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return nil
		}
		c.cfg.logger.Warn("inbox: database transaction failed; consumption pauses until it succeeds", "consumer_group", c.group, "topic", p.topic, "partition", p.partition, "error", err)
		sleep(ctx, pause(failures))
	}
	retries := time.NewTicker(c.cfg.retryCheckInterval)
	defer retries.Stop()
	batch := make([]*sarama.ConsumerMessage, 0, c.cfg.batchSize)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-retries.C:
			if err := p.applyRetries(ctx); err != nil {
				return nil
			}
		case r, ok := <-claim.Messages():
			if !ok {
				return nil
			}
			batch = append(batch[:0], r)
		fill:
			for len(batch) < c.cfg.batchSize {
				select {
				case r, ok := <-claim.Messages():
					if !ok {
						break fill
					}
					batch = append(batch, r)
				default:
					break fill
				}
			}
			if err := p.apply(ctx, batch); err != nil {
				return nil // stopped or rebalanced: not marked, so redelivered
			}
			last := batch[len(batch)-1]
			session.MarkMessage(last, "")
			c.tel.noteLag(p.topic, p.partition, claim.HighWaterMarkOffset()-last.Offset-1)
		}
	}
}

// partition applies the messages of one claimed partition.
type partition struct {
	c         *Consumer
	topic     string
	partition int32
	mu        sync.Mutex      // holds, with key lanes
	holds     map[string]bool // keys with a parked message (KeyWait)
}

func (p *partition) loadHolds(ctx context.Context) error {
	if p.c.cfg.keyPolicy != outbox.KeyWait {
		return nil
	}
	keys, err := p.c.store.HeldKeys(ctx, p.c.group, p.topic, p.partition)
	if err != nil {
		return err
	}
	for _, k := range keys {
		if len(k) > 0 {
			p.holds[string(k)] = true
		}
	}
	return nil
}

func (p *partition) held(key []byte) bool {
	if len(key) == 0 {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.holds[string(key)]
}

func (p *partition) setHeld(key []byte, held bool) {
	if len(key) == 0 || p.c.cfg.keyPolicy != outbox.KeyWait {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if held {
		p.holds[string(key)] = true
	} else {
		delete(p.holds, string(key))
	}
}

// apply applies a batch of the partition's messages; it returns an error
// only when ctx ended before every message was applied, skipped or parked.
func (p *partition) apply(ctx context.Context, batch []*sarama.ConsumerMessage) error {
	ms := make([]Message, len(batch))
	for i, r := range batch {
		ms[i] = fromKafka(r)
	}
	p.c.tel.consumed(ctx, p.topic, len(ms))
	lanes := p.c.cfg.keyLanes
	if lanes == 1 || len(ms) == 1 {
		return p.applyLane(ctx, ms)
	}
	byLane := make([][]Message, lanes)
	for _, m := range ms {
		h := fnv.New32a()
		h.Write(m.Key)
		i := int(h.Sum32() % uint32(lanes))
		byLane[i] = append(byLane[i], m)
	}
	var wg sync.WaitGroup
	errs := make([]error, lanes)
	for i, lane := range byLane {
		if len(lane) == 0 {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = p.applyLane(ctx, lane)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// applyLane applies ms in one transaction; if the handler fails, one
// message at a time.
func (p *partition) applyLane(ctx context.Context, ms []Message) error {
	var failed *handlerError
	// The first try records the batch with a plain INSERT, which fails if
	// one of its messages was recorded before (rare: a redelivery or a
	// duplicate); the tries after it skip those.
	for failures, optimistic := 0, true; ; optimistic = false {
		err := p.applyTogether(ctx, ms, optimistic)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		up := p.c.databaseUp(ctx)
		if errors.As(err, &failed) && up {
			break
		}
		if optimistic {
			continue
		}
		// A database that answers but keeps refusing the batch refuses
		// something in it: one message at a time finds which.
		if up && failures >= refusalsBeforeSplit {
			failed = nil
			break
		}
		p.databaseFailed(ctx, failures, err)
		failures++
	}
	for _, m := range ms {
		first := firstTry{attempt: 1}
		// A Handler's failure names its message: that was its first
		// attempt. A BatchHandler's names none, so each message starts over.
		if p.c.cfg.handler != nil && failed != nil && failed.id == m.ID {
			p.handlerFailed(ctx, m, 1, failed.err)
			first = firstTry{attempt: 2, lastErr: failed.err}
		}
		if err := p.applyOne(ctx, m, first); err != nil {
			return err
		}
	}
	return nil
}

// refusalsBeforeSplit is how many times a batch is tried again, while the
// database answers, before its messages are tried one by one.
const refusalsBeforeSplit = 3

// firstTry is where applyOne starts: the attempt, and the error of the
// attempt before it.
type firstTry struct {
	attempt int
	lastErr error
}

// handlerFailed counts and logs a failed attempt, and waits the retry
// policy's backoff if another attempt follows.
func (p *partition) handlerFailed(ctx context.Context, m Message, attempt int, err error) {
	p.c.tel.failedOnce(ctx, p.topic)
	p.c.cfg.logger.Warn("inbox: handler failed", "consumer_group", p.c.group, "topic", p.topic,
		"partition", p.partition, "offset", m.Offset, "message_id", m.ID, "attempt", attempt, "error", err)
	if attempt < p.c.cfg.retry.MaxAttempts {
		sleep(ctx, p.c.cfg.retry.Backoff(attempt))
	}
}

// databaseFailed logs a failure that was not the handler's and waits
// before the next try: consumption pauses, counting no attempt.
func (p *partition) databaseFailed(ctx context.Context, failures int, err error) {
	p.c.cfg.logger.Warn("inbox: database transaction failed; consumption pauses until it succeeds", "consumer_group", p.c.group,
		"topic", p.topic, "partition", p.partition, "error", err)
	sleep(ctx, pause(failures))
}

// handlerError is the handler's failure, as opposed to the database's.
type handlerError struct {
	id  string
	err error
}

func (e *handlerError) Error() string { return e.err.Error() }
func (e *handlerError) Unwrap() error { return e.err }

// applyTogether applies ms in one transaction with their records.
func (p *partition) applyTogether(ctx context.Context, ms []Message, optimistic bool) error {
	var applied, skipped, held int
	now := time.Now().UTC()
	err := p.c.store.Transaction(ctx, p.c.db, func(tx *gorm.DB) error {
		applied, skipped, held = 0, 0, 0
		rows := make([]*inboxstore.Row, 0, len(ms))
		todo := make([]Message, 0, len(ms)) // the messages of the applied rows, in order
		once := make(map[string]bool, len(ms))
		for _, m := range ms {
			switch {
			case once[m.ID]: // the same message twice in the batch
				continue
			case p.held(m.Key):
				rows = append(rows, p.row(m, inboxstore.Held, 0, "", now))
			default:
				m.Attempt = 1
				rows = append(rows, p.row(m, inboxstore.Applied, 1, "", now))
				todo = append(todo, m)
			}
			once[m.ID] = true
		}
		recorded, err := p.c.store.Record(tx, rows, optimistic)
		if err != nil {
			return err
		}
		todo = slices.DeleteFunc(todo, func(m Message) bool { return !recorded[m.ID] })
		held = len(recorded) - len(todo)
		skipped = len(ms) - len(recorded)
		applied = len(todo)
		return p.call(ctx, tx, todo)
	})
	if err == nil {
		p.c.tel.settled(ctx, p.topic, applied, skipped, held)
	}
	return err
}

// applyOne applies one message, trying the handler up to the retry
// policy's attempts, then parks it.
func (p *partition) applyOne(ctx context.Context, m Message, first firstTry) error {
	lastErr := first.lastErr
	for attempt, failures := first.attempt, 0; ; {
		if attempt > p.c.cfg.retry.MaxAttempts {
			return p.park(ctx, m, attempt-1, lastErr)
		}
		m.Attempt = attempt
		var skipped, held bool
		now := time.Now().UTC()
		err := p.c.store.Transaction(ctx, p.c.db, func(tx *gorm.DB) error {
			held = p.held(m.Key)
			row := p.row(m, inboxstore.Applied, attempt, "", now)
			if held {
				row = p.row(m, inboxstore.Held, 0, "", now)
			}
			recorded, err := p.c.store.Record(tx, []*inboxstore.Row{row}, false)
			if err != nil {
				return err
			}
			if skipped = !recorded[m.ID]; skipped || held {
				return nil
			}
			return p.call(ctx, tx, []Message{m})
		})
		if err == nil {
			p.c.tel.settled(ctx, p.topic, b2i(!skipped && !held), b2i(skipped), b2i(held))
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		// While the database answers, a failure is the message's, the
		// handler's or not (a value the table refuses, a commit the
		// handler's own error aborted): it costs an attempt, so that the
		// message ends parked instead of stopping its partition.
		if !p.c.databaseUp(ctx) {
			p.databaseFailed(ctx, failures, err)
			failures++
			continue
		}
		var he *handlerError
		if errors.As(err, &he) {
			err = he.err
		}
		lastErr = err
		p.handlerFailed(ctx, m, attempt, err)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		attempt++
	}
}

// park records m as parked after attempts failed tries, and holds its key.
func (p *partition) park(ctx context.Context, m Message, attempts int, cause error) error {
	now := time.Now().UTC()
	row := p.row(m, inboxstore.Parked, attempts, errorText(cause), now)
	var parked bool
	for failures := 0; ; failures++ {
		err := p.c.store.Transaction(ctx, p.c.db, func(tx *gorm.DB) error {
			recorded, err := p.c.store.Record(tx, []*inboxstore.Row{row}, false)
			parked = recorded[m.ID]
			return err
		})
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		p.databaseFailed(ctx, failures, err)
	}
	if !parked {
		return nil // another consumer recorded it meanwhile: nothing to park, nothing to hold
	}
	p.setHeld(m.Key, true)
	p.c.tel.parked(ctx, p.topic)
	p.c.cfg.logger.Error("inbox: message parked after its last attempt; retry it with the admin command",
		"consumer_group", p.c.group, "topic", p.topic, "partition", p.partition, "offset", m.Offset,
		"message_id", m.ID, "attempts", attempts, "error", cause)
	return nil
}

// applyRetries applies the partition's parked messages that the admin
// command asked to retry, each followed by the messages its key held, in
// offset order. It returns an error only when ctx ended.
func (p *partition) applyRetries(ctx context.Context) error {
	rows, err := p.c.store.Waiting(ctx, p.c.group, p.topic, p.partition)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		p.c.cfg.logger.Warn("inbox: reading messages to retry", "consumer_group", p.c.group, "error", err)
		return nil
	}
	byKey := map[string][]inboxstore.Row{}
	var order []string
	for _, r := range rows {
		k := string(r.Key)
		if len(r.Key) == 0 {
			k = "\x00" + r.MessageID // a keyless message holds nothing and waits for nothing
		}
		if _, ok := byKey[k]; !ok {
			order = append(order, k)
		}
		byKey[k] = append(byKey[k], r)
	}
	// Under KeyWait a key's messages go in order, and a parked one stops
	// those after it; under KeySkip each stands alone.
	wait := p.c.cfg.keyPolicy == outbox.KeyWait
	for _, k := range order {
		rs := byKey[k]
		cleared := true
		for _, r := range rs {
			if r.State == inboxstore.Parked {
				cleared = false
				if !wait {
					continue
				}
				break
			}
			ok, err := p.applyWaiting(ctx, r)
			if err != nil {
				return err
			}
			if !ok {
				cleared = false
				if !wait {
					continue
				}
				break
			}
		}
		if cleared {
			p.setHeld(rs[0].Key, false)
		}
	}
	return nil
}

// applyWaiting applies a retried or held message recorded in the table;
// false if it was parked again.
func (p *partition) applyWaiting(ctx context.Context, r inboxstore.Row) (bool, error) {
	m := Message{ID: r.MessageID, Topic: r.Topic, Partition: r.Partition, Offset: r.Offset, Key: r.Key, Value: r.Payload}
	if r.Timestamp != nil {
		m.Timestamp = *r.Timestamp
	}
	if r.Headers != "" {
		_ = json.Unmarshal([]byte(r.Headers), &m.Headers)
	}
	var lastErr error
	for attempt, failures := 1, 0; attempt <= p.c.cfg.retry.MaxAttempts; {
		m.Attempt = attempt
		row := r
		row.State, row.Attempts, row.LastError, row.ProcessedAt = inboxstore.Applied, r.Attempts+attempt, "", time.Now().UTC()
		var gone bool
		err := p.c.store.Transaction(ctx, p.c.db, func(tx *gorm.DB) error {
			ok, err := p.c.store.Update(tx, &row, r.State)
			if err != nil || !ok {
				gone = err == nil
				return err
			}
			return p.call(ctx, tx, []Message{m})
		})
		if err == nil && gone {
			// Another consumer settled it (a rebalance's overlap): the key
			// goes on at the next check, from what the table then says.
			return false, nil
		}
		if err == nil {
			p.c.tel.settled(ctx, p.topic, 1, 0, 0)
			return true, nil
		}
		if ctx.Err() != nil {
			return false, ctx.Err()
		}
		if !p.c.databaseUp(ctx) { // as in applyOne
			p.databaseFailed(ctx, failures, err)
			failures++
			continue
		}
		var he *handlerError
		if errors.As(err, &he) {
			err = he.err
		}
		lastErr = err
		p.handlerFailed(ctx, m, attempt, err)
		attempt++
	}
	row := r
	row.State, row.Attempts, row.LastError, row.ProcessedAt = inboxstore.Parked, r.Attempts+p.c.cfg.retry.MaxAttempts, errorText(lastErr), time.Now().UTC()
	for failures := 0; ; failures++ {
		err := p.c.store.Transaction(ctx, p.c.db, func(tx *gorm.DB) error {
			_, err := p.c.store.Update(tx, &row, r.State)
			return err
		})
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return false, ctx.Err()
		}
		p.databaseFailed(ctx, failures, err)
	}
	p.c.tel.parked(ctx, p.topic)
	return false, nil
}

// call runs the handler on ms in tx, with a span per message: a Handler
// runs in its message's span, a BatchHandler beside them. A panic is
// returned as an error.
func (p *partition) call(ctx context.Context, tx *gorm.DB, ms []Message) error {
	if h := p.c.cfg.handler; h != nil {
		for _, m := range ms {
			if err := p.callSpanned(ctx, []Message{m}, func(hctx context.Context) error { return h(tx.WithContext(hctx), m) }); err != nil {
				return err
			}
		}
		return nil
	}
	if len(ms) == 0 {
		return nil
	}
	return p.callSpanned(ctx, ms, func(hctx context.Context) error { return p.c.cfg.batchHandler(tx.WithContext(hctx), ms) })
}

func (p *partition) callSpanned(ctx context.Context, ms []Message, fn func(context.Context) error) (err error) {
	hctx, end := p.c.tel.startSpans(ctx, p.c.group, ms)
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("inbox: the handler panicked: %v\n%s", r, debug.Stack())
		}
		end(err)
		if err != nil {
			err = &handlerError{id: ms[0].ID, err: err}
		}
	}()
	return fn(hctx)
}

// row is m's record in state.
func (p *partition) row(m Message, state string, attempts int, lastErr string, now time.Time) *inboxstore.Row {
	r := &inboxstore.Row{ConsumerGroup: p.c.group, MessageID: m.ID, Topic: m.Topic, Partition: m.Partition,
		Offset: m.Offset, Key: m.Key, State: state, Attempts: attempts, LastError: lastErr, ReceivedAt: now,
		ProcessedAt: now}
	if !m.Timestamp.IsZero() {
		ts := m.Timestamp.UTC()
		r.Timestamp = &ts
	}
	if state != inboxstore.Applied {
		r.Payload = m.Value // nil stays NULL: a tombstone stays one
		if len(m.Headers) > 0 {
			b, _ := json.Marshal(m.Headers)
			r.Headers = string(b)
		}
	}
	return r
}

// errorText is cause as recorded, cut to what a text column keeps everywhere.
// The text is made valid UTF-8 without NUL bytes, which a text column
// refuses on PostgreSQL and strict MySQL: an error quoting a binary
// payload must not keep its message from being parked.
func errorText(cause error) string {
	if cause == nil {
		return ""
	}
	return cleanText(cause.Error(), 4000)
}

// cleanText is s as valid UTF-8 without NUL bytes, cut to at most n bytes
// on a character's boundary.
func cleanText(s string, n int) string {
	s = strings.ReplaceAll(strings.ToValidUTF8(s, "\uFFFD"), "\x00", "")
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}
