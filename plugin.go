package outbox

import (
	"context"
	"fmt"

	"gorm.io/gorm"
)

// pluginName is the key under which GORM keeps the plugin; a second
// db.Use(Plugin()) on the same *gorm.DB fails with gorm.ErrRegistered.
const pluginName = "gorm-outbox"

// OutboxPlugin is the GORM plugin returned by Plugin.
type OutboxPlugin struct {
	cfg   config
	err   error // an invalid option, reported by Initialize
	store *GormStore
}

// Plugin returns the GORM plugin that registers the outbox on a *gorm.DB:
//
//	db.Use(outbox.Plugin())
//
// Initialize validates the options, refuses unsupported databases, migrates
// the table (unless WithoutMigration), and registers the callbacks that write
// the events recorded by models (see EventRecorder). It starts no goroutine:
// the Publisher is started and stopped by the application.
func Plugin(opts ...PluginOption) *OutboxPlugin {
	cfg, err := newConfig(opts)
	return &OutboxPlugin{cfg: cfg, err: err}
}

// Name implements gorm.Plugin.
func (p *OutboxPlugin) Name() string { return pluginName }

// Initialize implements gorm.Plugin.
func (p *OutboxPlugin) Initialize(db *gorm.DB) error {
	if p == nil {
		return fmt.Errorf("outbox: the plugin is nil; use outbox.Plugin()")
	}
	if db == nil || db.Config == nil {
		return fmt.Errorf("outbox: the plugin needs an opened *gorm.DB")
	}
	if p.err != nil {
		return p.err
	}
	if p.store != nil {
		return fmt.Errorf("outbox: this plugin value is already registered on another *gorm.DB; call Plugin() again")
	}
	store, err := newStore(db, p.cfg)
	if err != nil {
		return err
	}
	if p.cfg.migrate {
		if err := store.CreateOutboxTable(context.Background()); err != nil {
			return err
		}
	}
	if err := registerCallbacks(db, p); err != nil {
		return err
	}
	p.store = store
	return nil
}

// pluginOf finds the registered plugin through any session or transaction of
// the *gorm.DB it was registered on: they share its Config.
func pluginOf(db *gorm.DB) (*OutboxPlugin, error) {
	if db == nil || db.Config == nil {
		return nil, fmt.Errorf("outbox: *gorm.DB is nil or not opened")
	}
	if p, ok := db.Config.Plugins[pluginName].(*OutboxPlugin); ok && p.store != nil {
		return p, nil
	}
	return nil, fmt.Errorf("outbox: plugin is not registered on this *gorm.DB; call db.Use(outbox.Plugin()) first")
}
