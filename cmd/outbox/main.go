// Command outbox inspects and repairs an outbox table, and an inbox table,
// without SQL.
//
//	go install github.com/gorm-outbox/outbox/cmd/outbox@latest
//	export OUTBOX_DSN='postgres://user:pass@host:5432/db'   # or a SQLite file path
//	outbox status
//	outbox list --state dead --topic orders
//	outbox show 0190a6f0-...
//	outbox requeue --dead --topic orders
//	outbox purge --published --older-than 720h
//	outbox watch
//	outbox inbox list --group billing --state parked
//	outbox inbox retry --group billing --parked
//
// Exit codes: 0 done, 1 failed (bad DSN, missing table, unknown id...), 2 wrong usage.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/signal"
	"regexp"
	"strings"

	"github.com/glebarez/sqlite"
	"gorm.io/driver/mysql"
	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/inbox"
	"github.com/gorm-outbox/outbox/internal/databases"
	"github.com/gorm-outbox/outbox/internal/inboxstore"
)

const usage = `usage: outbox [--dsn DSN] [--table NAME] [--inbox-table NAME] COMMAND [flags]

The DSN comes from --dsn or OUTBOX_DSN: a postgres:// URL or "host=... dbname=..."
for PostgreSQL, "user:pass@tcp(host:3306)/db" (or mysql://...) for MariaDB and
MySQL, or a SQLite file path. The table comes from --table or OUTBOX_TABLE
(default outbox_messages), the inbox's from --inbox-table or OUTBOX_INBOX_TABLE
(default inbox_messages). Global flags go before the command.

commands:
  status [--json] [--max-attempts N]    counts per state, oldest pending age, stuck messages;
                                        the inbox's counts per consumer group, if it has a table
  list [--state S] [--topic T] [--key K] [--older-than D] [--newest] [--limit N] [--page P] [--payload]
                                        S: pending, published or dead; N, P: 1 or more
  show ID                               one message, with payload and headers
  requeue ID...                         make dead messages pending again
  requeue --dead [--topic T]            requeue every dead message (of a topic)
  purge --published --older-than D [--yes]
                                        delete published messages older than D (e.g. 720h;
                                        0s: everything published so far)
  watch [--interval D] [-n N]           live counts and rates, N times (0: until interrupted)
  inbox list [--group G] [--state S] [--topic T] [--limit N] [--payload]
                                        the inbox's messages; S: applied, parked, held or retry
  inbox retry --group G ID...           have the group's consumers apply parked messages again
  inbox retry --group G --parked        retry every parked message of the group

D is a duration such as 720h, 90m or 30s.
`

// synopsis is each command's line of the usage, printed after a mistake in it.
var synopsis = map[string]string{
	"status":  "outbox status [--json] [--max-attempts N]",
	"list":    "outbox list [--state pending|published|dead] [--topic T] [--key K] [--older-than D] [--newest] [--limit N] [--page P] [--payload]",
	"show":    "outbox show ID",
	"requeue": "outbox requeue ID... | outbox requeue --dead [--topic T]",
	"purge":   "outbox purge --published --older-than D [--yes]",
	"watch":   "outbox watch [--interval D] [-n N]",
	"inbox": "outbox inbox list [--group G] [--state applied|parked|held|retry] [--topic T] [--limit N] [--payload]\n" +
		"       outbox inbox retry --group G ID... | outbox inbox retry --group G --parked",
}

// errUsage marks a mistake in the command line: exit code 2.
type errUsage struct{ msg string }

func (e errUsage) Error() string { return e.msg }

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

// app is what every command needs.
type app struct {
	db     *gorm.DB
	store  *outbox.GormStore // nil for the inbox's commands, and for status without an outbox table
	inbox  *inboxstore.Store // nil for the outbox's commands, and for status without an inbox table
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
	tty    bool
}

// action is a command whose arguments have been checked, ready to run.
type action func(context.Context, *app) error

var commands = map[string]func(args []string) (action, error){
	"status": cmdStatus, "list": cmdList, "show": cmdShow, "requeue": cmdRequeue, "purge": cmdPurge, "watch": cmdWatch,
	"inbox": cmdInbox,
}

// tables says which tables a command reads.
type tables int

const (
	outboxTable tables = iota // the outbox table, which must exist
	inboxTable                // the inbox table, which must exist
	eachTable                 // each that exists (status): an application may have only one
)

// tablesOf is each command's tables; the others read the outbox table.
var tablesOf = map[string]tables{"status": eachTable, "inbox": inboxTable}

// invocation is a checked command line: nothing in it is left to refuse.
type invocation struct {
	dsn, table, inboxTable string
	// A table named on the command line or in the environment is one the
	// user expects: its absence is a mistake, not an application without it.
	tableNamed, inboxTableNamed bool
	tables                      tables
	act                         action // nil: print the usage
}

// usageError is a mistake in the command line, reported with what is
// allowed: the command's synopsis, or the whole usage for a global mistake.
type usageError struct {
	command string // "" for a global mistake
	msg     string
}

