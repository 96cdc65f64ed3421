// Package inboxstore is the inbox table's engine: the SQL every database
// shares (recording a consumed message's identity, finding it again, the
// parked and held messages, retention, the admin reads and writes), written
// once. What differs between databases is a Dialect, which each database's
// package implements beside its outbox dialect.
package inboxstore

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"gorm.io/gorm"
)

// States of an inbox row.
const (
	// Applied: the handler's transaction committed with this row.
	Applied = "applied"
	// Parked: the handler failed on every attempt; the message waits for
	// a retry from the admin command.
	Parked = "parked"
	// Held: a later message of a parked message's key, recorded unapplied
	// so that the key's order is kept; it is applied after the parked one.
	Held = "held"
	// Retry: a parked message that the admin command asked to try again.
	Retry = "retry"
)

// Row is one consumed message as the inbox table records it.
type Row struct {
	ConsumerGroup string     `gorm:"column:consumer_group;primaryKey"`
	MessageID     string     `gorm:"column:message_id;primaryKey"`
	Topic         string     `gorm:"column:topic"`
	Partition     int32      `gorm:"column:kafka_partition"`
	Offset        int64      `gorm:"column:kafka_offset"`
	Key           []byte     `gorm:"column:message_key"`
	State         string     `gorm:"column:state"`
	Attempts      int        `gorm:"column:attempts"`
	LastError     string     `gorm:"column:last_error"`
	Payload       []byte     `gorm:"column:payload"`         // kept only while not applied
	Headers       string     `gorm:"column:headers"`         // JSON object; kept only while not applied
	Timestamp     *time.Time `gorm:"column:kafka_timestamp"` // the record's, if it has one
	ReceivedAt    time.Time  `gorm:"column:received_at"`
	ProcessedAt   time.Time  `gorm:"column:processed_at"` // applied, or parked, at
}

// Column is one column of the inbox table; each database's Schema gives
// its type.
type Column struct {
	Name       string
	Constraint string
}

// Columns are the inbox table's columns. None has a default: every write
// sets them all, and MySQL 8 refuses a literal default on a TEXT column.
var Columns = []Column{
	{"consumer_group", "NOT NULL"},
	{"message_id", "NOT NULL"},
	{"topic", "NOT NULL"},
	{"kafka_partition", "NOT NULL"},
	{"kafka_offset", "NOT NULL"},
	{"message_key", ""},
	{"state", "NOT NULL"},
	{"attempts", "NOT NULL"},
	{"last_error", "NOT NULL"},
	{"payload", ""},
	{"headers", ""},
	{"kafka_timestamp", ""},
	{"received_at", "NOT NULL"},
	{"processed_at", "NOT NULL"},
}

// Schema is the inbox table as one database spells it.
type Schema struct {
	Quote   byte              // identifier quote
	Types   map[string]string // by column name
	Indexes []Index
	// InlineIndexes: the indexes are declared in CREATE TABLE.
	InlineIndexes bool
	// IndexInTableSchema: an index of a schema-qualified table is named in
	// the table's schema, and the table after ON is not qualified (SQLite).
	IndexInTableSchema bool
}

// Index is one of the table's indexes on one database. An applied
// message's record is written once and read only by a redelivery, through
// the primary key, so a database that can leave applied rows out of an
// index (a partial index) should.
type Index struct {
	Suffix  string // the name's end (IndexName)
	Using   string // access method, if not the default
	Columns string // comma-separated, unquoted
	Where   string // partial index's condition, if any
}

// Unapplied is the condition that finds the messages not yet applied,
// written out in the statements that read them, so that a partial index
// with the same condition serves them.
const Unapplied = "state <> 'applied'"

// LongestIndexSuffix is the longest Suffix of any database's indexes.
const LongestIndexSuffix = "unapplied"

func (sc Schema) quote(s string) string {
	q := string(sc.Quote)
	parts := strings.Split(s, ".")
	for i, p := range parts {
		parts[i] = q + p + q
	}
	return strings.Join(parts, ".")
}

// IndexName is the name of one of the inbox table's indexes.
func IndexName(table, suffix string) string {
	return "idx_" + strings.ReplaceAll(table, ".", "_") + "_" + suffix
}

