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

// outboxIndexes are the table's indexes: their columns, and the rows they
// hold where the database has partial indexes (MySQL and MariaDB do not:
// there the state, first in each, narrows the same way).
var outboxIndexes = []struct{ suffix, columns, where string }{
	{"pending", "state, id", "state = 'pending'"},
	{"pending_due", "state, next_attempt_at", "state = 'pending'"},
	{"claimed_key", "state, claim_token, message_key", "state = 'pending' AND claim_token IS NOT NULL"},
	{"state", "state, created_at", ""},
}

// DDL returns the statements that create the outbox table and its indexes
// for a dialect ("postgres", "sqlite" or "mysql", which is also MariaDB's),
// for applications that own their
// migrations and register the plugin WithoutMigration. They are the same
// schema Plugin's migration creates.
//
// The indexes on pending rows hold only those, so finding work stays cheap
// however many published rows the table keeps: pending by id (the claim's
// order), pending by next attempt (the held rows, which make a key busy),
// and the keys with a message in flight. The state index serves listing,
// monitoring and retention.
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
	idx := func(suffix string) string { return q("idx_" + strings.ReplaceAll(table, ".", "_") + "_" + suffix) }
	var cols []string
	for _, c := range outboxColumns {
		cols = append(cols, strings.TrimSpace(q(c.name)+" "+c.types[dialectName]+" "+c.constraint))
	}
	var indexes []string
	for _, i := range outboxIndexes {
		var cs []string
		for _, c := range strings.Split(i.columns, ", ") {
			cs = append(cs, q(c))
		}
		if dialectName == "mysql" { // no partial indexes; and no CREATE INDEX IF NOT EXISTS in MySQL
			cols = append(cols, "INDEX "+idx(i.suffix)+" ("+strings.Join(cs, ",")+")")
			continue
		}
		stmt := "CREATE INDEX IF NOT EXISTS " + idx(i.suffix) + " ON " + q(table) + " (" + strings.Join(cs, ", ") + ")"
		if i.where != "" {
			stmt += " WHERE " + i.where
		}
		indexes = append(indexes, stmt)
	}
	return append([]string{"CREATE TABLE IF NOT EXISTS " + q(table) + " (\n  " + strings.Join(cols, ",\n  ") + "\n)"}, indexes...), nil
}
