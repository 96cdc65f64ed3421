package reliability

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"gorm.io/gorm"
	"gorm.io/gorm/clause"

	"github.com/gorm-outbox/outbox"
)

// Aggregate is the domain row each event is about. Its version is bumped in
// the event's transaction under a row lock, so the versions of a key's
// events are its commit order: the order Kafka must show.
type Aggregate struct {
	Key     string `gorm:"column:agg_key;primaryKey;size:64"`
	Version int64
}

// Event is the payload of every message the workload writes.
type Event struct {
	Key     string `json:"k"`
	Version int64  `json:"v"`
	Amount  int64  `json:"amt,omitempty"`
	Pad     string `json:"pad,omitempty"`
	// Tx is the writer's id of the database transaction that enqueued the
	// event, and TxEvents how many events that transaction enqueued: the
	// outbox table, which holds exactly the committed events, is then the
	// ledger of the committed transactions and of their events.
	Tx       int64 `json:"tx,omitempty"`
	TxEvents int   `json:"n,omitempty"`
}

// Workload writes transactions that bump an aggregate and enqueue its events.
type Workload struct {
	DB      *gorm.DB
	Topic   string
	Keys    int // aggregates, shared by all writers
	Writers int // concurrent goroutines
	// Duration, or Transactions when positive, bounds the run.
	Duration     time.Duration
	Transactions int
	// RollbackEvery rolls back every n-th transaction after it enqueued (0: never).
	RollbackEvery int
	// PoisonEvery pads every n-th event to PoisonBytes (0: never), so
	// that the broker refuses it.
	PoisonEvery, PoisonBytes int
	// Amounts gives every event an amount from 1 to 1000, for the inbox
	// scenario's ledger to add up.
	Amounts bool
	// MultiKey makes each transaction lock 2 to 4 aggregates and enqueue 2
	// to 5 events over them, interleaved, in one Enqueue call or several:
	// the database transactions whose events exactly-once mode must
	// deliver in one Kafka transaction.
	MultiKey bool
}

// WorkloadResult counts what the writers did; the database is the truth of
// what committed, these are for the report.
type WorkloadResult struct {
	Committed, RolledBack, Failed int64
}

// AggregateKeys are the keys of the aggregates, and of their events.
func (w Workload) AggregateKeys() []string {
	keys := make([]string, w.Keys)
	for i := range keys {
		keys[i] = aggregateKey(i)
	}
	return keys
}

func aggregateKey(i int) string { return fmt.Sprintf("agg-%03d", i) }

// Setup creates the aggregates.
func (w Workload) Setup() error {
	if err := w.DB.AutoMigrate(&Aggregate{}); err != nil {
		return err
	}
	aggs := make([]Aggregate, w.Keys)
	for i, k := range w.AggregateKeys() {
		aggs[i] = Aggregate{Key: k}
	}
	return w.DB.Clauses(clause.OnConflict{DoNothing: true}).Create(&aggs).Error
}

var errRollback = errors.New("deliberate rollback")

// Run writes until its bound; it returns early when ctx ends.
func (w Workload) Run(ctx context.Context) WorkloadResult {
	var res WorkloadResult
	var seq atomic.Int64
	deadline := time.Now().Add(w.Duration)
	var wg sync.WaitGroup
	for range w.Writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				n := seq.Add(1)
				if w.Transactions > 0 && n > int64(w.Transactions) || w.Transactions == 0 && time.Now().After(deadline) {
					return
				}
				err := w.transaction(ctx, n)
				switch {
				case err == nil:
					atomic.AddInt64(&res.Committed, 1)
				case errors.Is(err, errRollback):
					atomic.AddInt64(&res.RolledBack, 1)
				default:
					atomic.AddInt64(&res.Failed, 1)
					time.Sleep(20 * time.Millisecond) // the database is away; try again soon
				}
			}
		}()
	}
	wg.Wait()
	return res
}

func (w Workload) transaction(ctx context.Context, n int64) error {
	if w.MultiKey {
		return w.multiKeyTransaction(ctx, n)
	}
	key := aggregateKey(rand.N(w.Keys))
	events := 1 + rand.N(3)
	return w.DB.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
		var agg Aggregate
		if err := tx.Clauses(clause.Locking{Strength: "UPDATE"}).First(&agg, "agg_key = ?", key).Error; err != nil {
			return err
		}
		msgs := make([]outbox.Message, events)
		for i := range msgs {
			agg.Version++
			e := Event{Key: key, Version: agg.Version, Tx: n, TxEvents: events}
			if w.Amounts {
				e.Amount = 1 + rand.Int64N(1000)
			}
			if w.PoisonEvery > 0 && (int(n)*3+i)%w.PoisonEvery == 0 {
				e.Pad = strings.Repeat("p", w.PoisonBytes)
			}
			payload, _ := json.Marshal(e)
			msgs[i] = outbox.Message{Topic: w.Topic, Key: key, Payload: payload}
		}
		if err := tx.Model(&agg).Update("version", agg.Version).Error; err != nil {
			return err
		}
		if err := outbox.Enqueue(tx, msgs...); err != nil {
			return err
		}
		if w.RollbackEvery > 0 && n%int64(w.RollbackEvery) == 0 {
			return errRollback
		}
		return nil
	})
}

// multiKeyTransaction locks 2 to 4 aggregates, in key order so that two
// writers never deadlock, and enqueues 2 to 5 events over them: each
// aggregate at least one, the rest at random, the keys interleaved, in 1
// to 3 Enqueue calls. Each event takes its aggregate's next version, so
// that a key's versions are still its commit order.
func (w Workload) multiKeyTransaction(ctx context.Context, n int64) error {
	events := 2 + rand.N(4)
	picked := rand.Perm(w.Keys)[:2+rand.N(min(events, 4)-1)]
	slices.Sort(picked)
	order := make([]int, events) // the aggregate (index in picked) of each event
	for i := range order {
		if i < len(picked) {
			order[i] = i
		} else {
			order[i] = rand.N(len(picked))
		}
	}
	rand.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
	calls := 1 + rand.N(min(events, 3))
	return w.DB.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
		aggs := make([]Aggregate, len(picked))
		for i, k := range picked {
			if err := tx.Clauses(clause.Locking{Strength: "UPDATE"}).First(&aggs[i], "agg_key = ?", aggregateKey(k)).Error; err != nil {
				return err
			}
		}
		msgs := make([]outbox.Message, events)
		for i, a := range order {
			agg := &aggs[a]
			agg.Version++
			payload, _ := json.Marshal(Event{Key: agg.Key, Version: agg.Version, Tx: n, TxEvents: events})
			msgs[i] = outbox.Message{Topic: w.Topic, Key: agg.Key, Payload: payload}
		}
		for i := range aggs {
			if err := tx.Model(&aggs[i]).Update("version", aggs[i].Version).Error; err != nil {
				return err
			}
		}
		// The events in calls parts, in order: [0, cut1), [cut1, cut2), ...
		for c, from := 0, 0; c < calls; c++ {
			to := events * (c + 1) / calls
			if err := outbox.Enqueue(tx, msgs[from:to]...); err != nil {
				return err
			}
			from = to
		}
		if w.RollbackEvery > 0 && n%int64(w.RollbackEvery) == 0 {
			return errRollback
		}
		return nil
	})
}