// DDL returns the statements that create the table and its indexes.
func (sc Schema) DDL(table string) []string {
	var cols []string
	for _, c := range Columns {
		cols = append(cols, strings.TrimSpace(sc.quote(c.Name)+" "+sc.Types[c.Name]+" "+c.Constraint))
	}
	cols = append(cols, "PRIMARY KEY ("+sc.quote("consumer_group")+", "+sc.quote("message_id")+")")
	var indexes []string
	for _, ix := range sc.Indexes {
		var ic []string
		for _, c := range strings.Split(ix.Columns, ", ") {
			ic = append(ic, sc.quote(c))
		}
		name, on := sc.quote(IndexName(table, ix.Suffix)), sc.quote(table)
		if sc.InlineIndexes {
			cols = append(cols, "INDEX "+name+" ("+strings.Join(ic, ", ")+")")
			continue
		}
		if schema, bare, ok := strings.Cut(table, "."); ok && sc.IndexInTableSchema {
			name, on = sc.quote(schema+"."+IndexName(table, ix.Suffix)), sc.quote(bare)
		}
		q := "CREATE INDEX IF NOT EXISTS " + name + " ON " + on
		if ix.Using != "" {
			q += " USING " + ix.Using
		}
		q += " (" + strings.Join(ic, ", ") + ")"
		if ix.Where != "" {
			q += " WHERE " + ix.Where
		}
		indexes = append(indexes, q)
	}
	create := "CREATE TABLE IF NOT EXISTS " + sc.quote(table) + " (\n  " + strings.Join(cols, ",\n  ") + "\n)"
	return append([]string{create}, indexes...)
}

// Dialect is one database's part of the inbox.
type Dialect interface {
	// Schema is the table as the database spells it.
	Schema() Schema
	// Migrate calls run, which creates the table, one process at a time.
	Migrate(ctx context.Context, db *gorm.DB, table string, run func(tx *gorm.DB) error) error
	// DeleteApplied is one retention batch: it deletes at most the
	// statement's last argument of the rows that match where.
	DeleteApplied(table, where string) string
	// OneWriter reports a database with one writer at a time (SQLite): the
	// inbox's transactions then take turns in the process instead of
	// failing as busy.
	OneWriter() bool
	// InsertReturning reports INSERT ... ON CONFLICT DO NOTHING RETURNING:
	// records are then written and duplicates found in one statement.
	InsertReturning() bool
}

// Store is the inbox table of one database.
type Store struct {
	db      *gorm.DB
	table   string
	dialect Dialect
	writer  *sync.Mutex // with a OneWriter dialect
}

// New returns the store of table on db.
func New(db *gorm.DB, table string, d Dialect) *Store {
	s := &Store{db: db, table: table, dialect: d}
	if d.OneWriter() {
		s.writer = new(sync.Mutex)
	}
	return s
}

// Table is the table's name.
func (s *Store) Table() string { return s.table }

// DDL returns the statements that create the table.
func (s *Store) DDL() []string { return s.dialect.Schema().DDL(s.table) }

// Migrate creates the table and its index if they do not exist.
func (s *Store) Migrate(ctx context.Context) error {
	run := func(tx *gorm.DB) error {
		for _, q := range s.DDL() {
			if err := tx.Exec(q).Error; err != nil {
				return err
			}
		}
		return nil
	}
	if err := s.dialect.Migrate(ctx, s.db.WithContext(ctx), s.table, run); err != nil {
		return fmt.Errorf("inbox: migrating table %s: %w", s.table, err)
	}
	return nil
}

// Transaction runs fn in a transaction on db, taking the process's turn
// first on a database with one writer.
func (s *Store) Transaction(ctx context.Context, db *gorm.DB, fn func(tx *gorm.DB) error) error {
	if s.writer != nil {
		s.writer.Lock()
		defer s.writer.Unlock()
	}
	return db.WithContext(ctx).Transaction(fn)
}

func (s *Store) from(tx *gorm.DB) *gorm.DB {
	return tx.Session(&gorm.Session{NewDB: true}).Table(s.table)
}

// Readable returns an error if the table cannot be read.
func (s *Store) Readable(ctx context.Context) error {
	var n []int
	return s.from(s.db.WithContext(ctx)).Select("1").Where("1 = 0").Scan(&n).Error
}

// Seen returns which of ids group has already recorded, in any state.
func (s *Store) Seen(tx *gorm.DB, group string, ids []string) (map[string]bool, error) {
	seen := map[string]bool{}
	if len(ids) == 0 {
		return seen, nil
	}
	var got []string
	if err := s.from(tx).Where("consumer_group = ? AND message_id IN ?", group, ids).Pluck("message_id", &got).Error; err != nil {
		return nil, fmt.Errorf("inbox: reading %s: %w", s.table, err)
	}
	for _, id := range got {
		seen[id] = true
	}
	return seen, nil
}

// Insert records rows; a row recorded before fails it.
func (s *Store) Insert(tx *gorm.DB, rows []*Row) error {
	_, err := s.Record(tx, rows, true)
	return err
}

