package reliability

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/inbox"
	"github.com/gorm-outbox/outbox/kafka"
)

// Report compares what reached Kafka with what the database committed.
type Report struct {
	Scenario        string
	Committed       int // committed messages (see committedMessages)
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
	// Takeovers counts, in exactly-once mode (-1 otherwise), the times a
	// slot was taken over from a holder whose lease had run out (killed,
	// stopped or cut off), fencing its producer.
	Takeovers int
	// PartialGroups counts, in exactly-once mode (-1 otherwise), the
	// committed database transactions that a read_committed consumer did
	// not see as one Kafka transaction: some of their events (dead ones
	// aside) were not delivered, or their records do not all carry one
	// and the same outbox-transaction header.
	PartialGroups int
	// Groups counts the committed database transactions of more than one
	// event, what PartialGroups is about.
	Groups int
}

// String is the one line each scenario ends with.
func (r Report) String() string {
	line := fmt.Sprintf("scenario=%s committed=%d delivered=%d lost=%d duplicates=%d order_violations=%d dead=%d",
		r.Scenario, r.Committed, r.Delivered, r.Lost, r.Duplicates, r.OrderViolations, r.Dead)
	if r.PartialGroups >= 0 {
		line += fmt.Sprintf(" partial_groups=%d", r.PartialGroups)
	}
	if r.Takeovers >= 0 {
		line += fmt.Sprintf(" takeovers=%d", r.Takeovers)
	}
	return line
}

