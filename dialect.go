package outbox

import (
	"fmt"

	"gorm.io/gorm"
)

// dialect holds what differs between databases. Adding a database means
// adding one value here (and its DDL), not touching the store's logic.
type dialect struct {
	name string
	// skipLocked is appended to the claim's inner SELECT so that concurrent
	// publishers skip each other's rows instead of waiting on them. SQLite
	// has one writer at a time and needs none.
	skipLocked string
	// claimLock, run first in the claim's transaction, serializes claims
	// (see GormStore.Claim). Empty where the database serializes writers.
	claimLock string
	// cleanupLock, run first in each cleanup batch's transaction, returns
	// false when another process is cleaning the same table.
	cleanupLock string
}

var dialects = map[string]dialect{
	"postgres": {name: "postgres", skipLocked: " FOR UPDATE SKIP LOCKED", claimLock: "SELECT pg_advisory_xact_lock(?)",
		cleanupLock: "SELECT pg_try_advisory_xact_lock(?)"},
	"sqlite": {name: "sqlite"},
}

func dialectOf(db *gorm.DB) (dialect, error) {
	name := db.Dialector.Name()
	d, ok := dialects[name]
	if !ok {
		return dialect{}, fmt.Errorf("outbox: database %q is not supported (supported: postgres, sqlite)", name)
	}
	return d, nil
}
