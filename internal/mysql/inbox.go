package mysql

import (
	"context"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/internal/inboxstore"
)

// binaryText compares ids byte by byte: under the server's usual
// case-insensitive collation, topics "Orders" and "orders" would give two
// messages one id, and under a PAD SPACE one (utf8mb4_bin), so would ids
// differing in trailing spaces.
const binaryText = "varbinary(255)"

// Inbox is the inbox table's dialect on MySQL and MariaDB.
var Inbox inboxstore.Dialect = inboxDialect{}

type inboxDialect struct{}

func (inboxDialect) Schema() inboxstore.Schema {
	return inboxstore.Schema{Quote: '`', InlineIndexes: true, Types: map[string]string{
		"consumer_group": binaryText, "message_id": binaryText, "topic": "varchar(249)",
		"kafka_partition": "int", "kafka_offset": "bigint", "message_key": "longblob", "state": "varchar(16)",
		"attempts": "int", "last_error": "text", "payload": "longblob", "headers": "longtext",
		"kafka_timestamp": "datetime(6)", "received_at": "datetime(6)", "processed_at": "datetime(6)"},
		// No partial indexes: one index serves retention and the messages
		// not applied.
		Indexes: []inboxstore.Index{{Suffix: "state", Columns: "consumer_group, state, processed_at"}}}
}

// Migrate needs no lock: the one statement, with its index inline, either
// creates the table whole or finds it.
func (inboxDialect) Migrate(_ context.Context, db *gorm.DB, _ string, run func(tx *gorm.DB) error) error {
	return run(db)
}

func (inboxDialect) DeleteApplied(table, where string) string {
	return "DELETE FROM " + table + " WHERE " + where + " LIMIT ?"
}

func (inboxDialect) OneWriter() bool { return false }

// InsertReturning: MySQL has neither ON CONFLICT nor RETURNING; the
// lookup before the INSERT goes by primary key.
func (inboxDialect) InsertReturning() bool { return false }
