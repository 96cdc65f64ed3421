package outbox_test

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"maps"
	"math"
	"regexp"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/glebarez/sqlite"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// fuzzMaxPayload is small, so that the fuzzer reaches the payload limit.
const fuzzMaxPayload = 64

// errRollback ends a fuzzed transaction: nothing it wrote is kept.
var errRollback = errors.New("rollback")

// Payload kinds of FuzzMessage, chosen by the low bits of its kind byte.
const (
	payloadBytes = iota
	payloadString
	payloadNil
	payloadJSON  // a map the JSON encoder encodes
	payloadFloat // a float64 from the payload's bits: NaN and ±Inf cannot be encoded
	payloadKinds
)

// fuzzMessage builds the message a fuzz input stands for; withHeader (bit 3
// of kind) gives it one header, so that a nil map is tried too.
func fuzzMessage(topic, key string, payload []byte, kind uint8, hk, hv string) outbox.Message {
	m := outbox.Message{Topic: topic, Key: key}
	switch int(kind&7) % payloadKinds {
	case payloadBytes:
		m.Payload = payload
	case payloadString:
		m.Payload = string(payload)
	case payloadNil:
		m.Payload = nil
	case payloadJSON:
		m.Payload = map[string]string{"v": string(payload)}
	case payloadFloat:
		var b [8]byte
		copy(b[:], payload)
		m.Payload = math.Float64frombits(binary.LittleEndian.Uint64(b[:]))
	}
	if kind&8 != 0 {
		m.Headers = map[string]string{hk: hv}
	}
	return m
}

// kafkaTopic is Kafka's rule for topic names, written apart from the
// library's so that the two check each other.
var kafkaTopic = regexp.MustCompile(`^[a-zA-Z0-9._-]{1,249}$`)

// wantProblems are the phrases that name what is wrong with m (none when
// it must be accepted), and the payload it must be stored with.
func wantProblems(m outbox.Message) (problems []string, payload []byte) {
	switch {
	case m.Topic == "":
		problems = append(problems, "topic is empty")
	case len(m.Topic) > 249:
		problems = append(problems, "Kafka allows at most 249")
	case m.Topic == "." || m.Topic == "..":
		problems = append(problems, "is not allowed by Kafka")
	case !kafkaTopic.MatchString(m.Topic):
		problems = append(problems, "Kafka allows only [a-zA-Z0-9._-]")
	}
	if len(m.Key) > 255 {
		problems = append(problems, "at most 255")
	} else if !utf8.ValidString(m.Key) || strings.ContainsRune(m.Key, 0) {
		problems = append(problems, "not valid UTF-8 text without NUL")
	}
	for k, v := range m.Headers {
		if k == "" {
			problems = append(problems, "header with an empty key")
		}
		if !utf8.ValidString(k) || !utf8.ValidString(v) {
			problems = append(problems, "is not valid UTF-8")
		}
	}
	switch p := m.Payload.(type) {
	case nil:
		problems = append(problems, "payload is nil")
	case []byte:
		payload = append([]byte{}, p...)
	case string:
		payload = []byte(p)
	default:
		b, err := json.Marshal(p)
		if err != nil {
			problems = append(problems, "cannot encode payload")
		}
		payload = b
	}
	if len(payload) > fuzzMaxPayload {
		problems = append(problems, "over the maximum of 64")
	}
	return problems, payload
}