func (e usageError) Error() string { return e.msg }

// parseArgs checks the whole command line before any database is opened,
// so that a mistake is reported as one whatever the DSN.
func parseArgs(args []string, getenv func(string) string) (invocation, error) {
	global := flag.NewFlagSet("outbox", flag.ContinueOnError)
	global.SetOutput(io.Discard)
	dsn := stringFlag(global, "dsn", getenv("OUTBOX_DSN"), "a DSN")
	table := stringFlag(global, "table", getenv("OUTBOX_TABLE"), "a table name")
	inboxName := stringFlag(global, "inbox-table", getenv("OUTBOX_INBOX_TABLE"), "a table name")
	if err := global.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return invocation{}, nil
		}
		return invocation{}, usageError{"", err.Error()}
	}
	if global.NArg() == 0 {
		return invocation{}, usageError{"", "give a command"}
	}
	name := global.Arg(0)
	if name == "help" {
		return invocation{}, nil
	}
	parseCmd, ok := commands[name]
	if !ok {
		return invocation{}, usageError{"", fmt.Sprintf("unknown command %q", name)}
	}
	act, err := parseCmd(global.Args()[1:])
	if errors.Is(err, flag.ErrHelp) {
		return invocation{}, nil
	}
	var u errUsage
	if errors.As(err, &u) {
		return invocation{}, usageError{name, u.msg}
	}
	if err != nil {
		return invocation{}, err
	}
	inv := invocation{dsn: *dsn, table: *table, inboxTable: *inboxName, tableNamed: *table != "",
		inboxTableNamed: *inboxName != "", tables: tablesOf[name], act: act}
	if inv.table == "" {
		inv.table = outbox.DefaultTableName
	}
	if inv.inboxTable == "" {
		inv.inboxTable = inbox.DefaultTableName
	}
	// DDL checks the name as the plugin does, without a database.
	if _, err := outbox.DDL("postgres", inv.table); err != nil {
		msg := strings.TrimPrefix(err.Error(), "outbox: ")
		if !isSet(global, "table") {
			msg += " (from OUTBOX_TABLE)"
		}
		return invocation{}, usageError{"", msg}
	}
	if _, err := inbox.DDL("postgres", inv.inboxTable); err != nil {
		msg := "inbox " + strings.TrimPrefix(err.Error(), "inbox: ")
		if !isSet(global, "inbox-table") {
			msg += " (from OUTBOX_INBOX_TABLE)"
		}
		return invocation{}, usageError{"", msg}
	}
	if inv.dsn == "" {
		return invocation{}, usageError{"", "no database: give --dsn or set OUTBOX_DSN"}
	}
	return inv, nil
}

func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	inv, err := parseArgs(args, os.Getenv)
	var u usageError
	switch {
	case errors.As(err, &u) && u.command != "":
		fmt.Fprintf(stderr, "outbox %s: %s\nusage: %s\n", u.command, u.msg, synopsis[u.command])
		return 2
	case errors.As(err, &u):
		fmt.Fprintf(stderr, "outbox: %s\n\n%s", u.msg, usage)
		return 2
	case err != nil:
		fmt.Fprintln(stderr, err)
		return 1
	case inv.act == nil:
		fmt.Fprint(stdout, usage)
		return 0
	}
	a, closeDB, err := open(ctx, inv)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	defer closeDB()
	a.stdin, a.stdout, a.stderr, a.tty = stdin, stdout, stderr, isTerminal(stdout)
	if err := inv.act(ctx, a); err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	return 0
}

func isMySQL(dsn string) bool {
	return strings.HasPrefix(dsn, "mysql://") || strings.Contains(dsn, "@tcp(") || strings.Contains(dsn, "@unix(")
}

// mysqlDSN makes a go-sql-driver DSN that reads DATETIME into time.Time.
func mysqlDSN(dsn string) string {
	dsn = strings.TrimPrefix(dsn, "mysql://")
	if strings.Contains(dsn, "parseTime=") {
		return dsn
	}
	if strings.Contains(dsn, "?") {
		return dsn + "&parseTime=true"
	}
	return dsn + "?parseTime=true"
}

func isPostgres(dsn string) bool {
	return strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") ||
		strings.Contains(dsn, "host=") || strings.Contains(dsn, "dbname=")
}

var (
	passwordField = regexp.MustCompile(`(?i)(password=)(\S+)`)
	mysqlUserPass = regexp.MustCompile(`^((?:mysql://)?[^:@/]*:)([^@]*)(@)`)
)

// redact hides a DSN's password, so that no error or log line shows it.
func redact(dsn string) string {
	if isMySQL(dsn) {
		return mysqlUserPass.ReplaceAllString(dsn, "${1}xxxxx${3}")
	}
	if u, err := url.Parse(dsn); err == nil && u.User != nil {
		return u.Redacted()
	}
	return passwordField.ReplaceAllString(dsn, "${1}xxxxx")
}

