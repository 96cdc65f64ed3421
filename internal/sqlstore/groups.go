package sqlstore

import (
	"sort"
	"time"

	"github.com/google/uuid"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/internal/core"
)

// maxGroupRounds bounds the closure of a batch's groups: past it, the
// groups still growing wait for a later claim.
const maxGroupRounds = 64

// completeGroups makes a guarded claim hold whole transaction groups (the
// messages one database transaction enqueued, tied by tx_group), so that
// exactly-once mode sends each group in one broker transaction. It adds the
// pending messages of the picked messages' groups that the walk left out
// (the batch was full, or they come after another key's messages), as long
// as each one is due and unclaimed and its key has nothing older pending
// outside the batch; a transaction larger than the batch comes whole. A
// group that cannot be completed now (a member in flight elsewhere, or
// waiting for a retry, or behind another key's unsent message) leaves the
// batch with the later messages of its keys, and waits.
//
// excluded, if not nil, is asked about every row of the batch once it is
// locked (about the picked rows while the groups are read, from another
// goroutine): those it names leave like a blocked group's. reaching, if
// not nil, is called once the groups are found to reach beyond the batch,
// before any row outside it is locked; its error ends the completion.
func (s *Store) completeGroups(tx *gorm.DB, now time.Time, picked []Picked, excluded func([]uuid.UUID) (map[uuid.UUID]bool, error), reaching func() error) ([]Picked, error) {
	if len(picked) == 0 {
		return picked, nil
	}
	q := s.Quote
	inBatch := make(map[uuid.UUID]bool, len(picked))
	for _, m := range picked {
		inBatch[m.ID] = true
	}
	// The picked messages' groups: the first message of a transaction is
	// its group's id and has no tx_group; the others name it.
	groupOf := make(map[uuid.UUID]uuid.UUID, len(picked))
	for _, m := range picked {
		groupOf[m.ID] = m.ID
	}
	var unknown []uuid.UUID // the picked messages whose group the lock did not read
	for _, m := range picked {
		if m.Group != (uuid.UUID{}) {
			groupOf[m.ID] = m.Group
		} else {
			unknown = append(unknown, m.ID)
		}
	}
	if len(unknown) > 0 {
		in, arg := s.dialect.InIDs(q("id"), unknown)
		var named []struct {
			ID      uuid.UUID
			TxGroup uuid.UUID
		}
		err := tx.Raw("SELECT "+q("id")+", "+q("tx_group")+" FROM "+s.QuotedTable()+" WHERE "+in+" AND "+q("tx_group")+" IS NOT NULL", arg).
			Scan(&named).Error
		if err != nil {
			return nil, err
		}
		for _, n := range named {
			groupOf[n.ID] = n.TxGroup
		}
	}
	groups := map[uuid.UUID]bool{}
	for _, g := range groupOf {
		groups[g] = true
	}
	ids := make([]uuid.UUID, 0, len(groups))
	for g := range groups {
		ids = append(ids, g)
	}
	// Grow the batch to a closure: every pending member of its groups, and
	// every older pending message of a joining message's key, with its
	// group; a group with a member not due (in flight elsewhere, or
	// waiting for a retry) is blocked.
	type row struct {
		ID            uuid.UUID
		MessageKey    string
		TxGroup       uuid.NullUUID
		NextAttemptAt time.Time
		State         string
	}
	cols := q("id") + ", " + q("message_key") + ", " + q("tx_group") + ", " + q("next_attempt_at") + ", " + q("state")
	// The groups' members and leaders are read by tx_group and by id, and
	// their state is checked here: with the state in the SQL, a planner
	// whose statistics lag a fast-growing backlog may walk the whole
	// pending index instead of the group index.
	pendingOnly := func(rows []row) []row {
		out := rows[:0]
		for _, r := range rows {
			if r.State == string(core.StatePending) {
				out = append(out, r)
			}
		}
		return out
	}
	var outside []Picked
	blocked := map[uuid.UUID]bool{}
	seen := map[uuid.UUID]bool{}
	for id := range inBatch {
		seen[id] = true
	}
	heldFrom := map[string]uuid.UUID{} // per key, its oldest message found held
	add := func(rows []row, dependent func(row) uuid.UUID) map[uuid.UUID]bool {
		newGroups := map[uuid.UUID]bool{}
		for _, m := range rows {
			g := m.ID
			if m.TxGroup.Valid {
				g = m.TxGroup.UUID
			}
			notDue := m.NextAttemptAt.After(now)
			if notDue {
				// Held (in flight elsewhere, or in a retry's backoff): no
				// later message of its key may go in this batch, however
				// it was found.
				if h, ok := heldFrom[m.MessageKey]; m.MessageKey != "" && (!ok || lessID(m.ID, h)) {
					heldFrom[m.MessageKey] = m.ID
				}
				if dependent != nil {
					blocked[dependent(m)] = true
				}
			}
			if seen[m.ID] {
				continue
			}
			seen[m.ID] = true
			groupOf[m.ID] = g
			if !groups[g] {
				groups[g], newGroups[g] = true, true
			}
			if notDue {
				blocked[g] = true
				continue
			}
			outside = append(outside, Picked{OutboxMessage: &core.OutboxMessage{ID: m.ID, Key: m.MessageKey, State: core.StatePending}})
		}
		return newGroups
	}
	// The picked rows are locked: which of them were named by an earlier
	// claim is read meanwhile, on another connection.
	var excludedDone chan struct{}
	var excludedIDs map[uuid.UUID]bool
	var excludedErr error
	if excluded != nil {
		excludedDone = make(chan struct{})
		ids := PickedIDs(picked)
		go func() {
			defer close(excludedDone)
			excludedIDs, excludedErr = excluded(ids)
		}()
		defer func() { <-excludedDone }()
	}
	pending := ids
	for rounds := 0; len(pending) > 0 && rounds < maxGroupRounds; rounds++ {
		// A group's members name it in tx_group; its first message, if
		// not in hand yet, is the row whose id it is.
		gIn, gArg := s.dialect.InIDs(q("tx_group"), pending)
		var members []row
		err := tx.Raw("SELECT "+cols+" FROM "+s.QuotedTable()+" WHERE "+gIn, gArg).Scan(&members).Error
		if err != nil {
			return nil, err
		}
		members = pendingOnly(members)
		var leaders []uuid.UUID
		for _, g := range pending {
			if !seen[g] {
				leaders = append(leaders, g)
			}
		}
		if len(leaders) > 0 {
			idIn, idArg := s.dialect.InIDs(q("id"), leaders)
			var more []row
			err = tx.Raw("SELECT "+cols+" FROM "+s.QuotedTable()+" WHERE "+idIn, idArg).Scan(&more).Error
			if err != nil {
				return nil, err
			}
			members = append(members, pendingOnly(more)...)
		}
		before := len(outside)
		next := add(members, nil)
		if rounds == 0 && len(outside) > 0 && reaching != nil {
			if err := reaching(); err != nil {
				return nil, err
			}
		}
		// Each joining message's key must have nothing older pending
		// outside the batch: what it has joins too, or blocks.
		newest := map[string]uuid.UUID{}
		owner := map[string]uuid.UUID{}
		for _, m := range outside[before:] {
			if m.Key != "" && lessID(newest[m.Key], m.ID) {
				newest[m.Key], owner[m.Key] = m.ID, groupOf[m.ID]
			}
		}
		if len(newest) > 0 {
			// One read for every key: its pending messages older than the
			// newest one joining; those older than what joins on their key
			// join too.
			keys := make(map[string]bool, len(newest))
			var top uuid.UUID
			for key, last := range newest {
				keys[key] = true
				if lessID(top, last) {
					top = last
				}
			}
			kIn, kArg := s.dialect.InKeys(q("message_key"), keys)
			var older []row
			err := tx.Raw("SELECT "+cols+" FROM "+s.QuotedTable()+" WHERE "+q("state")+" = 'pending' AND "+kIn+" AND "+q("id")+" < ?",
				kArg, s.dialect.IDArg(top)).Scan(&older).Error
			if err != nil {
				return nil, err
			}
			byKey := map[string][]row{}
			for _, o := range older {
				if lessID(o.ID, newest[o.MessageKey]) {
					byKey[o.MessageKey] = append(byKey[o.MessageKey], o)
				}
			}
			for key, rows := range byKey {
				g := owner[key]
				for k := range add(rows, func(row) uuid.UUID { return g }) {
					next[k] = true
				}
			}
		}
		pending = pending[:0:0]
		for g := range next {
			pending = append(pending, g)
		}
	}
	if len(pending) > 0 {
		// Too entangled to settle in one claim: wait for what holds it.
		for _, g := range pending {
			blocked[g] = true
		}
	}
	var joining []Picked
	for _, m := range outside {
		if !blocked[groupOf[m.ID]] {
			joining = append(joining, m)
		}
	}
	if len(joining) > 0 {
		locked, err := s.dialect.LockPicked(tx, now, joining)
		if err != nil {
			return nil, err
		}
		got := make(map[uuid.UUID]bool, len(locked))
		for _, m := range locked {
			got[m.ID] = true
		}
		for _, m := range joining {
			if !got[m.ID] {
				blocked[groupOf[m.ID]] = true
			}
		}
		joining = joining[:0]
		for _, m := range locked {
			if !blocked[groupOf[m.ID]] {
				joining = append(joining, m)
			}
		}
	}
	if excluded != nil {
		<-excludedDone
		if excludedErr != nil {
			return nil, excludedErr
		}
		if len(joining) > 0 {
			more, err := excluded(PickedIDs(joining))
			if err != nil {
				return nil, err
			}
			if excludedIDs == nil {
				excludedIDs = map[uuid.UUID]bool{}
			}
			for id := range more {
				excludedIDs[id] = true
			}
		}
		for _, m := range append(append([]Picked(nil), picked...), joining...) {
			if !excludedIDs[m.ID] {
				continue
			}
			blocked[groupOf[m.ID]] = true
			if h, ok := heldFrom[m.Key]; m.Key != "" && (!ok || lessID(m.ID, h)) {
				heldFrom[m.Key] = m.ID
			}
		}
	}
	if len(outside) == 0 && len(blocked) == 0 && len(heldFrom) == 0 {
		return picked, nil
	}
	// A candidate that does not join (its group is blocked, or its row
	// could not be locked) holds its key like a message in flight: no
	// later message of its key may go.
	joined := make(map[uuid.UUID]bool, len(joining))
	for _, m := range joining {
		joined[m.ID] = true
	}
	for _, m := range outside {
		if h, ok := heldFrom[m.Key]; !joined[m.ID] && m.Key != "" && (!ok || lessID(m.ID, h)) {
			heldFrom[m.Key] = m.ID
		}
	}
	all := append(append([]Picked(nil), picked...), joining...)
	sort.Slice(all, func(i, j int) bool { return lessID(all[i].ID, all[j].ID) })
	// A blocked group leaves, and with it every later message of its keys,
	// whose groups leave too, until nothing more leaves.
	out := make(map[uuid.UUID]bool)
	for changed := true; changed; {
		changed = false
		stopped := map[string]bool{}
		for _, m := range all {
			h, held := heldFrom[m.Key]
			leave := out[m.ID] || blocked[groupOf[m.ID]] || m.Key != "" && (stopped[m.Key] || held && lessID(h, m.ID))
			if !leave {
				continue
			}
			if !out[m.ID] {
				out[m.ID], changed = true, true
			}
			if !blocked[groupOf[m.ID]] {
				blocked[groupOf[m.ID]], changed = true, true
			}
			if m.Key != "" {
				stopped[m.Key] = true
			}
		}
	}
	kept := all[:0]
	var readIDs []uuid.UUID
	for _, m := range all {
		if out[m.ID] {
			continue
		}
		kept = append(kept, m)
		if !inBatch[m.ID] {
			readIDs = append(readIDs, m.ID)
		}
	}
	if len(readIDs) == 0 {
		return kept, nil
	}
	// The joining messages were read without their payload: read them whole.
	rin, rarg := s.dialect.InIDs(q("id"), readIDs)
	whole, err := s.readMessages(tx, "SELECT "+s.columns+" FROM "+s.QuotedTable()+" WHERE "+rin, rarg)
	if err != nil {
		return nil, err
	}
	byID := make(map[uuid.UUID]*Picked, len(kept))
	for i := range kept {
		byID[kept[i].ID] = &kept[i]
	}
	for _, w := range whole {
		if p := byID[w.ID]; p != nil {
			p.OutboxMessage = w
		}
	}
	return kept, nil
}
