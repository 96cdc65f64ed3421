package main_test

import (
	"github.com/glebarez/sqlite"
	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/outboxtest"
)

func sqliteDialector(path string) gorm.Dialector { return sqlite.Open(outboxtest.SQLiteDSN(path)) }
