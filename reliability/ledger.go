package reliability

import (
	"encoding/json"
	"fmt"
	"sort"

	"gorm.io/gorm"
	"gorm.io/gorm/clause"

	"github.com/gorm-outbox/outbox/inbox"
)

// The inbox scenario's service B is a ledger: an inbox consumer that adds
// each of service A's events to the account of its key.

// Account is the ledger's row per key.
type Account struct {
	Key     string `gorm:"column:account;primaryKey;size:64"`
	Balance int64
	// Applied counts the events applied to the account. Each posting takes
	// the next value under the row's lock, so that it is the posting's
	// place in its key's apply order, whichever process applied it.
	Applied int64
}

// Posting is the ledger's row per applied event. Nothing makes it unique:
// an event applied twice shows as two postings.
type Posting struct {
	ID        int64  `gorm:"primaryKey"`
	MessageID string `gorm:"size:255;index"`
	Account   string `gorm:"size:64;index:idx_postings_order,priority:1"`
	ApplyNo   int64  `gorm:"index:idx_postings_order,priority:2"` // the account's Applied with this posting
	Version   int64  // the event's sequence within its key: A's commit order
	Amount    int64
}

// SetupLedger creates the ledger's tables, with an empty account per key.
func SetupLedger(db *gorm.DB, keys []string) error {
	if err := db.AutoMigrate(&Account{}, &Posting{}); err != nil {
		return err
	}
	accounts := make([]Account, len(keys))
	for i, k := range keys {
		accounts[i] = Account{Key: k}
	}
	return db.Create(&accounts).Error
}

// ApplyEvents is the ledger's inbox.BatchHandler: it locks the batch's
// accounts, adds each event's amount to its account in the batch's order,
// and writes a posting per event.
func ApplyEvents(tx *gorm.DB, ms []inbox.Message) error {
	events := make([]Event, len(ms))
	touched := map[string]bool{}
	var keys []string
	for i, m := range ms {
		if err := json.Unmarshal(m.Value, &events[i]); err != nil {
			return fmt.Errorf("message %s: %w", m.ID, err)
		}
		if k := events[i].Key; !touched[k] {
			touched[k] = true
			keys = append(keys, k)
		}
	}
	// One lock order for every transaction: two that lock the same
	// accounts wait for each other instead of deadlocking.
	sort.Strings(keys)
	var accounts []Account
	if err := tx.Clauses(clause.Locking{Strength: "UPDATE"}).Where("account IN ?", keys).Order("account").Find(&accounts).Error; err != nil {
		return err
	}
	byKey := make(map[string]*Account, len(accounts))
	for i := range accounts {
		byKey[accounts[i].Key] = &accounts[i]
	}
	postings := make([]Posting, len(ms))
	for i, e := range events {
		a := byKey[e.Key]
		if a == nil {
			return fmt.Errorf("message %s: no account %q", ms[i].ID, e.Key)
		}
		a.Balance += e.Amount
		a.Applied++
		postings[i] = Posting{MessageID: ms[i].ID, Account: e.Key, ApplyNo: a.Applied, Version: e.Version, Amount: e.Amount}
	}
	for _, a := range accounts {
		if err := tx.Model(&Account{}).Where("account = ?", a.Key).
			Updates(map[string]any{"balance": a.Balance, "applied": a.Applied}).Error; err != nil {
			return err
		}
	}
	return tx.CreateInBatches(postings, 500).Error
}
