package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"sort"
	"strings"
	"text/tabwriter"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/internal/inboxstore"
)

var states = []outbox.State{outbox.StatePending, outbox.StatePublished, outbox.StateDead}

func cmdStatus(args []string) (action, error) {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	asJSON := boolFlag(fs, "json")
	budget := intFlag(fs, "max-attempts", outbox.DefaultRetryPolicy.MaxAttempts, 1)
	if err := parse(fs, args); err != nil {
		return nil, err
	}
	if err := noArgs(fs); err != nil {
		return nil, err
	}
	return func(ctx context.Context, a *app) error { return status(ctx, a, *asJSON, *budget) }, nil
}

func status(ctx context.Context, a *app, asJSON bool, budget int) error {
	var st outbox.Stats
	if a.store != nil {
		var err error
		if st, err = a.store.Stats(ctx, budget); err != nil {
			return err
		}
	}
	var slots []outbox.SlotStatus
	if a.store != nil {
		var err error
		if slots, err = a.store.Slots(ctx); err != nil {
			return err
		}
	}
	var counts []inboxstore.Count
	if a.inbox != nil {
		var err error
		if counts, err = a.inbox.Counts(ctx); err != nil {
			return err
		}
	}
	if asJSON {
		out := map[string]any{"inbox": nil}
		if a.store != nil {
			out["table"] = a.store.TableName()
			out["pending"] = st.Counts[outbox.StatePending]
			out["published"] = st.Counts[outbox.StatePublished]
			out["dead"] = st.Counts[outbox.StateDead]
			out["oldest_pending_age_seconds"] = st.OldestPendingAge.Seconds()
			out["retrying"] = st.Retrying
			out["over_attempt_budget"] = st.OverBudget
			out["expired_claims"] = st.ExpiredClaims
			if slots != nil {
				out["transactional_slots"] = slotsJSON(slots)
			}
		}
		if a.inbox != nil {
			out["inbox"] = map[string]any{"table": a.inbox.Table(), "groups": inboxGroups(counts)}
		}
		enc := json.NewEncoder(a.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	}
	if a.store != nil {
		fmt.Fprintf(a.stdout, "table %s\n", a.store.TableName())
		fmt.Fprintf(a.stdout, "  pending     %8d   oldest %s, %d retrying, %d expired claims\n",
			st.Counts[outbox.StatePending], st.OldestPendingAge.Round(time.Second), st.Retrying, st.ExpiredClaims)
		fmt.Fprintf(a.stdout, "  published   %8d\n", st.Counts[outbox.StatePublished])
		fmt.Fprintf(a.stdout, "  dead        %8d   %d over the attempt budget of %d\n", st.Counts[outbox.StateDead], st.OverBudget, budget)
		slotStatus(a, slots)
	}
	if a.inbox != nil {
		inboxStatus(a, counts)
	}
	return nil
}

func cmdList(args []string) (action, error) {
	fs := flag.NewFlagSet("list", flag.ContinueOnError)
	state := stateFlag(fs, "state")
	topic := stringFlag(fs, "topic", "", "a topic name")
	key := stringFlag(fs, "key", "", "a key (messages without a key cannot be listed by key)")
	olderThan := durationFlag(fs, "older-than", 0, false)
	newest := boolFlag(fs, "newest")
	limit := intFlag(fs, "limit", 50, 1)
	page := intFlag(fs, "page", 1, 1)
	payload := boolFlag(fs, "payload")
	if err := parse(fs, args); err != nil {
		return nil, err
	}
	if err := noArgs(fs); err != nil {
		return nil, err
	}
	if *page-1 > math.MaxInt / *limit {
		return nil, errUsage{fmt.Sprintf("--page %d of %d messages is past any table", *page, *limit)}
	}
	opts := outbox.ListOptions{State: *state, Topic: *topic, Key: *key, NewestFirst: *newest, Limit: *limit, Offset: (*page - 1) * *limit}
	// --older-than 0s is "created before now", which is every message.
	filterAge := isSet(fs, "older-than")
	return func(ctx context.Context, a *app) error {
		if filterAge {
			opts.CreatedBefore = time.Now().Add(-*olderThan)
		}
		return list(ctx, a, opts, *page, *payload)
	}, nil
}

func list(ctx context.Context, a *app, opts outbox.ListOptions, page int, payload bool) error {
	msgs, err := a.store.List(ctx, opts)
	if err != nil {
		return err
	}
	w := tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
	header := "ID\tSTATE\tTOPIC\tKEY\tATTEMPTS\tCREATED\tLAST ERROR"
	if payload {
		header += "\tPAYLOAD"
	}
	fmt.Fprintln(w, header)
	for _, m := range msgs {
		line := fmt.Sprintf("%s\t%s\t%s\t%s\t%d\t%s\t%s", m.ID, m.State, m.Topic, m.Key, m.Attempts,
			m.CreatedAt.UTC().Format(time.RFC3339), shorten(m.LastError, 60))
		if payload {
			line += "\t" + shorten(printable(m.Payload), 80)
		}
		fmt.Fprintln(w, line)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	if len(msgs) == opts.Limit {
		fmt.Fprintf(a.stderr, "(page %d; --page %d for more)\n", page, page+1)
	}
	return nil
}

func shorten(s string, n int) string {
	s = strings.ReplaceAll(s, "\n", " ")
	if utf8.RuneCountInString(s) <= n {
		return s
	}
	return string([]rune(s)[:n-1]) + "…"
}

// printable shows a payload as text when it is UTF-8, base64 otherwise.
func printable(b []byte) string {
	if utf8.Valid(b) {
		return string(b)
	}
	return "base64:" + base64.StdEncoding.EncodeToString(b)
}

func parseIDs(args []string) ([]uuid.UUID, error) {
	ids := make([]uuid.UUID, 0, len(args))
	for _, a := range args {
		id, err := uuid.Parse(a)
		if err != nil {
			return nil, errUsage{fmt.Sprintf("%q is not a message id (a UUID)", a)}
		}
		ids = append(ids, id)
	}
	return ids, nil
}

func cmdShow(args []string) (action, error) {
	fs := flag.NewFlagSet("show", flag.ContinueOnError)
	if err := parse(fs, args); err != nil {
		return nil, err
	}
	if fs.NArg() != 1 {
		return nil, errUsage{fmt.Sprintf("give one message id, not %d arguments", fs.NArg())}
	}
	ids, err := parseIDs(fs.Args())
	if err != nil {
		return nil, err
	}
	return func(ctx context.Context, a *app) error { return show(ctx, a, ids[0]) }, nil
}

func show(ctx context.Context, a *app, id uuid.UUID) error {
	m, err := a.store.Get(ctx, id)
	if err != nil {
		return err
	}
	w := tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintf(w, "id\t%s\n", m.ID)
	fmt.Fprintf(w, "state\t%s\n", m.State)
	fmt.Fprintf(w, "topic\t%s\n", m.Topic)
	fmt.Fprintf(w, "key\t%s\n", m.Key)
	fmt.Fprintf(w, "created\t%s\n", m.CreatedAt.UTC().Format(time.RFC3339Nano))
	if m.PublishedAt != nil {
		fmt.Fprintf(w, "published\t%s\n", m.PublishedAt.UTC().Format(time.RFC3339Nano))
	}
	fmt.Fprintf(w, "attempts\t%d\n", m.Attempts)
	if m.State == outbox.StatePending {
		fmt.Fprintf(w, "next attempt\t%s\n", m.NextAttemptAt.UTC().Format(time.RFC3339Nano))
	}
	if m.LastError != "" {
		fmt.Fprintf(w, "last error\t%s\n", m.LastError)
	}
	keys := make([]string, 0, len(m.Headers))
	for k := range m.Headers {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(w, "header %s\t%s\n", k, m.Headers[k])
	}
	fmt.Fprintf(w, "payload (%d bytes)\t%s\n", len(m.Payload), printable(m.Payload))
	return w.Flush()
}

func cmdRequeue(args []string) (action, error) {
	fs := flag.NewFlagSet("requeue", flag.ContinueOnError)
	dead := boolFlag(fs, "dead")
	topic := stringFlag(fs, "topic", "", "a topic name")
	if err := parse(fs, args); err != nil {
		return nil, err
	}
	if *dead {
		if fs.NArg() > 0 {
			return nil, errUsage{"give ids or --dead, not both"}
		}
		return func(ctx context.Context, a *app) error {
			n, err := a.store.RequeueDead(ctx, *topic)
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "requeued %d dead messages\n", n)
			return nil
		}, nil
	}
	if isSet(fs, "topic") {
		return nil, errUsage{"--topic goes with --dead"}
	}
	if fs.NArg() == 0 {
		return nil, errUsage{"give message ids, or --dead"}
	}
	ids, err := parseIDs(fs.Args())
	if err != nil {
		return nil, err
	}
	// An id given twice is one message to requeue, and one line of the report.
	seen := map[uuid.UUID]bool{}
	unique := ids[:0]
	for _, id := range ids {
		if !seen[id] {
			seen[id] = true
			unique = append(unique, id)
		}
	}
	return func(ctx context.Context, a *app) error { return requeue(ctx, a, unique) }, nil
}

func requeue(ctx context.Context, a *app, ids []uuid.UUID) error {
	var problems []string
	var dead []uuid.UUID
	for _, id := range ids {
		m, err := a.store.Get(ctx, id)
		switch {
		case errors.Is(err, outbox.ErrNotFound):
			problems = append(problems, fmt.Sprintf("no message with id %s", id))
		case err != nil:
			return err
		case m.State != outbox.StateDead:
			problems = append(problems, fmt.Sprintf("%s is %s, not dead", id, m.State))
		default:
			dead = append(dead, id)
		}
	}
	n, err := a.store.Requeue(ctx, dead...)
	if err != nil {
		return err
	}
	fmt.Fprintf(a.stdout, "requeued %d messages\n", n)
	if len(problems) > 0 {
		return fmt.Errorf("outbox: %s", strings.Join(problems, "; "))
	}
	return nil
}

func cmdPurge(args []string) (action, error) {
	fs := flag.NewFlagSet("purge", flag.ContinueOnError)
	published := boolFlag(fs, "published")
	olderThan := durationFlag(fs, "older-than", 0, false)
	yes := boolFlag(fs, "yes")
	if err := parse(fs, args); err != nil {
		return nil, err
	}
	if err := noArgs(fs); err != nil {
		return nil, err
	}
	if !*published {
		return nil, errUsage{"say what to purge: --published (pending and dead messages are never purged)"}
	}
	// Required, and 0s is a value (everything published so far), so what
	// tells it apart from a missing flag is whether it was given at all.
	if !isSet(fs, "older-than") {
		return nil, errUsage{"give --older-than, e.g. --older-than 720h (0s: everything published so far)"}
	}
	return func(ctx context.Context, a *app) error { return purge(ctx, a, *olderThan, *yes) }, nil
}

func purge(ctx context.Context, a *app, olderThan time.Duration, yes bool) error {
	n, err := a.store.CountOlder(ctx, outbox.StatePublished, olderThan)
	if err != nil {
		return err
	}
	if n == 0 {
		fmt.Fprintln(a.stdout, "nothing to purge")
		return nil
	}
	what := fmt.Sprintf("%d published messages older than %s", n, olderThan)
	if olderThan == 0 {
		what = fmt.Sprintf("all %d published messages", n)
	}
	if !yes && !a.confirm(fmt.Sprintf("Delete %s from %s?", what, a.store.TableName())) {
		return errors.New("outbox: purge cancelled, nothing deleted")
	}
	// Cleanup takes a zero retention as its default of 7 days; the shortest
	// positive one is what 0s means here.
	retention := max(olderThan, time.Nanosecond)
	deleted, err := a.store.Cleanup(ctx, outbox.RetentionPolicy{Published: retention}, func(total int64) {
		fmt.Fprintf(a.stderr, "\rdeleted %d of %d", total, n)
	})
	if deleted > 0 {
		fmt.Fprintln(a.stderr)
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(a.stdout, "deleted %d published messages\n", deleted)
	return nil
}

func cmdWatch(args []string) (action, error) {
	fs := flag.NewFlagSet("watch", flag.ContinueOnError)
	interval := durationFlag(fs, "interval", time.Second, true)
	times := intFlag(fs, "n", 0, 0)
	if err := parse(fs, args); err != nil {
		return nil, err
	}
	if err := noArgs(fs); err != nil {
		return nil, err
	}
	return func(ctx context.Context, a *app) error { return watch(ctx, a, *interval, *times) }, nil
}

func watch(ctx context.Context, a *app, interval time.Duration, times int) error {
	var prev outbox.Stats
	var prevAt time.Time
	for i := 0; times == 0 || i < times; i++ {
		if i > 0 {
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(interval):
			}
		}
		st, err := a.store.Stats(ctx, 0)
		if err != nil {
			if ctx.Err() != nil {
				return nil //nolint:nilerr // interrupted: watching ends, which is no failure
			}
			return err
		}
		now := time.Now()
		rate := func(s outbox.State) string {
			if prevAt.IsZero() {
				return "-"
			}
			return fmt.Sprintf("%.1f/s", float64(st.Counts[s]-prev.Counts[s])/now.Sub(prevAt).Seconds())
		}
		if a.tty {
			fmt.Fprint(a.stdout, "\033[H\033[2J")
		}
		fmt.Fprintf(a.stdout, "%s  %s  pending %d (%s, oldest %s)  published %d (%s)  dead %d (%s)  expired claims %d\n",
			now.Format("15:04:05"), a.store.TableName(), st.Counts[outbox.StatePending], rate(outbox.StatePending),
			st.OldestPendingAge.Round(time.Millisecond), st.Counts[outbox.StatePublished], rate(outbox.StatePublished),
			st.Counts[outbox.StateDead], rate(outbox.StateDead), st.ExpiredClaims)
		prev, prevAt = st, now
	}
	return nil
}

// slotStatus prints the exactly-once publishers' slots, if any ever ran:
// who holds each, whether a transaction is open (in flight, or not yet
// settled in the table), and how many committed, aborted or were taken over.
func slotStatus(a *app, slots []outbox.SlotStatus) {
	if len(slots) == 0 {
		return
	}
	now := time.Now()
	fmt.Fprintf(a.stdout, "exactly-once slots (%s)\n", outbox.SlotTableName(a.store.TableName()))
	fmt.Fprintf(a.stdout, "  %-28s %-6s %8s %8s %9s  %s\n", "transactional id", "txn", "commits", "aborts", "takeovers", "holder")
	for _, s := range slots {
		txn := "-"
		if s.Open {
			txn = "open"
		}
		holder := "free"
		switch {
		case s.Owner != "" && s.LeaseUntil.After(now):
			holder = fmt.Sprintf("%s (lease %s left)", s.Owner, s.LeaseUntil.Sub(now).Round(time.Second))
		case s.Owner != "":
			holder = fmt.Sprintf("%s (lease expired %s ago: gone, or paused)", s.Owner, now.Sub(s.LeaseUntil).Round(time.Second))
		}
		fmt.Fprintf(a.stdout, "  %-28s %-6s %8d %8d %9d  %s\n", s.TransactionalID, txn, s.Commits, s.Aborts, s.Takeovers, holder)
		if s.LastError != "" {
			fmt.Fprintf(a.stdout, "  %-28s last error: %s\n", "", s.LastError)
		}
	}
}

func slotsJSON(slots []outbox.SlotStatus) []map[string]any {
	out := make([]map[string]any, len(slots))
	for i, s := range slots {
		out[i] = map[string]any{"transactional_id": s.TransactionalID, "holder": s.Owner, "lease_until": s.LeaseUntil,
			"open": s.Open, "commits": s.Commits, "aborts": s.Aborts, "takeovers": s.Takeovers, "last_error": s.LastError}
	}
	return out
}
