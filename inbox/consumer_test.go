package inbox_test

import (
	"fmt"
	"strconv"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/inbox"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// Every message is applied once, per key in order; a message sent twice
// (the same outbox-message-id at two offsets) is skipped the second time.
func TestAppliesEachMessageOnceInKeyOrder(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		_, addrs := outboxtest.Kafka(t, 3, "orders")
		const keys, perKey = 10, 30
		var recs []record
		for i := range perKey {
			for k := range keys {
				id := fmt.Sprintf("id-%d-%d", k, i)
				recs = append(recs, record{key: fmt.Sprint("k", k), value: strconv.Itoa(i), id: id})
				if i%10 == 3 { // the publisher sent it twice
					recs = append(recs, record{key: fmt.Sprint("k", k), value: strconv.Itoa(i), id: id})
				}
			}
		}
		produce(t, addrs, "orders", recs...)
		var seen calls
		c, err := inbox.NewConsumer(db, addrs, group(t), []string{"orders"}, func(tx *gorm.DB, m inbox.Message) error {
			seen.add(m.ID)
			seq, _ := strconv.Atoi(string(m.Value))
			return tx.Create(&Applied{MessageID: m.ID, Key: string(m.Key), Seq: seq, Partition: m.Partition, Offset: m.Offset}).Error
		})
		if err != nil {
			t.Fatal(err)
		}
		run(t, c)
		waitFor(t, time.Minute, "every message applied", func() (bool, string) {
			n := countRows(t, db, "applieds", "")
			return n >= keys*perKey, fmt.Sprintf("%d applied", n)
		})
		time.Sleep(300 * time.Millisecond) // a duplicate applied late would show now
		var rows []Applied
		if err := db.Order("id").Find(&rows).Error; err != nil {
			t.Fatal(err)
		}
		if len(rows) != keys*perKey {
			t.Fatalf("%d rows applied, want %d", len(rows), keys*perKey)
		}
		last := map[string]int{}
		for _, r := range rows {
			if prev, ok := last[r.Key]; ok && r.Seq != prev+1 {
				t.Fatalf("key %s: seq %d applied after %d", r.Key, r.Seq, prev)
			}
			last[r.Key] = r.Seq
			if n := seen.get(r.MessageID); n != 1 {
				t.Errorf("message %s: handler called %d times", r.MessageID, n)
			}
		}
		if n := countRows(t, db, inbox.DefaultTableName, "state = ?", "applied"); n != keys*perKey {
			t.Errorf("inbox records %d applied messages, want %d", n, keys*perKey)
		}
	})
}
