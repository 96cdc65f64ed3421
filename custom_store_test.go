package outbox_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
)

// onlyStore is a Store of the application's that has nothing but the Store
// interface: it hides every other method of the store it wraps.
type onlyStore struct{ outbox.Store }

// cleaningStore is a Store of the application's that can also clean up.
type cleaningStore struct {
	outbox.Store
	cleanup func(context.Context, outbox.RetentionPolicy, func(int64)) (int64, error)
}

func (s cleaningStore) Cleanup(ctx context.Context, p outbox.RetentionPolicy, progress func(int64)) (int64, error) {
	return s.cleanup(ctx, p, progress)
}

// orderedSender records what it sends per key, refuses the message whose
// payload is refuse once, and holds back the later messages of its key in
// that batch, as a Sender must.
type orderedSender struct {
	refuse  string
	mu      sync.Mutex
	sent    map[string][]string
	refused int
}

func (s *orderedSender) Send(_ context.Context, msgs []*outbox.OutboxMessage) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	failed := map[uuid.UUID]error{}
	failedKeys := map[string]bool{}
	for _, m := range msgs {
		switch {
		case failedKeys[m.Key]:
			failed[m.ID] = outbox.ErrHeldBack
		case string(m.Payload) == s.refuse && s.refused == 0:
			s.refused++
			failed[m.ID] = errors.New("refused once")
			failedKeys[m.Key] = true
		default:
			s.sent[m.Key] = append(s.sent[m.Key], string(m.Payload))
		}
	}
	if len(failed) > 0 {
		return &outbox.SendError{Failed: failed}
	}
	return nil
}

func (s *orderedSender) total() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, ps := range s.sent {
		n += len(ps)
	}
	return n
}

// A Store written outside the package gets the publisher's claims, sends,
// results, retries and per-key order through the Store interface alone
// (leases, on every database), and retention when it has a Cleanup
// method: the subset the docs promise.
func TestPublisherWithAStoreOfTheApplication(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		plugin, err := outbox.StoreOf(db)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range []struct {
			topic string
			store outbox.Store
			clean bool
		}{
			{"store-only", onlyStore{plugin}, false},
			{"with-cleanup", cleaningStore{plugin, plugin.Cleanup}, true},
		} {
			t.Run(c.topic, func(t *testing.T) {
				const n = 30
				enqueueKeyed(t, db, c.topic, n, func(i int) string { return []string{"a", "b", "c"}[i%3] })
				sender := &orderedSender{refuse: "m4", sent: map[string][]string{}}
				pub, err := outbox.NewPublisher(db, sender, outbox.WithStore(c.store), outbox.WithPollInterval(5*time.Millisecond),
					outbox.WithBatchSize(7), outbox.WithWorkers(2),
					outbox.WithRetryPolicy(outbox.RetryPolicy{MinBackoff: time.Millisecond, MaxBackoff: time.Millisecond}),
					outbox.WithRetention(outbox.RetentionPolicy{Published: time.Nanosecond}, 20*time.Millisecond))
				if err != nil {
					t.Fatal(err)
				}
				if err := pub.Start(t.Context()); err != nil {
					t.Fatal(err)
				}
				defer func() { _ = pub.Stop(context.Background()) }()
				waitFor(t, "every message sent", func() bool { return sender.total() == n })
				sender.mu.Lock()
				for key, payloads := range sender.sent {
					last := -1
					for _, p := range payloads {
						var i int
						if _, err := fmt.Sscanf(p, "m%d", &i); err != nil {
							t.Fatal(err)
						}
						if i < last {
							t.Errorf("key %s sent out of order: %v", key, payloads)
						}
						last = i
					}
				}
				refused := sender.refused
				sender.mu.Unlock()
				if refused != 1 {
					t.Fatalf("m4 was refused %d times, want once", refused)
				}
				if c.clean {
					waitFor(t, "retention to delete the published rows", func() bool { return count(t, db, "outbox_messages", "topic = ?", c.topic) == 0 })
					return
				}
				waitFor(t, "every message recorded as published", func() bool {
					return count(t, db, "outbox_messages", "topic = ? AND state = ?", c.topic, outbox.StatePublished) == n
				})
				if retried := count(t, db, "outbox_messages", "topic = ? AND attempts = 1", c.topic); retried != 1 {
					t.Fatalf("%d messages record a failed attempt, want m4 alone", retried)
				}
				time.Sleep(100 * time.Millisecond) // several retention intervals
				if left := count(t, db, "outbox_messages", "topic = ?", c.topic); left != n {
					t.Fatalf("%d of %d rows left: a Store without Cleanup was cleaned", left, n)
				}
			})
		}
	})
}

// auditedStore embeds the plugin's store and claims through its own Claim.
type auditedStore struct {
	*outbox.GormStore
	claims atomic.Int32
}

func (s *auditedStore) Claim(ctx context.Context, opts outbox.ClaimOptions) (string, []*outbox.OutboxMessage, error) {
	s.claims.Add(1)
	return s.GormStore.Claim(ctx, opts)
}

// A store that embeds *GormStore and has a Claim of its own is claimed
// through that Claim, by lease, even on PostgreSQL, where the plugin's own
// store holds its claims: the publisher never goes around the methods it
// was given.
func TestPublisherClaimsThroughAnEmbeddingStoresOwnClaim(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		plugin, err := outbox.StoreOf(db)
		if err != nil {
			t.Fatal(err)
		}
		store := &auditedStore{GormStore: plugin}
		enqueueN(t, db, "audited", 5)
		sender := &orderedSender{sent: map[string][]string{}}
		pub, err := outbox.NewPublisher(db, sender, outbox.WithStore(store))
		if err != nil {
			t.Fatal(err)
		}
		res, err := pub.PublishOnce(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		if res.Published != 5 || store.claims.Load() != 1 {
			t.Fatalf("published %d through %d calls of the store's Claim, want 5 through 1", res.Published, store.claims.Load())
		}
	})
}