// Record records the rows whose message their group has not recorded yet,
// and returns their ids; the others are redeliveries or duplicates. A
// message that another transaction is recording is waited for.
//
// Optimistic records them all with a plain INSERT, the cheapest write,
// which fails (and with it the transaction) if one was recorded before:
// the caller then tries again without it.
func (s *Store) Record(tx *gorm.DB, rows []*Row, optimistic bool) (map[string]bool, error) {
	recorded := make(map[string]bool, len(rows))
	if len(rows) == 0 {
		return recorded, nil
	}
	if optimistic {
		for start := 0; start < len(rows); start += recordChunk {
			if err := s.insert(tx, rows[start:min(start+recordChunk, len(rows))], false, recorded); err != nil {
				return nil, err
			}
		}
		for _, r := range rows {
			recorded[r.MessageID] = true
		}
		return recorded, nil
	}
	if !s.dialect.InsertReturning() {
		ids := make([]string, len(rows))
		for i, r := range rows {
			ids[i] = r.MessageID
		}
		seen, err := s.Seen(tx, rows[0].ConsumerGroup, ids)
		if err != nil {
			return nil, err
		}
		fresh := rows[:0:0]
		for _, r := range rows {
			if !seen[r.MessageID] {
				fresh = append(fresh, r)
				recorded[r.MessageID] = true
			}
		}
		for start := 0; start < len(fresh); start += recordChunk {
			if err := s.insert(tx, fresh[start:min(start+recordChunk, len(fresh))], false, recorded); err != nil {
				return nil, err
			}
		}
		return recorded, nil
	}
	for start := 0; start < len(rows); start += recordChunk {
		chunk := rows[start:min(start+recordChunk, len(rows))]
		if err := s.insert(tx, chunk, true, recorded); err != nil {
			return nil, err
		}
	}
	return recorded, nil
}

// recordChunk bounds one INSERT's rows: 15 arguments each, under
// PostgreSQL's 65,535 and SQLite's 32,766.
const recordChunk = 1000

// insert writes rows in one statement; with returning, skipping those
// recorded before and adding the ids it wrote to recorded.
func (s *Store) insert(tx *gorm.DB, rows []*Row, returning bool, recorded map[string]bool) error {
	sc := s.dialect.Schema()
	names := make([]string, len(Columns))
	for i, c := range Columns {
		names[i] = sc.quote(c.Name)
	}
	one := "(" + strings.TrimSuffix(strings.Repeat("?,", len(Columns)), ",") + ")"
	var b strings.Builder
	b.WriteString("INSERT INTO " + sc.quote(s.table) + " (" + strings.Join(names, ", ") + ") VALUES ")
	args := make([]any, 0, len(rows)*len(Columns))
	for i, r := range rows {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(one)
		var headers any
		if r.Headers != "" {
			headers = r.Headers
		}
		args = append(args, r.ConsumerGroup, r.MessageID, r.Topic, r.Partition, r.Offset, r.Key, r.State,
			r.Attempts, r.LastError, r.Payload, headers, r.Timestamp, r.ReceivedAt, r.ProcessedAt)
	}
	if !returning {
		if err := tx.Session(&gorm.Session{NewDB: true}).Exec(b.String(), args...).Error; err != nil {
			return fmt.Errorf("inbox: recording in %s: %w", s.table, err)
		}
		return nil
	}
	b.WriteString(" ON CONFLICT (" + sc.quote("consumer_group") + ", " + sc.quote("message_id") + ") DO NOTHING RETURNING " + sc.quote("message_id"))
	got, err := tx.Session(&gorm.Session{NewDB: true}).Raw(b.String(), args...).Rows()
	if err != nil {
		return fmt.Errorf("inbox: recording in %s: %w", s.table, err)
	}
	defer got.Close()
	for got.Next() {
		var id string
		if err := got.Scan(&id); err != nil {
			return fmt.Errorf("inbox: recording in %s: %w", s.table, err)
		}
		recorded[id] = true
	}
	if err := got.Err(); err != nil {
		return fmt.Errorf("inbox: recording in %s: %w", s.table, err)
	}
	return nil
}

// Update writes row's state, attempts, error and processing time, and its
// payload and headers (cleared once applied), if the row is still in state
// from; false if it is not (another consumer settled it first).
func (s *Store) Update(tx *gorm.DB, row *Row, from string) (bool, error) {
	payload, headers := row.Payload, any(row.Headers)
	if row.State == Applied {
		payload, headers = nil, nil
	}
	res := s.from(tx).Where("consumer_group = ? AND message_id = ? AND state = ?", row.ConsumerGroup, row.MessageID, from).
		Updates(map[string]any{"state": row.State, "attempts": row.Attempts, "last_error": row.LastError,
			"processed_at": row.ProcessedAt, "payload": payload, "headers": headers})
	if res.Error != nil {
		return false, fmt.Errorf("inbox: updating message %s in %s: %w", row.MessageID, s.table, res.Error)
	}
	return res.RowsAffected == 1, nil
}

