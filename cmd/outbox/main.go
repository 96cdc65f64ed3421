// Command outbox inspects and repairs an outbox table without SQL.
//
//	go install github.com/gorm-outbox/outbox/cmd/outbox@latest
//	export OUTBOX_DSN='postgres://user:pass@host:5432/db'   # or a SQLite file path
//	outbox status
//	outbox list --state dead --topic orders
//	outbox show 0190a6f0-...
//	outbox requeue --dead --topic orders
//	outbox purge --published --older-than 720h
//	outbox watch
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
)

const usage = `usage: outbox [--dsn DSN] [--table NAME] COMMAND [flags]

The DSN comes from --dsn or OUTBOX_DSN: a postgres:// URL or "host=... dbname=..."
for PostgreSQL, "user:pass@tcp(host:3306)/db" (or mysql://...) for MariaDB and
MySQL, or a SQLite file path. The table comes from --table or OUTBOX_TABLE
(default outbox_messages). Global flags go before the command.

commands:
  status [--json] [--max-attempts N]    counts per state, oldest pending age, stuck messages
  list [--state S] [--topic T] [--key K] [--older-than D] [--newest] [--limit N] [--page P] [--payload]
                                        S: pending, published or dead; N, P: 1 or more
  show ID                               one message, with payload and headers
  requeue ID...                         make dead messages pending again
  requeue --dead [--topic T]            requeue every dead message (of a topic)
  purge --published --older-than D [--yes]
                                        delete published messages older than D (e.g. 720h;
                                        0s: everything published so far)
  watch [--interval D] [-n N]           live counts and rates, N times (0: until interrupted)

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
	store  *outbox.GormStore
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
	tty    bool
}

// action is a command whose arguments have been checked, ready to run.
type action func(context.Context, *app) error

var commands = map[string]func(args []string) (action, error){
	"status": cmdStatus, "list": cmdList, "show": cmdShow, "requeue": cmdRequeue, "purge": cmdPurge, "watch": cmdWatch,
}

// invocation is a checked command line: nothing in it is left to refuse.
type invocation struct {
	dsn, table string
	act        action // nil: print the usage
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
	inv := invocation{dsn: *dsn, table: *table, act: act}
	if inv.table == "" {
		inv.table = outbox.DefaultTableName
	}
	// DDL checks the name as the plugin does, without a database.
	if _, err := outbox.DDL("postgres", inv.table); err != nil {
		msg := strings.TrimPrefix(err.Error(), "outbox: ")
		if !isSet(global, "table") {
			msg += " (from OUTBOX_TABLE)"
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
	store, closeDB, err := open(ctx, inv.dsn, inv.table)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	defer closeDB()
	a := &app{store: store, stdin: stdin, stdout: stdout, stderr: stderr, tty: isTerminal(stdout)}
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

func open(ctx context.Context, dsn, table string) (*outbox.GormStore, func(), error) {
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
	if err := db.Use(outbox.Plugin(outbox.WithTableName(table), outbox.WithoutMigration())); err != nil {
		closeDB()
		return nil, nil, err
	}
	if !db.Migrator().HasTable(table) {
		closeDB()
		return nil, nil, fmt.Errorf("outbox: table %q does not exist in %s (wrong database, or --table?)", table, redact(dsn))
	}
	store, err := outbox.StoreOf(db)
	if err != nil {
		closeDB()
		return nil, nil, err
	}
	return store, closeDB, nil
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
		for _, g := range []string{"dsn", "table"} {
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