// FuzzMessage: Enqueue never panics; a message is refused exactly when it
// breaks a rule, with an error naming the problem, and an accepted one is
// stored as it was given.
func FuzzMessage(f *testing.F) {
	db := outboxtest.SQLite(f, nil)
	if err := db.Use(outbox.Plugin(outbox.WithMaxPayloadBytes(fuzzMaxPayload))); err != nil {
		f.Fatal(err)
	}
	f.Add("orders", "order-1", []byte(`{"id":1}`), uint8(payloadBytes|8), "type", "order.placed")
	f.Add("a-Z_0.9", "", []byte{}, uint8(payloadString), "", "")
	f.Add("t", "k", []byte{0, 1, 2, 255}, uint8(payloadBytes), "", "")
	f.Add("t", "ключ", []byte("héllo"), uint8(payloadJSON|8), "trace-id", "☃")
	f.Add("t", "k", []byte{0, 0, 0, 0, 0, 0, 0xf8, 0x7f}, uint8(payloadFloat), "", "") // NaN
	f.Add("t", "k", []byte{1, 2, 3, 4, 5, 6, 7, 8}, uint8(payloadFloat), "", "")
	f.Add("t", "k", []byte(nil), uint8(payloadNil), "", "")
	f.Add("", "k", []byte("x"), uint8(payloadString), "", "")
	f.Add("..", "k", []byte("x"), uint8(payloadString), "", "")
	f.Add("orders created", "k", []byte("x"), uint8(payloadString), "", "")
	f.Add("commandé", "k", []byte("x"), uint8(payloadString), "", "")
	f.Add(strings.Repeat("t", 250), "k", []byte("x"), uint8(payloadString), "", "")
	f.Add("t", strings.Repeat("k", 256), []byte("x"), uint8(payloadString), "", "")
	f.Add("t", "k", []byte("x"), uint8(payloadString|8), "", "empty key")
	f.Add("t", "k", bytes.Repeat([]byte("x"), fuzzMaxPayload+1), uint8(payloadBytes), "", "")
	f.Add("t", "k\x00\xff", []byte("x"), uint8(payloadString|8), "h\xff", "v\x00\xfe")
	f.Fuzz(func(t *testing.T, topic, key string, payload []byte, kind uint8, hk, hv string) {
		m := fuzzMessage(topic, key, payload, kind, hk, hv)
		problems, want := wantProblems(m)
		var enqErr, readErr error
		var stored []outbox.OutboxMessage
		_ = db.Transaction(func(tx *gorm.DB) error {
			if enqErr = outbox.Enqueue(tx, m); enqErr == nil {
				readErr = tx.Table(outbox.DefaultTableName).Find(&stored).Error
			}
			return errRollback
		})
		if readErr != nil {
			t.Fatalf("reading back %+v: %v", m, readErr)
		}
		if enqErr != nil {
			if len(problems) == 0 {
				t.Fatalf("%+v refused: %v", m, enqErr)
			}
			named := false
			for _, p := range problems {
				named = named || strings.Contains(enqErr.Error(), p)
			}
			if !strings.HasPrefix(enqErr.Error(), "outbox: ") || !named {
				t.Fatalf("%+v refused with %q, which names none of %q", m, enqErr, problems)
			}
			return
		}
		if len(problems) > 0 {
			t.Fatalf("%+v accepted, although: %q", m, problems)
		}
		if len(stored) != 1 {
			t.Fatalf("%d rows stored, want 1", len(stored))
		}
		s := stored[0]
		if s.Topic != m.Topic || s.Key != m.Key || !bytes.Equal(s.Payload, want) || s.State != outbox.StatePending {
			t.Fatalf("stored topic %q key %q payload %q state %q; given topic %q key %q payload %q",
				s.Topic, s.Key, s.Payload, s.State, m.Topic, m.Key, want)
		}
		if len(s.Headers) != len(m.Headers) || !maps.Equal(map[string]string(s.Headers), m.Headers) {
			t.Fatalf("stored headers %q, given %q", s.Headers, m.Headers)
		}
	})
}