// Check reads the whole topic with franz-go (not the producer's client)
// and compares it with the outbox table. The groups are checked when the
// table has exactly-once publishers' slots.
func Check(ctx context.Context, db *gorm.DB, addrs []string, topic string) (Report, error) {
	rep := Report{Takeovers: -1, PartialGroups: -1}
	rows, err := committedMessages(ctx, db, topic)
	if err != nil {
		return rep, err
	}
	if slots := outbox.SlotTableName(outbox.DefaultTableName); db.Migrator().HasTable(slots) {
		var n int64
		if err := db.WithContext(ctx).Table(slots).Select("COALESCE(SUM(takeovers), 0)").Scan(&n).Error; err != nil {
			return rep, err
		}
		rep.Takeovers = int(n)
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
	recs, err := readCommitted(addrs, topic, published, time.Second, 30*time.Second)
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
	txnOf := map[string]map[string]bool{} // message id -> the outbox-transaction headers of its records
	for _, r := range recs {
		id := header(r, kafka.MessageIDHeader)
		if txnOf[id] == nil {
			txnOf[id] = map[string]bool{}
		}
		txnOf[id][header(r, kafka.TransactionHeader)] = true
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
	type group struct {
		declared int // the events the transaction enqueued, per their payload
		rows     []outbox.OutboxMessage
	}
	groups := map[int64]*group{}
	for _, m := range rows {
		var e Event
		if err := json.Unmarshal(m.Payload, &e); err != nil {
			return rep, fmt.Errorf("message %s: %w", m.ID, err)
		}
		if versions[e.Key] == nil {
			versions[e.Key] = map[int64]int{}
		}
		versions[e.Key][e.Version]++
		if e.Tx != 0 {
			g := groups[e.Tx]
			if g == nil {
				g = &group{declared: e.TxEvents}
				groups[e.Tx] = g
			}
			g.rows = append(g.rows, m)
		}
	}
	if rep.Takeovers >= 0 {
		rep.PartialGroups = 0
		for _, g := range groups {
			if g.declared > 1 {
				rep.Groups++
			}
			// One transaction: all its events committed, every one not dead
			// delivered, every record of them from one Kafka transaction.
			complete := len(g.rows) == g.declared
			txns := map[string]bool{}
			for _, m := range g.rows {
				if m.State == outbox.StateDead {
					continue
				}
				id := m.ID.String()
				if !seen[id] {
					complete = false
				}
				for t := range txnOf[id] {
					txns[t] = true
				}
			}
			if !complete || len(txns) > 1 || txns[""] {
				rep.PartialGroups++
			}
		}
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

// CommittedTable holds a copy of every committed message, for publishers
// that delete what they published (KeepCommitted).
const CommittedTable = "outbox_committed"

// KeepCommitted makes the database copy each message enqueued into
// CommittedTable, in the enqueuing transaction: the outbox table of
// publishers that delete what they published no longer shows what
// committed.
func KeepCommitted(db *gorm.DB) error {
	table := outbox.DefaultTableName
	if db.Dialector.Name() == "postgres" {
		for _, stmt := range []string{
			"CREATE TABLE " + CommittedTable + " (LIKE " + table + ")",
			"CREATE FUNCTION keep_committed() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO " + CommittedTable + " SELECT NEW.*; RETURN NULL; END $$",
			"CREATE TRIGGER keep_committed AFTER INSERT ON " + table + " FOR EACH ROW EXECUTE FUNCTION keep_committed()",
		} {
			if err := db.Exec(stmt).Error; err != nil {
				return fmt.Errorf("%s: %w", stmt, err)
			}
		}
		return nil
	}
	types, err := db.Migrator().ColumnTypes(table)
	if err != nil {
		return err
	}
	var cols, values []string
	for _, c := range types {
		cols, values = append(cols, "`"+c.Name()+"`"), append(values, "NEW.`"+c.Name()+"`")
	}
	for _, stmt := range []string{
		"CREATE TABLE " + CommittedTable + " LIKE " + table,
		"CREATE TRIGGER keep_committed AFTER INSERT ON " + table + " FOR EACH ROW INSERT INTO " + CommittedTable +
			" (" + strings.Join(cols, ", ") + ") VALUES (" + strings.Join(values, ", ") + ")",
	} {
		if err := db.Exec(stmt).Error; err != nil {
			return fmt.Errorf("%s: %w", stmt, err)
		}
	}
	return nil
}

// committedMessages are topic's committed messages as they stand: the
// outbox table's, or, where KeepCommitted copied them, the copies, with
// the state of the rows still in the outbox table, and published for
// those no longer in it.
func committedMessages(ctx context.Context, db *gorm.DB, topic string) ([]outbox.OutboxMessage, error) {
	var current []outbox.OutboxMessage
	if err := db.WithContext(ctx).Table(outbox.DefaultTableName).Where("topic = ?", topic).Find(&current).Error; err != nil {
		return nil, err
	}
	if !db.Migrator().HasTable(CommittedTable) {
		return current, nil
	}
	var rows []outbox.OutboxMessage
	if err := db.WithContext(ctx).Table(CommittedTable).Where("topic = ?", topic).Find(&rows).Error; err != nil {
		return nil, err
	}
	now := make(map[string]outbox.OutboxMessage, len(current))
	for _, m := range current {
		now[m.ID.String()] = m
	}
	for i, m := range rows {
		if c, ok := now[m.ID.String()]; ok {
			rows[i] = c
		} else {
			rows[i].State = outbox.StatePublished
		}
	}
	return rows, nil
}

// readCommitted reads topic from the start, as a consumer with
// isolation.level=read_committed does: records of aborted transactions
// (a fenced or cut exactly-once publisher's) are not delivered, and
// reading stops at the first transaction still open. It returns once it
// has n records and nothing more came for quiet, or after timeout.
func readCommitted(addrs []string, topic string, n int, quiet, timeout time.Duration) ([]*kgo.Record, error) {
	cl, err := kgo.NewClient(kgo.SeedBrokers(addrs...), kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchMaxBytes(64<<20),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()))
	if err != nil {
		return nil, err
	}
	defer cl.Close()
	deadline := time.Now().Add(timeout)
	var out []*kgo.Record
	for {
		wait := time.Until(deadline)
		if len(out) >= n {
			wait = min(wait, quiet)
		}
		if wait <= 0 {
			break
		}
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		fs := cl.PollFetches(ctx)
		cancel()
		if errs := fs.Errors(); len(errs) > 0 && ctx.Err() == nil {
			return out, fmt.Errorf("fetch: %w", errs[0].Err)
		}
		got := fs.Records()
		if len(got) == 0 && (len(out) >= n || time.Now().After(deadline)) {
			break
		}
		out = append(out, got...)
	}
	if len(out) < n {
		return out, fmt.Errorf("read %d records of %s, want at least %d", len(out), topic, n)
	}
	return out, nil
}

func header(r *kgo.Record, key string) string {
	for _, h := range r.Headers {
		if h.Key == key {
			return string(h.Value)
		}
	}
	return ""
}

// InboxReport compares what the inbox scenario's ledger (service B) applied
// with what service A committed.
type InboxReport struct {
	Scenario        string
	Committed       int // A's committed events that are not dead: what B must apply
	Applied         int // of those, how many B applied
	Lost            int // committed, not dead, and never applied
	AppliedTwice    int // applications beyond the first of each event
	OrderViolations int // an event applied after a later one of its key
	// Phantoms counts applications of events A never committed: those of
	// its rolled-back transactions.
	Phantoms int
	// Unbalanced counts accounts whose balance is not the sum of the
	// amounts of their key's committed events, or whose count of applied
	// events is not the number of their postings.
	Unbalanced int
	// Unsettled counts B's inbox records of the group in a state other
	// than applied (parked, held, or waiting for a retry).
	Unsettled int
}

// String is the one line the scenario ends with.
func (r InboxReport) String() string {
	return fmt.Sprintf("scenario=%s applied=%d lost=%d applied_twice=%d order_violations=%d",
		r.Scenario, r.Applied, r.Lost, r.AppliedTwice, r.OrderViolations)
}

// CheckInbox compares B's postings, in each account's apply order, and
// B's accounts with A's outbox table: what committed there.
func CheckInbox(ctx context.Context, a, b *gorm.DB, topic, group string) (InboxReport, error) {
	var rep InboxReport
	var rows []outbox.OutboxMessage
	if err := a.WithContext(ctx).Table(outbox.DefaultTableName).Where("topic = ?", topic).Find(&rows).Error; err != nil {
		return rep, err
	}
	committed := make(map[string]Event, len(rows))
	sums := map[string]int64{}
	for _, m := range rows {
		if m.State == outbox.StateDead {
			continue
		}
		var e Event
		if err := json.Unmarshal(m.Payload, &e); err != nil {
			return rep, fmt.Errorf("message %s: %w", m.ID, err)
		}
		committed[m.ID.String()] = e
		sums[e.Key] += e.Amount
	}
	rep.Committed = len(committed)

	var postings []Posting
	if err := b.WithContext(ctx).Order("account, apply_no").Find(&postings).Error; err != nil {
		return rep, err
	}
	applied := map[string]int{}
	perAccount := map[string]int64{}
	lastVersion := map[string]int64{}
	for _, p := range postings {
		perAccount[p.Account]++
		applied[p.MessageID]++
		if applied[p.MessageID] > 1 {
			rep.AppliedTwice++
			continue // counted here, and not again as out of order
		}
		if _, ok := committed[p.MessageID]; !ok {
			rep.Phantoms++
			continue
		}
		rep.Applied++
		if p.Version <= lastVersion[p.Account] {
			rep.OrderViolations++
		}
		lastVersion[p.Account] = p.Version
	}
	for id := range committed {
		if applied[id] == 0 {
			rep.Lost++
		}
	}

	var accounts []Account
	if err := b.WithContext(ctx).Find(&accounts).Error; err != nil {
		return rep, err
	}
	for _, acc := range accounts {
		if acc.Balance != sums[acc.Key] || acc.Applied != perAccount[acc.Key] {
			rep.Unbalanced++
		}
	}
	var unsettled int64
	if err := b.WithContext(ctx).Table(inbox.DefaultTableName).Where("consumer_group = ? AND state <> ?", group, "applied").
		Count(&unsettled).Error; err != nil {
		return rep, err
	}
	rep.Unsettled = int(unsettled)
	return rep, nil
}
