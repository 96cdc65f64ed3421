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
	{"id", map[string]string{"postgres": "uuid", "sqlite": "uuid"}, "NOT NULL PRIMARY KEY"},
	{"topic", map[string]string{"postgres": "varchar(249)", "sqlite": "text"}, "NOT NULL"},
	{"message_key", map[string]string{"postgres": "text", "sqlite": "text"}, "NOT NULL DEFAULT ''"},
	{"payload", map[string]string{"postgres": "bytea", "sqlite": "blob"}, "NOT NULL"},
	{"headers", map[string]string{"postgres": "text", "sqlite": "text"}, "NOT NULL DEFAULT '{}'"},
	{"state", map[string]string{"postgres": "varchar(16)", "sqlite": "text"}, "NOT NULL DEFAULT 'pending'"},
	{"attempts", map[string]string{"postgres": "bigint", "sqlite": "integer"}, "NOT NULL DEFAULT 0"},
	{"last_error", map[string]string{"postgres": "text", "sqlite": "text"}, "NOT NULL DEFAULT ''"},
	{"next_attempt_at", map[string]string{"postgres": "timestamptz", "sqlite": "datetime"}, "NOT NULL"},
	{"claim_token", map[string]string{"postgres": "varchar(36)", "sqlite": "text"}, ""},
	{"created_at", map[string]string{"postgres": "timestamptz", "sqlite": "datetime"}, "NOT NULL"},
	{"published_at", map[string]string{"postgres": "timestamptz", "sqlite": "datetime"}, ""},
}

// DDL returns the statements that create the outbox table and its indexes
// for a dialect ("postgres" or "sqlite"), for applications that own their
// migrations and register the plugin WithoutMigration. They are the same
// schema Plugin's migration creates.
//
// The indexes on pending rows hold only those, so finding work stays cheap
// however many published rows the table keeps: pending by id (the claim's
// order), pending by next attempt (the held rows, which make a key busy),
// and the keys with a message in flight. The state index serves listing,
// monitoring and retention.
func DDL(dialectName, table string) ([]string, error) {
	if _, ok := dialects[dialectName]; !ok {
		return nil, fmt.Errorf("outbox: database %q is not supported (supported: postgres, sqlite)", dialectName)
	}
	if err := validateTableName(table); err != nil {
		return nil, err
	}
	q := func(s string) string {
		parts := strings.Split(s, ".")
		for i, p := range parts {
			parts[i] = `"` + p + `"`
		}
		return strings.Join(parts, ".")
	}
	idx := func(suffix string) string { return q("idx_" + strings.ReplaceAll(table, ".", "_") + "_" + suffix) }
	var cols []string
	for _, c := range outboxColumns {
		cols = append(cols, strings.TrimSpace("  "+q(c.name)+" "+c.types[dialectName]+" "+c.constraint))
	}
	return []string{
		"CREATE TABLE IF NOT EXISTS " + q(table) + " (\n  " + strings.Join(cols, ",\n  ") + "\n)",
		"CREATE INDEX IF NOT EXISTS " + idx("pending") + " ON " + q(table) + " (" + q("id") + ") WHERE state = 'pending'",
		"CREATE INDEX IF NOT EXISTS " + idx("pending_due") + " ON " + q(table) + " (" + q("next_attempt_at") + ") WHERE state = 'pending'",
		"CREATE INDEX IF NOT EXISTS " + idx("claimed_key") + " ON " + q(table) + " (" + q("message_key") + ") WHERE state = 'pending' AND claim_token IS NOT NULL",
		"CREATE INDEX IF NOT EXISTS " + idx("state") + " ON " + q(table) + " (" + q("state") + ", " + q("created_at") + ")",
	}, nil
}