// open opens the database and the tables of inv's command.
func open(ctx context.Context, inv invocation) (*app, func(), error) {
	dsn := inv.dsn
	var dialector gorm.Dialector
	switch {
	case isMySQL(dsn):
		dialector = mysql.Open(mysqlDSN(dsn))
	case isPostgres(dsn):
		dialector = postgres.Open(dsn)
	default:
		path := strings.TrimPrefix(strings.SplitN(dsn, "?", 2)[0], "file:")
		if _, err := os.Stat(path); err != nil {
			return nil, nil, fmt.Errorf("outbox: no SQLite database at %s (a PostgreSQL DSN starts with postgres:// or has host=)", path)
		}
		dialector = sqlite.Open(dsn)
	}
	db, err := gorm.Open(dialector, &gorm.Config{Logger: logger.Discard, DisableAutomaticPing: true})
	if err != nil {
		return nil, nil, fmt.Errorf("outbox: cannot open %s: %v", redact(dsn), scrub(err, dsn))
	}
	closeDB := func() {
		if sqlDB, err := db.DB(); err == nil {
			_ = sqlDB.Close()
		}
	}
	sqlDB, _ := db.DB()
	if err := sqlDB.PingContext(ctx); err != nil {
		closeDB()
		return nil, nil, fmt.Errorf("outbox: cannot connect to %s: %v", redact(dsn), scrub(err, dsn))
	}
	a, err := openTables(db, inv)
	if err != nil {
		closeDB()
		return nil, nil, err
	}
	return a, closeDB, nil
}

// openTables finds the tables inv's command reads. A table it needs must
// exist; status reports each that does, and fails only when it finds
// neither or a table named on the command line is missing.
func openTables(db *gorm.DB, inv invocation) (*app, error) {
	hasOutbox := inv.tables != inboxTable && db.Migrator().HasTable(inv.table)
	hasInbox := inv.tables != outboxTable && db.Migrator().HasTable(inv.inboxTable)
	switch {
	case !hasOutbox && (inv.tables == outboxTable || inv.tables == eachTable && (inv.tableNamed || !hasInbox)):
		return nil, fmt.Errorf("outbox: table %q does not exist in %s (wrong database, or --table?)", inv.table, redact(inv.dsn))
	case !hasInbox && (inv.tables == inboxTable || inv.tables == eachTable && inv.inboxTableNamed):
		return nil, fmt.Errorf("outbox: inbox table %q does not exist in %s (wrong database, or --inbox-table?)", inv.inboxTable, redact(inv.dsn))
	}
	a := &app{db: db}
	if hasOutbox {
		if err := db.Use(outbox.Plugin(outbox.WithTableName(inv.table), outbox.WithoutMigration())); err != nil {
			return nil, err
		}
		store, err := outbox.StoreOf(db)
		if err != nil {
			return nil, err
		}
		a.store = store
	}
	if hasInbox {
		d, err := databases.Named(db.Dialector.Name())
		if err != nil {
			return nil, fmt.Errorf("outbox: %w", err)
		}
		a.inbox = inboxstore.New(db, inv.inboxTable, d.Inbox)
	}
	return a, nil
}

// scrub removes the password from a driver's error, in case it quotes the DSN.
func scrub(err error, dsn string) string {
	msg := err.Error()
	if m := mysqlUserPass.FindStringSubmatch(dsn); m != nil && m[2] != "" {
		msg = strings.ReplaceAll(msg, m[2], "xxxxx")
	} else if u, perr := url.Parse(dsn); perr == nil && u.User != nil {
		if p, ok := u.User.Password(); ok && p != "" {
			msg = strings.ReplaceAll(msg, p, "xxxxx")
		}
	}
	for _, m := range passwordField.FindAllStringSubmatch(dsn, -1) {
		msg = strings.ReplaceAll(msg, m[2], "xxxxx")
	}
	return msg
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// confirm asks a yes/no question on the terminal; anything but y or yes is no.
func (a *app) confirm(question string) bool {
	fmt.Fprintf(a.stderr, "%s [y/N] ", question)
	line, _ := bufio.NewReader(a.stdin).ReadString('\n')
	answer := strings.ToLower(strings.TrimSpace(line))
	return answer == "y" || answer == "yes"
}

// parse parses a command's flags; a mistake is a usage error. A global
// flag after the command gets a hint, since that is the likely slip.
func parse(fs *flag.FlagSet, args []string) error {
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		msg := err.Error()
		for _, g := range []string{"dsn", "table", "inbox-table"} {
			if strings.HasSuffix(msg, "not defined: -"+g) {
				msg += " (--" + g + " goes before the command)"
			}
		}
		return errUsage{msg}
	}
	return nil
}

// noArgs refuses arguments left after the flags, which would otherwise be
// ignored (and with them any flags that follow: flag parsing stops at the
// first argument).
func noArgs(fs *flag.FlagSet) error {
	if fs.NArg() > 0 {
		return errUsage{fmt.Sprintf("unexpected argument %q: %s takes only flags", fs.Arg(0), fs.Name())}
	}
	return nil
}
