package outbox_test

import (
	"errors"
	"fmt"
	"regexp"
	"runtime"
	"sort"
	"strings"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
)

func TestPluginMigratesTableAndIndexes(t *testing.T) {
	eachDB(t, func(t *testing.T, db *gorm.DB) {
		m := db.Migrator()
		if !m.HasTable(outbox.DefaultTableName) {
			t.Fatal("outbox table was not created")
		}
		indexes := []string{"idx_outbox_messages_pending", "idx_outbox_messages_published", "idx_outbox_messages_dead"}
		if db.Dialector.Name() == "mysql" {
			indexes = []string{"idx_outbox_messages_pending", "idx_outbox_messages_state"}
		}
		for _, idx := range indexes {
			if !m.HasIndex(outbox.DefaultTableName, idx) {
				t.Errorf("index %s missing", idx)
			}
		}
		// Registering the same plugin on a second handle migrates again,
		// harmlessly, and a second registration on one handle fails.
		if err := db.Use(outbox.Plugin()); !errors.Is(err, gorm.ErrRegistered) {
			t.Fatalf("second db.Use = %v, want gorm.ErrRegistered", err)
		}
	})
}

func TestPluginTableNameAndWithoutMigration(t *testing.T) {
	for _, d := range databases {
		t.Run(d.name, func(t *testing.T) {
			db := d.open(t, nil)
			if err := db.Use(outbox.Plugin(outbox.WithTableName("app_events"), outbox.WithoutMigration())); err != nil {
				t.Fatal(err)
			}
			if db.Migrator().HasTable("app_events") || db.Migrator().HasTable(outbox.DefaultTableName) {
				t.Fatal("WithoutMigration created a table")
			}
			// The user's own migration, from DDL, makes the table usable.
			stmts, err := outbox.DDL(db.Dialector.Name(), "app_events")
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range stmts {
				if err := db.Exec(s).Error; err != nil {
					t.Fatalf("%s: %v", s, err)
				}
			}
			err = db.Transaction(func(tx *gorm.DB) error {
				return outbox.Enqueue(tx, outbox.Message{Topic: "t", Payload: "p"})
			})
			if err != nil {
				t.Fatal(err)
			}
			if n := count(t, db, "app_events"); n != 1 {
				t.Fatalf("app_events has %d rows, want 1", n)
			}
		})
	}
}

func TestPluginRefusesBadOptions(t *testing.T) {
	db := databases[1].open(t, nil)
	for _, name := range []string{"", "outbox; DROP TABLE users", "out-box", `"quoted"`, "a.b.c", "1abc", "x y", strings.Repeat("a", 64)} {
		err := db.Use(outbox.Plugin(outbox.WithTableName(name)))
		if err == nil || !strings.Contains(err.Error(), "table name") {
			t.Errorf("table name %q: err = %v, want one naming the table name", name, err)
		}
	}
	if err := db.Use(outbox.Plugin(outbox.WithMaxPayloadBytes(0))); err == nil || !strings.Contains(err.Error(), "payload") {
		t.Errorf("zero max payload: err = %v", err)
	}
	if db.Migrator().HasTable(outbox.DefaultTableName) {
		t.Fatal("a refused registration created the table")
	}
}

// otherDialector stands in for a database the outbox does not support (no
// driver for one is installed here): SQLite under another name.
type otherDialector struct{ gorm.Dialector }

func (otherDialector) Name() string { return "sqlserver" }

func TestPluginRefusesUnsupportedDatabase(t *testing.T) {
	db := databases[1].open(t, nil)
	other, err := gorm.Open(otherDialector{db.Dialector}, &gorm.Config{ConnPool: db.ConnPool})
	if err != nil {
		t.Fatal(err)
	}
	err = other.Use(outbox.Plugin())
	if err == nil || !strings.Contains(err.Error(), `"sqlserver" is not supported`) {
		t.Fatalf("err = %v, want sqlserver refused", err)
	}
	if db.Migrator().HasTable(outbox.DefaultTableName) {
		t.Fatal("a refused registration created the table")
	}
}

func TestPluginStartsNoGoroutine(t *testing.T) {
	db := databases[1].open(t, nil)
	if err := db.Exec("SELECT 1").Error; err != nil { // let the pool settle
		t.Fatal(err)
	}
	before := stableGoroutines()
	if err := db.Use(outbox.Plugin()); err != nil {
		t.Fatal(err)
	}
	if after := stableGoroutines(); after > before {
		t.Fatalf("goroutines went from %d to %d on registration", before, after)
	}
}

func stableGoroutines() int {
	n := runtime.NumGoroutine()
	for range 50 {
		time.Sleep(5 * time.Millisecond)
		m := runtime.NumGoroutine()
		if m == n {
			return n
		}
		n = m
	}
	return n
}

