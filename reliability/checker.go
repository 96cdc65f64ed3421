package reliability

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/kafka"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// Report compares what reached Kafka with what the database committed.
type Report struct {
	Scenario        string
	Committed       int // messages in the outbox table: exactly the committed ones
	Delivered       int // of those, how many reached Kafka at least once
	Lost            int // committed, not dead, and never delivered
	Duplicates      int // records beyond the first of each message id
	OrderViolations int // a key's message delivered before an older one of its key
	Dead            int
	Phantoms        int // records of messages that never committed
	// Partial counts aggregates whose committed version does not match
	// their committed events (1..version, each once): a transaction that
	// wrote one without the other.
	Partial int
}

// String is the one line each scenario ends with.
func (r Report) String() string {
	return fmt.Sprintf("scenario=%s committed=%d delivered=%d lost=%d duplicates=%d order_violations=%d dead=%d",
		r.Scenario, r.Committed, r.Delivered, r.Lost, r.Duplicates, r.OrderViolations, r.Dead)
}

// Check reads the whole topic with franz-go (not the producer's client)
// and compares it with the outbox table.
func Check(ctx context.Context, db *gorm.DB, addrs []string, topic string) (Report, error) {
	var rep Report
	var rows []outbox.OutboxMessage
	if err := db.WithContext(ctx).Table(outbox.DefaultTableName).Where("topic = ?", topic).Find(&rows).Error; err != nil {
		return rep, err
	}
	committed := make(map[string]outbox.OutboxMessage, len(rows))
	for _, m := range rows {
		committed[m.ID.String()] = m
		if m.State == outbox.StateDead {
			rep.Dead++
		}
	}
	rep.Committed = len(rows)

	published := 0
	for _, m := range rows {
		if m.State == outbox.StatePublished {
			published++
		}
	}
	// Every published message is in Kafka at least once; read them all,
	// then until nothing more comes.
	recs, err := outboxtest.ReadAllRecords(addrs, topic, published, time.Second, 30*time.Second)
	if err != nil && len(recs) == 0 {
		return rep, err
	} // a shortfall is reported below as lost messages
	sort.Slice(recs, func(i, j int) bool {
		if recs[i].Partition != recs[j].Partition {
			return recs[i].Partition < recs[j].Partition
		}
		return recs[i].Offset < recs[j].Offset
	})
	seen := map[string]bool{}
	lastVersion := map[string]int64{}
	for _, r := range recs {
		id := header(r, kafka.MessageIDHeader)
		if seen[id] {
			rep.Duplicates++
			continue
		}
		seen[id] = true
		if _, ok := committed[id]; !ok {
			rep.Phantoms++
			continue
		}
		rep.Delivered++
		var e Event
		if err := json.Unmarshal(r.Value, &e); err != nil {
			return rep, fmt.Errorf("record %s: %w", id, err)
		}
		if e.Version <= lastVersion[e.Key] {
			rep.OrderViolations++
		}
		lastVersion[e.Key] = e.Version
	}
	for id, m := range committed {
		if !seen[id] && m.State != outbox.StateDead {
			rep.Lost++
		}
	}
	var aggs []Aggregate
	if err := db.WithContext(ctx).Find(&aggs).Error; err != nil {
		return rep, err
	}
	versions := map[string]map[int64]int{}
	for _, m := range rows {
		var e Event
		if err := json.Unmarshal(m.Payload, &e); err != nil {
			return rep, fmt.Errorf("message %s: %w", m.ID, err)
		}
		if versions[e.Key] == nil {
			versions[e.Key] = map[int64]int{}
		}
		versions[e.Key][e.Version]++
	}
	for _, a := range aggs {
		vs := versions[a.Key]
		ok := len(vs) == int(a.Version)
		for v := int64(1); ok && v <= a.Version; v++ {
			ok = vs[v] == 1
		}
		if !ok {
			rep.Partial++
		}
	}
	return rep, nil
}

func header(r *kgo.Record, key string) string {
	for _, h := range r.Headers {
		if h.Key == key {
			return string(h.Value)
		}
	}
	return ""
}
