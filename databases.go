package outbox

import (
	"fmt"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/internal/databases"
	"github.com/gorm-outbox/outbox/internal/sqlstore"
)

// databaseNamed returns the package of the database GORM's dialector
// calls name (internal/databases holds the table).
func databaseNamed(name string) (databases.Database, error) {
	d, err := databases.Named(name)
	if err != nil {
		return d, fmt.Errorf("outbox: %w", err)
	}
	return d, nil
}

// requireDatabase refuses a db that is not the database named want, for
// the constructor caller.
func requireDatabase(db *gorm.DB, want, caller string) error {
	if db == nil || db.Config == nil || db.Dialector == nil {
		return fmt.Errorf("outbox: %s needs an opened *gorm.DB, got nil", caller)
	}
	if name := db.Dialector.Name(); name != want {
		return fmt.Errorf("outbox: %s needs a %s database, got %q", caller, want, name)
	}
	return nil
}

func (c config) storeConfig() sqlstore.Config {
	return sqlstore.Config{Table: c.table, DeletePublished: c.deletePublished, AllowNoTx: c.allowNoTx}
}

// DDL returns the statements that create the outbox table and its indexes
// for a database ("postgres", "sqlite", or "mysql", which is also
// "mariadb"), for applications that own their migrations and register the
// plugin WithoutMigration. They are the same schema Plugin's migration
// creates.
//
// The pending index holds only pending rows, so finding work stays cheap
// however many published rows the table keeps; the published and dead
// indexes (one state index on MySQL) serve retention and monitoring. None
// holds the columns a claim writes (next_attempt_at, claim_token), so that
// on PostgreSQL the claim's stamp is a HOT update that touches no index,
// helped by the table's fillfactor, which leaves room on each page for it.
func DDL(dialectName, table string) ([]string, error) {
	d, err := databaseNamed(dialectName)
	if err != nil {
		return nil, err
	}
	if err := validateTableName(table); err != nil {
		return nil, err
	}
	return d.DDL(table), nil
}