// FuzzHeadersScan: Scan never panics and reads a []byte as it reads the same
// string; what it reads is written back by Value and read again unchanged.
func FuzzHeadersScan(f *testing.F) {
	for _, s := range []string{`{}`, `{"type":"order.placed","trace":"x"}`, `{"a":"\u0000\ud800"}`, `null`, ``, `[]`,
		`{"a":1}`, `{"a":"b"} x`, `{"a":"b","a":"c"}`, "{\"\xff\":\"\xfe\"}", `"string"`, `{"":""}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, src []byte) {
		var fromBytes, fromString outbox.Headers
		errBytes := fromBytes.Scan(src)
		errString := fromString.Scan(string(src))
		if (errBytes == nil) != (errString == nil) || !maps.Equal(fromBytes, fromString) {
			t.Fatalf("Scan(%q): []byte gives %q, %v; string gives %q, %v", src, fromBytes, errBytes, fromString, errString)
		}
		if errBytes != nil {
			if !strings.Contains(errBytes.Error(), "outbox: headers column is not a JSON object of strings") {
				t.Fatalf("Scan(%q) = %v, which does not say what is wrong", src, errBytes)
			}
			return
		}
		v, err := fromBytes.Value()
		if err != nil {
			t.Fatalf("Value of scanned %q: %v", fromBytes, err)
		}
		var again outbox.Headers
		if err := again.Scan(v); err != nil || !maps.Equal(again, fromBytes) {
			t.Fatalf("%q scanned as %q, written as %q, scanned again as %q (%v)", src, fromBytes, v, again, err)
		}
	})
}

// FuzzHeadersValue: what Value writes, Scan reads back unchanged, or Value
// refuses it.
func FuzzHeadersValue(f *testing.F) {
	f.Add("type", "order.placed", "trace", "x", true)
	f.Add("", "", "", "", false)
	f.Add("ключ", "☃\n\t\"\\", "<>&", "\u2028", true)
	f.Add("k\x00", "v\x00", "\x7f", "\U0010FFFF", true)
	f.Add("k", "\xff", "\xc0\xaf", "\xed\xa0\x80", true)
	f.Fuzz(func(t *testing.T, k1, v1, k2, v2 string, two bool) {
		h := outbox.Headers{k1: v1}
		if two {
			h[k2] = v2
		}
		v, err := h.Value()
		if err != nil {
			if !strings.HasPrefix(err.Error(), "outbox: ") {
				t.Fatalf("Value of %q refused with %q, which does not say what is wrong", h, err)
			}
			return
		}
		var back outbox.Headers
		if err := back.Scan(v); err != nil || !maps.Equal(back, h) {
			t.Fatalf("%q written as %q, scanned back as %q (%v)", h, v, back, err)
		}
	})
}

// plainIdentifier is what a table name may be, written apart from the
// library's rule: letters, digits and _, not starting with a digit, at most
// 63 characters (PostgreSQL's limit), optionally schema-qualified.
func plainIdentifier(name string) bool {
	parts := strings.Split(name, ".")
	if len(parts) > 2 || len("idx_"+name+"_published") > 63 {
		return false
	}
	for _, p := range parts {
		if p == "" || len(p) > 63 || p[0] >= '0' && p[0] <= '9' {
			return false
		}
		for _, r := range p {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_') {
				return false
			}
		}
	}
	return true
}

// FuzzTableName: DDL and WithTableName never panic, accept exactly the plain
// identifiers, and for those DDL gives statements about that table (on
// SQLite, statements that run).
func FuzzTableName(f *testing.F) {
	db := outboxtest.SQLite(f, nil)
	conn, err := db.DB()
	if err != nil {
		f.Fatal(err)
	}
	for _, s := range []string{outbox.DefaultTableName, "events.outbox", "_", "Outbox2", "a.b.c", "", "1table", "t;drop table x",
		"t t", `t"`, "t`", "тable", strings.Repeat("t", 63), strings.Repeat("t", 64), "a.", ".a", "select", "t\n", "t\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		want := plainIdentifier(name)
		for _, d := range []string{"postgres", "sqlite", "mysql", "mariadb"} {
			stmts, err := outbox.DDL(d, name)
			if (err == nil) != want {
				t.Fatalf("DDL(%q, %q) = %v; a plain identifier: %v", d, name, err, want)
			}
			if err != nil {
				if !strings.Contains(err.Error(), "table name") {
					t.Fatalf("DDL(%q, %q) refused with %q, which does not name the table", d, name, err)
				}
				continue
			}
			quote := `"`
			if d == "mysql" || d == "mariadb" {
				quote = "`"
			}
			quoted := quote + strings.ReplaceAll(name, ".", quote+"."+quote) + quote
			if len(stmts) == 0 || !strings.HasPrefix(stmts[0], "CREATE TABLE IF NOT EXISTS "+quoted+" (") {
				t.Fatalf("DDL(%q, %q) = %q", d, name, stmts)
			}
			for _, s := range stmts[1:] {
				if !strings.HasPrefix(s, "CREATE INDEX IF NOT EXISTS ") || !strings.Contains(s, " ON "+quoted+" (") {
					t.Fatalf("DDL(%q, %q) has %q", d, name, s)
				}
			}
		}
		// The option is checked when the plugin is registered.
		fresh, err := gorm.Open(&sqlite.Dialector{Conn: conn}, &gorm.Config{Logger: db.Logger})
		if err != nil {
			t.Fatal(err)
		}
		err = fresh.Use(outbox.Plugin(outbox.WithTableName(name), outbox.WithoutMigration()))
		if (err == nil) != want {
			t.Fatalf("WithTableName(%q): %v; a plain identifier: %v", name, err, want)
		}
		// SQLite reserves names starting with sqlite_, and its other schemas
		// are attached databases: neither is the DDL's to answer for.
		if !want || strings.Contains(name, ".") || strings.HasPrefix(strings.ToLower(name), "sqlite_") {
			return
		}
		stmts, _ := outbox.DDL("sqlite", name)
		_ = db.Transaction(func(tx *gorm.DB) error {
			for _, s := range stmts {
				if err := tx.Exec(s).Error; err != nil {
					t.Errorf("DDL(sqlite, %q): %q: %v", name, s, err)
					break
				}
			}
			return errRollback
		})
	})
}

