package sqlite

import (
	"context"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/internal/inboxstore"
)

// Inbox is the inbox table's dialect on SQLite.
var Inbox inboxstore.Dialect = inboxDialect{}

type inboxDialect struct{}

func (inboxDialect) Schema() inboxstore.Schema {
	return inboxstore.Schema{Quote: '"', Types: map[string]string{
		"consumer_group": "text", "message_id": "text", "topic": "text",
		"kafka_partition": "integer", "kafka_offset": "integer", "message_key": "blob", "state": "text",
		"attempts": "integer", "last_error": "text", "payload": "blob", "headers": "text",
		"kafka_timestamp": "datetime", "received_at": "datetime", "processed_at": "datetime"},
		Indexes: []inboxstore.Index{
			{Suffix: "unapplied", Columns: "consumer_group, topic, kafka_partition", Where: inboxstore.Unapplied},
			{Suffix: "processed", Columns: "processed_at"},
		},
		IndexInTableSchema: true}
}

func (inboxDialect) Migrate(_ context.Context, db *gorm.DB, _ string, run func(tx *gorm.DB) error) error {
	return db.Transaction(run)
}

func (inboxDialect) DeleteApplied(table, where string) string {
	return "DELETE FROM " + table + " WHERE rowid IN (SELECT rowid FROM " + table + " WHERE " + where + " LIMIT ?)"
}

// OneWriter: SQLite has one writer, and a transaction that reads before it
// writes fails as busy, without waiting, when another wrote in between.
func (inboxDialect) OneWriter() bool { return true }

func (inboxDialect) InsertReturning() bool { return true }