// HeldKeys returns the keys of a partition that have a message not yet
// applied: the keys whose later messages wait behind it.
func (s *Store) HeldKeys(ctx context.Context, group, topic string, partition int32) ([][]byte, error) {
	var keys [][]byte
	err := s.from(s.db.WithContext(ctx)).Distinct("message_key").
		Where("consumer_group = ? AND topic = ? AND kafka_partition = ? AND "+Unapplied, group, topic, partition).
		Pluck("message_key", &keys).Error
	if err != nil {
		return nil, fmt.Errorf("inbox: reading the parked keys of %s: %w", s.table, err)
	}
	return keys, nil
}

// Waiting returns a partition's messages that are not applied, in offset
// order, if any of them is to be retried.
func (s *Store) Waiting(ctx context.Context, group, topic string, partition int32) ([]Row, error) {
	db := s.db.WithContext(ctx)
	var n int64
	if err := s.from(db).Where("consumer_group = ? AND topic = ? AND kafka_partition = ? AND "+Unapplied+" AND state = ?", group, topic, partition, Retry).
		Limit(1).Count(&n).Error; err != nil {
		return nil, fmt.Errorf("inbox: reading %s: %w", s.table, err)
	}
	if n == 0 {
		return nil, nil
	}
	var rows []Row
	if err := s.from(db).Where("consumer_group = ? AND topic = ? AND kafka_partition = ? AND "+Unapplied, group, topic, partition).
		Order("kafka_offset").Find(&rows).Error; err != nil {
		return nil, fmt.Errorf("inbox: reading %s: %w", s.table, err)
	}
	return rows, nil
}

// Cleanup deletes, in batches of at most batch rows, the applied rows of
// group processed before before, and returns how many it deleted.
func (s *Store) Cleanup(ctx context.Context, group string, before time.Time, batch int) (int64, error) {
	q := s.dialect.DeleteApplied(s.db.Statement.Quote(s.table), "consumer_group = ? AND state = ? AND processed_at < ?")
	var total int64
	for {
		if err := ctx.Err(); err != nil {
			return total, err
		}
		var res *gorm.DB
		err := s.Transaction(ctx, s.db, func(tx *gorm.DB) error {
			res = tx.Exec(q, group, Applied, before.UTC(), batch)
			return res.Error
		})
		if err != nil {
			return total, fmt.Errorf("inbox: deleting old rows of %s: %w", s.table, err)
		}
		total += res.RowsAffected
		if res.RowsAffected < int64(batch) {
			return total, nil
		}
	}
}

// ListOptions filters List.
type ListOptions struct {
	Group string // "" for every group
	State string // "" for every state
	Topic string // "" for every topic
	Limit int    // 100 when zero
}

// List returns rows in the order they were received.
func (s *Store) List(ctx context.Context, opts ListOptions) ([]Row, error) {
	q := s.from(s.db.WithContext(ctx))
	if opts.Group != "" {
		q = q.Where("consumer_group = ?", opts.Group)
	}
	if opts.State != "" {
		q = q.Where("state = ?", opts.State)
	}
	if opts.Topic != "" {
		q = q.Where("topic = ?", opts.Topic)
	}
	if opts.Limit <= 0 {
		opts.Limit = 100
	}
	var rows []Row
	if err := q.Order("received_at, topic, kafka_partition, kafka_offset").Limit(opts.Limit).Find(&rows).Error; err != nil {
		return nil, fmt.Errorf("inbox: listing %s: %w", s.table, err)
	}
	return rows, nil
}

// Count is the number of rows of one group in one state.
type Count struct {
	Group string `gorm:"column:consumer_group"`
	State string `gorm:"column:state"`
	Rows  int64  `gorm:"column:n"`
}

// Counts returns the number of rows of each group and state.
func (s *Store) Counts(ctx context.Context) ([]Count, error) {
	var out []Count
	err := s.from(s.db.WithContext(ctx)).Select("consumer_group, state, COUNT(*) AS n").
		Group("consumer_group, state").Order("consumer_group, state").Scan(&out).Error
	if err != nil {
		return nil, fmt.Errorf("inbox: counting %s: %w", s.table, err)
	}
	return out, nil
}

// Retry asks the consumers of group to apply its parked messages again:
// those named by ids, or every one when ids is empty. Their attempts start
// again from zero.
func (s *Store) Retry(ctx context.Context, group string, ids ...string) (int64, error) {
	q := s.from(s.db.WithContext(ctx)).Where("consumer_group = ? AND state = ?", group, Parked)
	if len(ids) > 0 {
		q = q.Where("message_id IN ?", ids)
	}
	res := q.Updates(map[string]any{"state": Retry, "attempts": 0})
	if res.Error != nil {
		return 0, fmt.Errorf("inbox: retrying parked messages of %s: %w", s.table, res.Error)
	}
	return res.RowsAffected, nil
}
