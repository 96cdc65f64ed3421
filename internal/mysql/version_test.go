package mysql

import (
	"strings"
	"testing"

	"github.com/gorm-outbox/outbox/internal/sqlstore"
	"github.com/gorm-outbox/outbox/outboxtest"
)

func TestServerVersionsWithoutSkipLockedAreRefused(t *testing.T) {
	for v, want := range map[string]string{
		"10.11.19-MariaDB-0+deb12u1": "",
		"10.6.0-MariaDB":             "",
		"10.5.23-MariaDB":            "needs MariaDB 10.6 or later",
		"5.7.44-log":                 "needs MySQL 8.0.4 or later",
		"8.0.3":                      "needs MySQL 8.0.4 or later",
		"8.0.4":                      "",
		"8.0.36":                     "",
		"9.1.0":                      "",
	} {
		err := CheckVersion(v)
		if want == "" && err != nil || want != "" && (err == nil || !strings.Contains(err.Error(), want)) {
			t.Errorf("%s: %v, want %q", v, err, want)
		}
	}
}

func TestMariaDBVersionsThatSwapUUIDv7(t *testing.T) {
	for v, want := range map[string]bool{
		"10.6.18-MariaDB":            false, // no UUID type
		"10.7.0-MariaDB":             true,
		"10.9.8-MariaDB":             true,
		"10.10.5-MariaDB":            true,
		"10.10.6-MariaDB":            false,
		"10.11.4-MariaDB":            true,
		"10.11.5-MariaDB":            false,
		"10.11.19-MariaDB-0+deb12u1": false,
		"11.4.2-MariaDB":             false,
		"8.0.36":                     false,
	} {
		if got := swapsUUIDv7(v); got != want {
			t.Errorf("%s: swaps UUIDv7 %v, want %v", v, got, want)
		}
	}
}

// The check reads the id column's type: UUID as the migration makes it,
// char(36) as the docs say to make it on the servers that swap.
func TestIDColumnType(t *testing.T) {
	db := outboxtest.MariaDB(t, nil)
	store := Open(db, sqlstore.Config{Table: "outbox_messages"})
	if err := store.Migrate(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := db.Exec("CREATE TABLE by_hand (id char(36) NOT NULL PRIMARY KEY)").Error; err != nil {
		t.Fatal(err)
	}
	var name string
	if err := db.Raw("SELECT DATABASE()").Scan(&name).Error; err != nil {
		t.Fatal(err)
	}
	for table, want := range map[string]bool{"outbox_messages": true, name + ".outbox_messages": true, "by_hand": false, "missing": false} {
		got, err := idIsUUID(db, table)
		if err != nil || got != want {
			t.Errorf("%s: id is UUID %v, %v; want %v", table, got, err, want)
		}
	}
}
