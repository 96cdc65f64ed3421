package main

import (
	"context"
	"flag"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/gorm-outbox/outbox/internal/inboxstore"
)

// inboxStates are the inbox's states, in the order status shows them.
var inboxStates = []string{inboxstore.Applied, inboxstore.Parked, inboxstore.Held, inboxstore.Retry}

// cmdInbox runs the inbox's subcommands: list and retry.
func cmdInbox(args []string) (action, error) {
	if len(args) == 0 {
		return nil, errUsage{"give an inbox command: list or retry"}
	}
	switch args[0] {
	case "list":
		return cmdInboxList(args[1:])
	case "retry":
		return cmdInboxRetry(args[1:])
	case "-h", "-help", "--help":
		return nil, flag.ErrHelp
	}
	return nil, errUsage{fmt.Sprintf("unknown inbox command %q: give list or retry", args[0])}
}

func cmdInboxList(args []string) (action, error) {
	fs := flag.NewFlagSet("inbox list", flag.ContinueOnError)
	group := stringFlag(fs, "group", "", "a consumer group")
	state := inboxStateFlag(fs, "state")
	topic := stringFlag(fs, "topic", "", "a topic name")
	limit := intFlag(fs, "limit", 50, 1)
	payload := boolFlag(fs, "payload")
	if err := parse(fs, args); err != nil {
		return nil, err
	}
	if err := noArgs(fs); err != nil {
		return nil, err
	}
	opts := inboxstore.ListOptions{Group: *group, State: *state, Topic: *topic, Limit: *limit}
	return func(ctx context.Context, a *app) error { return inboxList(ctx, a, opts, *payload) }, nil
}

func inboxList(ctx context.Context, a *app, opts inboxstore.ListOptions, payload bool) error {
	rows, err := a.inbox.List(ctx, opts)
	if err != nil {
		return err
	}
	w := tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
	header := "ID\tGROUP\tSTATE\tTOPIC\tPARTITION\tOFFSET\tKEY\tATTEMPTS\tRECEIVED\tLAST ERROR"
	if payload {
		header += "\tPAYLOAD" // kept only until the message is applied
	}
	fmt.Fprintln(w, header)
	for _, r := range rows {
		line := fmt.Sprintf("%s\t%s\t%s\t%s\t%d\t%d\t%s\t%d\t%s\t%s", r.MessageID, r.ConsumerGroup, r.State, r.Topic,
			r.Partition, r.Offset, shorten(printable(r.Key), 40), r.Attempts, r.ReceivedAt.UTC().Format(time.RFC3339),
			shorten(r.LastError, 60))
		if payload {
			line += "\t" + shorten(printable(r.Payload), 80)
		}
		fmt.Fprintln(w, line)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	if len(rows) == opts.Limit {
		fmt.Fprintf(a.stderr, "(the first %d; --limit for more)\n", opts.Limit)
	}
	return nil
}

func cmdInboxRetry(args []string) (action, error) {
	fs := flag.NewFlagSet("inbox retry", flag.ContinueOnError)
	group := stringFlag(fs, "group", "", "a consumer group")
	parked := boolFlag(fs, "parked")
	if err := parse(fs, args); err != nil {
		return nil, err
	}
	// A message id is the group's own: the same id in two groups is two
	// messages, so the group is never implied.
	if !isSet(fs, "group") {
		return nil, errUsage{"give --group, the consumer group whose messages to retry"}
	}
	if *parked {
		if fs.NArg() > 0 {
			return nil, errUsage{"give ids or --parked, not both"}
		}
		return func(ctx context.Context, a *app) error {
			n, err := a.inbox.Retry(ctx, *group)
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "retrying %d parked messages of group %s\n", n, *group)
			return nil
		}, nil
	}
	if fs.NArg() == 0 {
		return nil, errUsage{"give message ids, or --parked"}
	}
	seen := map[string]bool{}
	var ids []string
	for _, id := range fs.Args() {
		if id == "" {
			return nil, errUsage{`"" is not a message id`}
		}
		// An id given twice is one message to retry, and one line of the report.
		if !seen[id] {
			seen[id] = true
			ids = append(ids, id)
		}
	}
	return func(ctx context.Context, a *app) error { return inboxRetry(ctx, a, *group, ids) }, nil
}

// inboxRetry retries the parked messages among ids, one at a time, so that
// the report names each id it could not retry.
func inboxRetry(ctx context.Context, a *app, group string, ids []string) error {
	var problems []string
	var retried int64
	for _, id := range ids {
		n, err := a.inbox.Retry(ctx, group, id)
		if err != nil {
			return err
		}
		if n > 0 {
			retried += n
			continue
		}
		known, err := a.inbox.Seen(a.db.WithContext(ctx), group, []string{id})
		if err != nil {
			return err
		}
		if known[id] {
			problems = append(problems, fmt.Sprintf("%s is not parked", id))
		} else {
			problems = append(problems, fmt.Sprintf("no message %s in group %s", id, group))
		}
	}
	fmt.Fprintf(a.stdout, "retrying %d parked messages of group %s\n", retried, group)
	if len(problems) > 0 {
		return fmt.Errorf("outbox: %s", strings.Join(problems, "; "))
	}
	return nil
}

// inboxGroups is counts by consumer group and state, every state present.
func inboxGroups(counts []inboxstore.Count) map[string]map[string]int64 {
	groups := map[string]map[string]int64{}
	for _, c := range counts {
		g := groups[c.Group]
		if g == nil {
			g = map[string]int64{}
			for _, s := range inboxStates {
				g[s] = 0
			}
			groups[c.Group] = g
		}
		g[c.State] = c.Rows
	}
	return groups
}

// inboxStatus prints the inbox's counts, a line per consumer group.
func inboxStatus(a *app, counts []inboxstore.Count) {
	fmt.Fprintf(a.stdout, "inbox table %s\n", a.inbox.Table())
	if len(counts) == 0 {
		fmt.Fprintln(a.stdout, "  no messages")
		return
	}
	groups := inboxGroups(counts)
	var names []string
	width := len("group")
	for _, c := range counts { // in group order
		if len(names) == 0 || names[len(names)-1] != c.Group {
			names = append(names, c.Group)
			width = max(width, len(c.Group))
		}
	}
	fmt.Fprintf(a.stdout, "  %-*s", width, "group")
	for _, s := range inboxStates {
		fmt.Fprintf(a.stdout, " %8s", s)
	}
	fmt.Fprintln(a.stdout)
	for _, name := range names {
		fmt.Fprintf(a.stdout, "  %-*s", width, name)
		for _, s := range inboxStates {
			fmt.Fprintf(a.stdout, " %8d", groups[name][s])
		}
		fmt.Fprintln(a.stdout)
	}
}
