package outbox

import (
	"fmt"
	"strings"
)

// column is one column of the outbox table as each dialect spells it; it
// must say what the GORM tags of OutboxMessage make AutoMigrate create
// (TestDDLMatchesMigration holds the two together).
type column struct {
	name       string
	types      map[string]string
	constraint string
}

var outboxColumns = []column{
	{"id", map[string]string{"postgres": "uuid", "sqlite": "uuid", "mysql": "uuid"}, "NOT NULL PRIMARY KEY"},
	{"topic", map[string]string{"postgres": "varchar(249)", "sqlite": "text", "mysql": "varchar(249)"}, "NOT NULL"},
	{"message_key", map[string]string{"postgres": "varchar(255)", "sqlite": "text", "mysql": "varchar(255)"}, "NOT NULL DEFAULT ''"},
	{"payload", map[string]string{"postgres": "bytea", "sqlite": "blob", "mysql": "longblob"}, "NOT NULL"},
	{"headers", map[string]string{"postgres": "text", "sqlite": "text", "mysql": "text"}, "NOT NULL DEFAULT '{}'"},
	{"state", map[string]string{"postgres": "varchar(16)", "sqlite": "text", "mysql": "varchar(16)"}, "NOT NULL DEFAULT 'pending'"},
	{"attempts", map[string]string{"postgres": "bigint", "sqlite": "integer", "mysql": "bigint"}, "NOT NULL DEFAULT 0"},
	{"last_error", map[string]string{"postgres": "text", "sqlite": "text", "mysql": "text"}, "NOT NULL DEFAULT ''"},
	{"next_attempt_at", map[string]string{"postgres": "timestamptz", "sqlite": "datetime", "mysql": "datetime(3)"}, "NOT NULL"},
	{"claim_token", map[string]string{"postgres": "varchar(36)", "sqlite": "text", "mysql": "varchar(36)"}, ""},
	{"created_at", map[string]string{"postgres": "timestamptz", "sqlite": "datetime", "mysql": "datetime(3)"}, "NOT NULL"},
	{"published_at", map[string]string{"postgres": "timestamptz", "sqlite": "datetime", "mysql": "datetime(3)"}, ""},
}

// outboxIndexes are the table's indexes. Where the database has partial
// indexes, the pending index holds only pending rows and only their id:
// that is what makes PostgreSQL's planner prefer it to the primary key for
// the claim's ORDER BY id even while its statistics still say that every
// row is pending. The published and dead indexes serve retention and
// monitoring; being partial, they take no entry when a message is
// enqueued, so an enqueue writes two indexes, not three. MySQL and MariaDB
// have no partial indexes: there the state, first, narrows the same way,
// the key, last, lets a walk that skips busy keys test them in the index
// (index condition pushdown) instead of reading each row, and one
// (state, created_at) index serves retention.
var outboxIndexes = []struct {
	suffix  string
	columns map[string]string // by dialect; "" where the index does not exist
	where   string            // where partial indexes exist
}{
	{"pending", map[string]string{"postgres": "id", "sqlite": "id", "mysql": "state, id, message_key"}, "state = 'pending'"},
	{"published", map[string]string{"postgres": "published_at", "sqlite": "published_at"}, "state = 'published'"},
	{"dead", map[string]string{"postgres": "created_at", "sqlite": "created_at"}, "state = 'dead'"},
	{"state", map[string]string{"mysql": "state, created_at"}, ""},
}

// fillfactor leaves room on each PostgreSQL page for a claim's stamp
// (Store.Claim) and a retry's, so that it is written beside the row (a HOT
// update) instead of on another page with a new entry in every index. The
// publisher's held claims stamp nothing, but with pages filled to 100 their
// drains write more WAL a message and are no faster.
const fillfactor = 50

// indexName is the name of one of the table's indexes.
func indexName(table, suffix string) string {
	return "idx_" + strings.ReplaceAll(table, ".", "_") + "_" + suffix
}

// DDL returns the statements that create the outbox table and its indexes
// for a dialect ("postgres", "sqlite" or "mysql", which is also MariaDB's),
// for applications that own their
// migrations and register the plugin WithoutMigration. They are the same
// schema Plugin's migration creates.
//
// The pending index holds only pending rows, so finding work stays cheap
// however many published rows the table keeps; the published and dead
// indexes (one state index on MySQL) serve retention and monitoring. None
// holds the columns a claim writes (next_attempt_at, claim_token), so that
// on PostgreSQL the claim's stamp is a HOT update that touches no index,
// helped by the table's fillfactor, which leaves room on each page for it.
func DDL(dialectName, table string) ([]string, error) {
	if dialectName == "mariadb" {
		dialectName = "mysql"
	}
	if _, ok := dialects[dialectName]; !ok {
		return nil, fmt.Errorf("outbox: database %q is not supported (supported: postgres, sqlite, mysql)", dialectName)
	}
	if err := validateTableName(table); err != nil {
		return nil, err
	}
	quote := `"`
	if dialectName == "mysql" {
		quote = "`"
	}
	q := func(s string) string {
		parts := strings.Split(s, ".")
		for i, p := range parts {
			parts[i] = quote + p + quote
		}
		return strings.Join(parts, ".")
	}
	var cols []string
	for _, c := range outboxColumns {
		cols = append(cols, strings.TrimSpace(q(c.name)+" "+c.types[dialectName]+" "+c.constraint))
	}
	var indexes []string
	for _, i := range tableIndexes(dialectName, table, q) {
		if dialectName == "mysql" { // no CREATE INDEX IF NOT EXISTS in MySQL
			cols = append(cols, "INDEX "+q(i.name)+" ("+i.columns+")")
			continue
		}
		indexes = append(indexes, strings.Replace(i.create, "CREATE INDEX", "CREATE INDEX IF NOT EXISTS", 1))
	}
	create := "CREATE TABLE IF NOT EXISTS " + q(table) + " (\n  " + strings.Join(cols, ",\n  ") + "\n)"
	if dialectName == "postgres" {
		create += fmt.Sprintf(" WITH (fillfactor = %d)", fillfactor)
	}
	return append([]string{create}, indexes...), nil
}

type tableIndex struct {
	name    string
	columns string // quoted, comma-separated
	create  string // CREATE INDEX statement
}

// tableIndexes are the CREATE INDEX statements of a table, for DDL and for
// the plugin's migration; quote quotes an identifier for the dialect.
func tableIndexes(dialectName, table string, quote func(string) string) []tableIndex {
	var out []tableIndex
	for _, i := range outboxIndexes {
		if i.columns[dialectName] == "" {
			continue
		}
		var cs []string
		for _, c := range strings.Split(i.columns[dialectName], ", ") {
			cs = append(cs, quote(c))
		}
		ti := tableIndex{name: indexName(table, i.suffix), columns: strings.Join(cs, ", ")}
		ti.create = "CREATE INDEX " + quote(ti.name) + " ON " + quote(table) + " (" + ti.columns + ")"
		if i.where != "" && dialectName != "mysql" {
			ti.create += " WHERE " + i.where
		}
		out = append(out, ti)
	}
	return out
}
