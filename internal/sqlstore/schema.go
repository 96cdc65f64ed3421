package sqlstore

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"fmt"
	"strings"
	"time"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/internal/core"
)

// Column is one column of the outbox table; each database's Schema gives
// its type. Together they must say what the GORM tags of OutboxMessage make
// AutoMigrate create (a test holds the two together).
type Column struct {
	Name       string
	Constraint string
}

// Columns are the table's columns, in the order the store reads them.
var Columns = []Column{
	{"id", "NOT NULL PRIMARY KEY"},
	{"topic", "NOT NULL"},
	{"message_key", "NOT NULL DEFAULT ''"},
	{"payload", "NOT NULL"},
	{"headers", "NOT NULL DEFAULT '{}'"},
	{"state", "NOT NULL DEFAULT 'pending'"},
	{"attempts", "NOT NULL DEFAULT 0"},
	{"last_error", "NOT NULL DEFAULT ''"},
	{"next_attempt_at", "NOT NULL"},
	{"claim_token", ""},
	{"created_at", "NOT NULL"},
	{"published_at", ""},
	{"tx_group", ""},
}

// Index is one of the table's indexes on one database.
type Index struct {
	Suffix  string // the name's end (IndexName)
	Columns string // comma-separated, unquoted
	Where   string // partial index's condition, if any
}

// Schema is the outbox table as one database spells it.
type Schema struct {
	Quote   byte              // identifier quote
	Types   map[string]string // by column name
	Indexes []Index
	// InlineIndexes: indexes are declared in CREATE TABLE (a database
	// without CREATE INDEX IF NOT EXISTS).
	InlineIndexes bool
	// TableOptions follow CREATE TABLE's column list.
	TableOptions string
}

// IndexName is the name of one of the table's indexes.
func IndexName(table, suffix string) string {
	return "idx_" + strings.ReplaceAll(table, ".", "_") + "_" + suffix
}

func (sc Schema) quote(s string) string {
	q := string(sc.Quote)
	parts := strings.Split(s, ".")
	for i, p := range parts {
		parts[i] = q + p + q
	}
	return strings.Join(parts, ".")
}

// DDL returns the statements that create the table and its indexes.
func (sc Schema) DDL(table string) []string {
	var cols []string
	for _, c := range Columns {
		cols = append(cols, strings.TrimSpace(sc.quote(c.Name)+" "+sc.Types[c.Name]+" "+c.Constraint))
	}
	var indexes []string
	for _, i := range sc.IndexStatements(table) {
		if sc.InlineIndexes {
			cols = append(cols, "INDEX "+sc.quote(i.Name)+" ("+i.Columns+")")
			continue
		}
		indexes = append(indexes, strings.Replace(i.Create, "CREATE INDEX", "CREATE INDEX IF NOT EXISTS", 1))
	}
	create := "CREATE TABLE IF NOT EXISTS " + sc.quote(table) + " (\n  " + strings.Join(cols, ",\n  ") + "\n)" + sc.TableOptions
	return append([]string{create}, indexes...)
}

// TableIndex is one index of a table, as created.
type TableIndex struct {
	Name    string
	Columns string // quoted, comma-separated
	Create  string // CREATE INDEX statement
}

// IndexStatements are the CREATE INDEX statements of table.
func (sc Schema) IndexStatements(table string) []TableIndex {
	var out []TableIndex
	for _, i := range sc.Indexes {
		out = append(out, sc.IndexStatement(table, i))
	}
	return out
}

// IndexStatement is the CREATE INDEX statement of i on table.
func (sc Schema) IndexStatement(table string, i Index) TableIndex {
	var cs []string
	for _, c := range strings.Split(i.Columns, ", ") {
		cs = append(cs, sc.quote(c))
	}
	ti := TableIndex{Name: IndexName(table, i.Suffix), Columns: strings.Join(cs, ", ")}
	ti.Create = "CREATE INDEX " + sc.quote(ti.Name) + " ON " + sc.quote(table) + " (" + ti.Columns + ")"
	if i.Where != "" {
		ti.Create += " WHERE " + i.Where
	}
	return ti
}

// MigrateTable creates table on db with GORM's AutoMigrate, runs
// afterCreate if it created it, and creates the indexes it lacks. It is
// the migration the database packages run once they hold their turn.
func (sc Schema) MigrateTable(db *gorm.DB, table, afterCreate string) error {
	created := !db.Migrator().HasTable(table)
	if err := db.Table(table).AutoMigrate(&core.OutboxMessage{}); err != nil {
		return fmt.Errorf("outbox: migrating table %s: %w", table, err)
	}
	if created && afterCreate != "" {
		if err := db.Exec(afterCreate).Error; err != nil {
			return fmt.Errorf("outbox: migrating table %s: %w", table, err)
		}
	}
	for _, i := range sc.IndexStatements(table) {
		if db.Migrator().HasIndex(table, i.Name) {
			continue
		}
		if err := db.Exec(i.Create).Error; err != nil {
			return fmt.Errorf("outbox: creating index %s on %s: %w", i.Name, table, err)
		}
	}
	return nil
}

// migrationLockWait bounds the wait for another process's migration of the
// table: one that takes longer is stuck, and an error says so where a
// silent wait would hang the deployment.
const migrationLockWait = 60 * time.Second

// MigrationWait is how long a migration waits for another process's: a
// minute, or until ctx's deadline.
func MigrationWait(ctx context.Context) time.Duration {
	wait := migrationLockWait
	if d, ok := ctx.Deadline(); ok {
		wait = min(wait, time.Until(d))
	}
	return max(wait, time.Millisecond)
}

// MigrationLockError says that the wait for another migration ended.
func MigrationLockError(table string, wait time.Duration, err error) error {
	return fmt.Errorf("outbox: migrating table %s: waited up to %v for another process to finish migrating it: %w",
		table, wait.Round(time.Millisecond), err)
}

// DiscardConn closes conn's connection instead of handing it back to the
// pool, with whatever lock or transaction it still has.
func DiscardConn(conn *gorm.DB) {
	var c *sql.Conn
	switch pool := conn.Statement.ConnPool.(type) {
	case *sql.Conn:
		c = pool
	case interface{ Connection() *sql.Conn }:
		c = pool.Connection()
	default:
		return
	}
	_ = c.Raw(func(any) error { return driver.ErrBadConn })
}
