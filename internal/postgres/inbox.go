package postgres

import (
	"context"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/internal/inboxstore"
)

// Inbox is the inbox table's dialect on PostgreSQL.
var Inbox inboxstore.Dialect = inboxDialect{}

type inboxDialect struct{}

// Schema: ids compare byte by byte (COLLATE "C"), as on the other
// databases, and without the cost of a linguistic collation in the
// primary key that every record is written to.
func (inboxDialect) Schema() inboxstore.Schema {
	return inboxstore.Schema{Quote: '"', Types: map[string]string{
		"consumer_group": `varchar(255) COLLATE "C"`, "message_id": `varchar(255) COLLATE "C"`, "topic": "varchar(249)",
		"kafka_partition": "integer", "kafka_offset": "bigint", "message_key": "bytea", "state": "varchar(16)",
		"attempts": "integer", "last_error": "text", "payload": "bytea", "headers": "text",
		"kafka_timestamp": "timestamptz", "received_at": "timestamptz", "processed_at": "timestamptz"},
		Indexes: []inboxstore.Index{
			// The few messages not applied, for the consumers and the admin.
			{Suffix: "unapplied", Columns: "consumer_group, topic, kafka_partition", Where: inboxstore.Unapplied},
			// Retention's range of old records: a BRIN index is a few pages
			// whatever the table's size, and records arrive in time order.
			{Suffix: "processed", Using: "brin", Columns: "processed_at"},
		}}
}

// Migrate runs the DDL in one transaction behind an advisory lock: two
// processes' CREATE TABLE IF NOT EXISTS at once can otherwise both create
// the table's type, and one fails.
func (inboxDialect) Migrate(_ context.Context, db *gorm.DB, table string, run func(tx *gorm.DB) error) error {
	return db.Transaction(func(tx *gorm.DB) error {
		if err := tx.Exec("SELECT pg_advisory_xact_lock(?)", migrationKey("inbox:"+table)).Error; err != nil {
			return err
		}
		return run(tx)
	})
}

// DeleteApplied deletes by row address: the table's key has two columns.
func (inboxDialect) DeleteApplied(table, where string) string {
	return "DELETE FROM " + table + " WHERE ctid = ANY(ARRAY(SELECT ctid FROM " + table + " WHERE " + where + " LIMIT ?))"
}

func (inboxDialect) OneWriter() bool       { return false }
func (inboxDialect) InsertReturning() bool { return true }