// Headers are JSON text: bytes that are not UTF-8 would come back as U+FFFD,
// so they are refused when the message is enqueued, on every backend, and
// by Headers.Value for rows saved by other paths.
func TestHeadersThatAreNotUTF8AreRefused(t *testing.T) {
	cases := []map[string]string{
		{"type": "\xff"},
		{"\x83": "v"},
		{"k": "ok", "surrogate": "\xed\xa0\x80"},
	}
	for _, h := range cases {
		if v, err := outbox.Headers(h).Value(); err == nil || !strings.Contains(err.Error(), "is not valid UTF-8") {
			t.Errorf("Headers(%q).Value() = %q, %v; want it refused", h, v, err)
		}
	}
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		for _, h := range cases {
			err := db.Transaction(func(tx *gorm.DB) error {
				return outbox.Enqueue(tx, outbox.Message{Topic: "t", Payload: "x", Headers: h})
			})
			if err == nil || !strings.HasPrefix(err.Error(), "outbox: message for topic \"t\" has header") || !strings.Contains(err.Error(), "not valid UTF-8") {
				t.Errorf("Enqueue with headers %q: %v; want it refused", h, err)
			}
		}
		// Any UTF-8 is kept as it was given, NUL and escapes included.
		given := map[string]string{"ключ": "☃\x00\n\"\\<>&\u2028😀", "empty": ""}
		if err := db.Transaction(func(tx *gorm.DB) error {
			return outbox.Enqueue(tx, outbox.Message{Topic: "t", Payload: "x", Headers: given})
		}); err != nil {
			t.Fatal(err)
		}
		msgs := messages(t, db)
		if len(msgs) != 1 || !maps.Equal(map[string]string(msgs[0].Headers), given) {
			t.Fatalf("stored %+v, want one message with headers %q", msgs, given)
		}
	})
}

// A key that is not UTF-8 text, or holds a NUL, is refused on every
// database alike: left to the databases, PostgreSQL would abort the caller's
// transaction, MariaDB would alter the key and SQLite would keep it.
func TestKeysThatAreNotTextAreRefused(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		for _, key := range []string{"\xff", "a\x00b", "\xed\xa0\x80"} {
			err := db.Transaction(func(tx *gorm.DB) error {
				return outbox.Enqueue(tx, outbox.Message{Topic: "t", Key: key, Payload: "x"})
			})
			if err == nil || !strings.Contains(err.Error(), "not valid UTF-8 text without NUL") {
				t.Errorf("Enqueue with key %q: %v; want it refused", key, err)
			}
		}
		if n := len(messages(t, db)); n != 0 {
			t.Fatalf("%d messages stored, want none", n)
		}
		key := "ключ☃😀"
		if err := db.Transaction(func(tx *gorm.DB) error {
			return outbox.Enqueue(tx, outbox.Message{Topic: "t", Key: key, Payload: "x"})
		}); err != nil {
			t.Fatal(err)
		}
		if msgs := messages(t, db); len(msgs) != 1 || msgs[0].Key != key {
			t.Fatalf("stored %+v, want one message with key %q", msgs, key)
		}
	})
}

// A table name whose index names PostgreSQL would cut to 63 bytes is
// refused: two of them cut to the same name would leave an index out.
func TestTableNamesWhoseIndexNamesDoNotFitAreRefused(t *testing.T) {
	fits := strings.Repeat("t", 49)
	if _, err := outbox.DDL("postgres", fits); err != nil {
		t.Fatalf("DDL for a %d-character name: %v", len(fits), err)
	}
	for _, name := range []string{fits + "t", "s." + strings.Repeat("t", 48)} {
		if _, err := outbox.DDL("postgres", name); err == nil || !strings.Contains(err.Error(), "fit in 63") {
			t.Errorf("DDL(%q) = %v, want it refused", name, err)
		}
	}
	db := outboxtest.Postgres(t, nil)
	if err := db.Use(outbox.Plugin(outbox.WithTableName(fits))); err != nil {
		t.Fatal(err)
	}
	var n int64
	if err := db.Raw("SELECT count(*) FROM pg_indexes WHERE tablename = ? AND schemaname = current_schema()", fits).Scan(&n).Error; err != nil {
		t.Fatal(err)
	}
	if n != 5 { // the primary key, pending, published, dead, tx_group
		t.Fatalf("the table has %d indexes, want 5", n)
	}
}