// TestDDLMatchesMigration compares, column by column and index by index, the
// table that DDL creates with the one the plugin's migration creates.
func TestDDLMatchesMigration(t *testing.T) {
	for _, d := range databases {
		t.Run(d.name, func(t *testing.T) {
			db := d.open(t, nil)
			if err := db.Use(outbox.Plugin(outbox.WithTableName("migrated"))); err != nil {
				t.Fatal(err)
			}
			stmts, err := outbox.DDL(db.Dialector.Name(), "from_ddl")
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range stmts {
				if err := db.Exec(s).Error; err != nil {
					t.Fatalf("%s: %v", s, err)
				}
			}
			migrated, fromDDL := describe(t, db, db.Dialector.Name(), "migrated"), describe(t, db, db.Dialector.Name(), "from_ddl")
			if migrated != fromDDL {
				t.Fatalf("schemas differ\nmigration:\n%s\nDDL:\n%s", migrated, fromDDL)
			}
			if !strings.Contains(migrated, "pending") || !strings.Contains(migrated, "payload") {
				t.Fatalf("description is missing parts:\n%s", migrated)
			}
		})
	}
	if _, err := outbox.DDL("oracle", "x"); err == nil {
		t.Error("DDL for an unsupported database did not fail")
	}
	if _, err := outbox.DDL("postgres", "x;y"); err == nil {
		t.Error("DDL for a bad table name did not fail")
	}
}

// describe renders a table's columns and indexes, with the table's name
// taken out, in a form that two equal schemas share.
func describe(t *testing.T, db *gorm.DB, dialect, table string) string {
	t.Helper()
	var lines []string
	switch dialect {
	case "postgres":
		var cols []struct {
			ColumnName, DataType, IsNullable string
			CharacterMaximumLength           *int
			ColumnDefault                    *string
		}
		if err := db.Raw(`SELECT column_name, data_type, is_nullable, character_maximum_length, column_default
			FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = ? ORDER BY ordinal_position`, table).Scan(&cols).Error; err != nil {
			t.Fatal(err)
		}
		for _, c := range cols {
			def := "-"
			if c.ColumnDefault != nil {
				def = *c.ColumnDefault
			}
			length := 0
			if c.CharacterMaximumLength != nil {
				length = *c.CharacterMaximumLength
			}
			lines = append(lines, fmt.Sprintf("column %s %s(%d) nullable=%s default=%s", c.ColumnName, c.DataType, length, c.IsNullable, def))
		}
		var idx []string
		if err := db.Raw(`SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema() AND tablename = ?`, table).Scan(&idx).Error; err != nil {
			t.Fatal(err)
		}
		var options []string
		if err := db.Raw(`SELECT unnest(reloptions) FROM pg_class WHERE oid = to_regclass(?)`, table).Scan(&options).Error; err != nil {
			t.Fatal(err)
		}
		lines = append(lines, "options "+strings.Join(options, ","))
		for _, def := range idx {
			def = regexp.MustCompile(`\b\w*`+table+`\w*\b`).ReplaceAllStringFunc(def, func(s string) string { return strings.ReplaceAll(s, table, "T") })
			lines = append(lines, "index "+def)
		}
	case "mysql":
		var cols []struct {
			ColumnName, ColumnType, IsNullable string
			ColumnDefault                      *string
		}
		if err := db.Raw(`SELECT column_name, column_type, is_nullable, column_default FROM information_schema.columns
			WHERE table_schema = DATABASE() AND table_name = ? ORDER BY ordinal_position`, table).Scan(&cols).Error; err != nil {
			t.Fatal(err)
		}
		for _, c := range cols {
			def := "-"
			if c.ColumnDefault != nil {
				def = *c.ColumnDefault
			}
			lines = append(lines, fmt.Sprintf("column %s %s nullable=%s default=%s", c.ColumnName, c.ColumnType, c.IsNullable, def))
		}
		var idx []struct {
			IndexName, Columns string
			NonUnique          int
		}
		if err := db.Raw(`SELECT index_name, GROUP_CONCAT(column_name ORDER BY seq_in_index) AS columns, MAX(non_unique) AS non_unique
			FROM information_schema.statistics WHERE table_schema = DATABASE() AND table_name = ? GROUP BY index_name`, table).Scan(&idx).Error; err != nil {
			t.Fatal(err)
		}
		for _, i := range idx {
			lines = append(lines, fmt.Sprintf("index %s (%s) unique=%v", strings.ReplaceAll(i.IndexName, table, "T"), i.Columns, i.NonUnique == 0))
		}
	case "sqlite":
		var cols []struct {
			Name, Type string
			Notnull    int
			DfltValue  *string
			Pk         int
		}
		if err := db.Raw(`SELECT name, type, "notnull", dflt_value, pk FROM pragma_table_info(?)`, table).Scan(&cols).Error; err != nil {
			t.Fatal(err)
		}
		for _, c := range cols {
			def := "-"
			if c.DfltValue != nil {
				def = strings.ReplaceAll(*c.DfltValue, `"`, `'`)
			}
			lines = append(lines, fmt.Sprintf("column %s %s notnull=%d default=%s pk=%d", c.Name, strings.ToLower(c.Type), c.Notnull, def, c.Pk))
		}
		var idx []struct {
			Name string
			SQL  *string
		}
		if err := db.Raw(`SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ?`, table).Scan(&idx).Error; err != nil {
			t.Fatal(err)
		}
		for _, i := range idx {
			var cols []string
			if err := db.Raw(`SELECT name FROM pragma_index_info(?) ORDER BY seqno`, i.Name).Scan(&cols).Error; err != nil {
				t.Fatal(err)
			}
			where := ""
			if i.SQL != nil {
				if _, w, ok := strings.Cut(*i.SQL, "WHERE"); ok {
					where = strings.TrimSpace(w)
				}
			}
			lines = append(lines, fmt.Sprintf("index %s (%s) where %s", strings.ReplaceAll(i.Name, table, "T"), strings.Join(cols, ","), where))
		}
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}
