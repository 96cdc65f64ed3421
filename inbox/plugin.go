package inbox

import (
	"context"
	"errors"
	"fmt"
	"regexp"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox/internal/databases"
	"github.com/gorm-outbox/outbox/internal/inboxstore"
)

// DefaultTableName is the inbox table's name unless WithTableName says otherwise.
const DefaultTableName = "inbox_messages"

// pluginName is the key under which GORM keeps the plugin.
const pluginName = "gorm-outbox-inbox"

// InboxPlugin is the GORM plugin returned by Plugin.
type InboxPlugin struct {
	table   string
	migrate bool
	err     error
	store   *inboxstore.Store
}

// PluginOption configures the Plugin.
type PluginOption func(*InboxPlugin)

// WithTableName sets the inbox table's name. Defaults to DefaultTableName.
// It must be a plain SQL identifier, optionally schema-qualified.
func WithTableName(name string) PluginOption { return func(p *InboxPlugin) { p.table = name } }

// WithoutMigration stops Plugin from creating the table, for applications
// that own their migrations (see DDL).
func WithoutMigration() PluginOption { return func(p *InboxPlugin) { p.migrate = false } }

// Plugin returns the GORM plugin that registers the inbox table on a *gorm.DB
// and creates it unless WithoutMigration:
//
//	db.Use(inbox.Plugin())
//
// It starts nothing: a Consumer, made by NewConsumer on the same *gorm.DB,
// consumes.
func Plugin(opts ...PluginOption) *InboxPlugin {
	p := &InboxPlugin{table: DefaultTableName, migrate: true}
	for i, o := range opts {
		if o == nil {
			p.err = fmt.Errorf("inbox: plugin option %d of %d is nil", i+1, len(opts))
			return p
		}
		o(p)
	}
	p.err = validateTableName(p.table)
	return p
}

// Name implements gorm.Plugin.
func (p *InboxPlugin) Name() string { return pluginName }

// Initialize implements gorm.Plugin.
func (p *InboxPlugin) Initialize(db *gorm.DB) error {
	if p == nil {
		return errors.New("inbox: the plugin is nil; use inbox.Plugin()")
	}
	if db == nil || db.Config == nil || db.Dialector == nil {
		return errors.New("inbox: the plugin needs an opened *gorm.DB")
	}
	if p.err != nil {
		return p.err
	}
	if p.store != nil {
		return errors.New("inbox: this plugin value is already registered on another *gorm.DB; call Plugin() again")
	}
	d, err := databases.Named(db.Dialector.Name())
	if err != nil {
		return fmt.Errorf("inbox: %w", err)
	}
	store := inboxstore.New(db, p.table, d.Inbox)
	if p.migrate {
		if err := store.Migrate(context.Background()); err != nil {
			return err
		}
	}
	p.store = store
	return nil
}

// storeOf finds the inbox registered on db.
func storeOf(db *gorm.DB) (*inboxstore.Store, error) {
	if db == nil || db.Config == nil {
		return nil, errors.New("inbox: *gorm.DB is nil or not opened")
	}
	if p, ok := db.Config.Plugins[pluginName].(*InboxPlugin); ok && p.store != nil {
		return p.store, nil
	}
	return nil, errors.New("inbox: plugin is not registered on this *gorm.DB; call db.Use(inbox.Plugin()) first")
}

// DDL returns the statements that create the inbox table for a database
// ("postgres", "sqlite", or "mysql", which is also "mariadb"), for
// applications that own their migrations and register the plugin
// WithoutMigration. Its primary key, (consumer_group, message_id), is what
// makes a message seen twice be applied once.
func DDL(dialectName, table string) ([]string, error) {
	d, err := databases.Named(dialectName)
	if err != nil {
		return nil, fmt.Errorf("inbox: %w", err)
	}
	if err := validateTableName(table); err != nil {
		return nil, err
	}
	return d.Inbox.Schema().DDL(table), nil
}

var identifier = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$`)

func validateTableName(name string) error {
	if !identifier.MatchString(name) {
		return fmt.Errorf("inbox: table name %q is not a plain SQL identifier (letters, digits and _, optionally schema.table)", name)
	}
	if idx := inboxstore.IndexName(name, inboxstore.LongestIndexSuffix); len(idx) > 63 {
		return fmt.Errorf("inbox: table name %q is too long: its index name %s is longer than 63 characters", name, idx)
	}
	return nil
}
