package reliability

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
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
			e := Event{Key: key, Version: agg.Version}
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
