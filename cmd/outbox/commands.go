package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"sort"
	"strings"
	"text/tabwriter"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"

	"github.com/gorm-outbox/outbox"
)

var states = []outbox.State{outbox.StatePending, outbox.StatePublished, outbox.StateDead}

func cmdStatus(ctx context.Context, a *app, args []string) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "print JSON")
	budget := fs.Int("max-attempts", outbox.DefaultRetryPolicy.MaxAttempts, "the publisher's attempt budget")
	if err := parse(fs, args); err != nil {
		return err
	}
	st, err := a.store.Stats(ctx, *budget)
	if err != nil {
		return err
	}
	if *asJSON {
		out := map[string]any{
			"table":                      a.store.TableName(),
			"pending":                    st.Counts[outbox.StatePending],
			"published":                  st.Counts[outbox.StatePublished],
			"dead":                       st.Counts[outbox.StateDead],
			"oldest_pending_age_seconds": st.OldestPendingAge.Seconds(),
			"retrying":                   st.Retrying,
			"over_attempt_budget":        st.OverBudget,
			"expired_claims":             st.ExpiredClaims,
		}
		enc := json.NewEncoder(a.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	}
	fmt.Fprintf(a.stdout, "table %s\n", a.store.TableName())
	fmt.Fprintf(a.stdout, "  pending     %8d   oldest %s, %d retrying, %d expired claims\n",
		st.Counts[outbox.StatePending], st.OldestPendingAge.Round(time.Second), st.Retrying, st.ExpiredClaims)
	fmt.Fprintf(a.stdout, "  published   %8d\n", st.Counts[outbox.StatePublished])
	fmt.Fprintf(a.stdout, "  dead        %8d   %d over the attempt budget of %d\n", st.Counts[outbox.StateDead], st.OverBudget, *budget)
	return nil
}

func parseState(s string) (outbox.State, error) {
	if s == "" {
		return "", nil
	}
	for _, st := range states {
		if string(st) == s {
			return st, nil
		}
	}
	return "", errUsage{fmt.Sprintf("unknown state %q (pending, published or dead)", s)}
}

func cmdList(ctx context.Context, a *app, args []string) error {
	fs := flag.NewFlagSet("list", flag.ContinueOnError)
	state := fs.String("state", "", "pending, published or dead")
	topic := fs.String("topic", "", "only this topic")
	key := fs.String("key", "", "only this key")
	olderThan := fs.Duration("older-than", 0, "only messages created longer ago than this")
	newest := fs.Bool("newest", false, "newest first")
	limit := fs.Int("limit", 50, "messages per page")
	page := fs.Int("page", 1, "page number")
	payload := fs.Bool("payload", false, "show payloads")
	if err := parse(fs, args); err != nil {
		return err
	}
	st, err := parseState(*state)
	if err != nil {
		return err
	}
	if *limit <= 0 || *page <= 0 {
		return errUsage{"--limit and --page must be positive"}
	}
	opts := outbox.ListOptions{State: st, Topic: *topic, Key: *key, NewestFirst: *newest, Limit: *limit, Offset: (*page - 1) * *limit}
	if *olderThan > 0 {
		opts.CreatedBefore = time.Now().Add(-*olderThan)
	}
	msgs, err := a.store.List(ctx, opts)
	if err != nil {
		return err
	}
	w := tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
	header := "ID\tSTATE\tTOPIC\tKEY\tATTEMPTS\tCREATED\tLAST ERROR"
	if *payload {
		header += "\tPAYLOAD"
	}
	fmt.Fprintln(w, header)
	for _, m := range msgs {
		line := fmt.Sprintf("%s\t%s\t%s\t%s\t%d\t%s\t%s", m.ID, m.State, m.Topic, m.Key, m.Attempts,
			m.CreatedAt.UTC().Format(time.RFC3339), shorten(m.LastError, 60))
		if *payload {
			line += "\t" + shorten(printable(m.Payload), 80)
		}
		fmt.Fprintln(w, line)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	if len(msgs) == *limit {
		fmt.Fprintf(a.stderr, "(page %d; --page %d for more)\n", *page, *page+1)
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

func cmdShow(ctx context.Context, a *app, args []string) error {
	fs := flag.NewFlagSet("show", flag.ContinueOnError)
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return errUsage{"give one message id"}
	}
	ids, err := parseIDs(fs.Args())
	if err != nil {
		return err
	}
	m, err := a.store.Get(ctx, ids[0])
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

func cmdRequeue(ctx context.Context, a *app, args []string) error {
	fs := flag.NewFlagSet("requeue", flag.ContinueOnError)
	dead := fs.Bool("dead", false, "requeue every dead message")
	topic := fs.String("topic", "", "with --dead: only this topic")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *dead {
		if fs.NArg() > 0 {
			return errUsage{"give ids or --dead, not both"}
		}
		n, err := a.store.RequeueDead(ctx, *topic)
		if err != nil {
			return err
		}
		fmt.Fprintf(a.stdout, "requeued %d dead messages\n", n)
		return nil
	}
	if *topic != "" {
		return errUsage{"--topic goes with --dead"}
	}
	if fs.NArg() == 0 {
		return errUsage{"give message ids, or --dead"}
	}
	ids, err := parseIDs(fs.Args())
	if err != nil {
		return err
	}
	var problems []string
	var requeue []uuid.UUID
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
			requeue = append(requeue, id)
		}
	}
	n, err := a.store.Requeue(ctx, requeue...)
	if err != nil {
		return err
	}
	fmt.Fprintf(a.stdout, "requeued %d messages\n", n)
	if len(problems) > 0 {
		return fmt.Errorf("outbox: %s", strings.Join(problems, "; "))
	}
	return nil
}

func cmdPurge(ctx context.Context, a *app, args []string) error {
	fs := flag.NewFlagSet("purge", flag.ContinueOnError)
	published := fs.Bool("published", false, "delete published messages (required: pending ones are never purged)")
	olderThan := fs.Duration("older-than", 0, "only those published longer ago than this, e.g. 720h")
	yes := fs.Bool("yes", false, "do not ask for confirmation")
	if err := parse(fs, args); err != nil {
		return err
	}
	if !*published {
		return errUsage{"say what to purge: --published"}
	}
	if *olderThan <= 0 {
		return errUsage{"give --older-than, e.g. --older-than 720h"}
	}
	n, err := a.store.CountOlder(ctx, outbox.StatePublished, *olderThan)
	if err != nil {
		return err
	}
	if n == 0 {
		fmt.Fprintln(a.stdout, "nothing to purge")
		return nil
	}
	if !*yes && !a.confirm(fmt.Sprintf("Delete %d published messages older than %s from %s?", n, *olderThan, a.store.TableName())) {
		return errors.New("outbox: purge cancelled, nothing deleted")
	}
	deleted, err := a.store.Cleanup(ctx, outbox.RetentionPolicy{Published: *olderThan}, func(total int64) {
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

func cmdWatch(ctx context.Context, a *app, args []string) error {
	fs := flag.NewFlagSet("watch", flag.ContinueOnError)
	interval := fs.Duration("interval", time.Second, "refresh interval")
	times := fs.Int("n", 0, "stop after this many refreshes (0: until interrupted)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *interval <= 0 {
		return errUsage{"--interval must be positive"}
	}
	var prev outbox.Stats
	var prevAt time.Time
	for i := 0; *times == 0 || i < *times; i++ {
		if i > 0 {
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(*interval):
			}
		}
		st, err := a.store.Stats(ctx, 0)
		if err != nil {
			if ctx.Err() != nil {
				return nil
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
