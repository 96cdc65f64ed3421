// Package databases is the one place that knows databases by name: it maps
// GORM's dialector name to the database's package under internal/. Adding
// a database means adding its package and a line here.
package databases

import (
	"fmt"
	"time"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/internal/inboxstore"
	"github.com/gorm-outbox/outbox/internal/mysql"
	"github.com/gorm-outbox/outbox/internal/postgres"
	"github.com/gorm-outbox/outbox/internal/sqlite"
	"github.com/gorm-outbox/outbox/internal/sqlstore"
)

// Database is one database's package, as the outbox and the inbox reach it.
type Database struct {
	// Open returns the outbox store of cfg.Table.
	Open func(db *gorm.DB, cfg sqlstore.Config, notifyInterval time.Duration) *sqlstore.Store
	// DDL creates the outbox table.
	DDL func(table string) []string
	// Inbox is the inbox table's dialect.
	Inbox inboxstore.Dialect
}

var databases = map[string]Database{
	"postgres": {Open: postgres.Open, DDL: postgres.DDL, Inbox: postgres.Inbox},
	"mysql": { // MySQL and MariaDB: GORM's mysql dialector serves both
		Open:  func(db *gorm.DB, cfg sqlstore.Config, _ time.Duration) *sqlstore.Store { return mysql.Open(db, cfg) },
		DDL:   mysql.DDL,
		Inbox: mysql.Inbox,
	},
	"sqlite": {
		Open:  func(db *gorm.DB, cfg sqlstore.Config, _ time.Duration) *sqlstore.Store { return sqlite.Open(db, cfg) },
		DDL:   sqlite.DDL,
		Inbox: sqlite.Inbox,
	},
}

// Named returns the package of the database GORM's dialector calls name
// ("mariadb" is taken for MySQL's).
func Named(name string) (Database, error) {
	if name == "mariadb" {
		name = "mysql"
	}
	d, ok := databases[name]
	if !ok {
		return Database{}, fmt.Errorf("database %q is not supported (supported: postgres, sqlite, mysql and mariadb)", name)
	}
	return d, nil
}
