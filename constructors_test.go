package outbox_test

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/hooks"
	"github.com/gorm-outbox/outbox/kafka"
	"github.com/gorm-outbox/outbox/outboxtest"
)

// call runs fn and turns a panic into a test failure naming the call.
func call(t *testing.T, name string, fn func() error) (err error) {
	t.Helper()
	defer func() {
		if r := recover(); r != nil {
			t.Errorf("%s panicked: %v", name, r)
			err = fmt.Errorf("panic")
		}
	}()
	return fn()
}

// Every constructor and option, given zero, nil and negative values: what
// cannot work is refused with an error that names it, nothing panics, and
// what has a documented meaning for zero or nil is accepted.
func TestConstructorsRefuseWhatCannotWork(t *testing.T) {
	db := setup(t, outboxtest.SQLite(t, nil))
	other := setup(t, outboxtest.SQLite(t, nil))
	otherStore, err := outbox.StoreOf(other)
	if err != nil {
		t.Fatal(err)
	}
	ok := outbox.SenderFunc(func(context.Context, []*outbox.OutboxMessage) error { return nil })
	var nilKafka *kafka.Sender
	var nilStore *outbox.GormStore
	ctx := t.Context()
	newPub := func(db *gorm.DB, s outbox.Sender, opts ...outbox.PublisherOption) func() error {
		return func() error { _, err := outbox.NewPublisher(db, s, opts...); return err }
	}
	plugin := func(opts ...outbox.PluginOption) func() error {
		return func() error { return outboxtest.SQLite(t, nil).Use(outbox.Plugin(opts...)) }
	}
	policy := outbox.RetentionPolicy{}

	for _, c := range []struct {
		name string
		fn   func() error
		want string // a part of the error; "" means accepted
	}{
		{"Plugin(nil option)", plugin(nil), "option 1"},
		{"WithTableName(\"\")", plugin(outbox.WithTableName("")), "table name"},
		{"WithTableName(\"a b\")", plugin(outbox.WithTableName("a b")), "table name"},
		{"WithEncoder(nil)", plugin(outbox.WithEncoder(nil)), "encoder"},
		{"WithEncoder(EncoderFunc(nil))", plugin(outbox.WithEncoder(outbox.EncoderFunc(nil))), "encoder"},
		{"WithMaxPayloadBytes(0)", plugin(outbox.WithMaxPayloadBytes(0)), "payload"},
		{"WithMaxPayloadBytes(-1)", plugin(outbox.WithMaxPayloadBytes(-1)), "payload"},
		{"WithNotifyInterval(-1)", plugin(outbox.WithNotifyInterval(-1)), "notify interval"},
		{"WithNotifyInterval(0)", plugin(outbox.WithNotifyInterval(0)), ""},
		{"WithMeterProvider(nil)", plugin(outbox.WithMeterProvider(nil)), ""},
		{"WithTracerProvider(nil)", plugin(outbox.WithTracerProvider(nil)), ""},
		{"nil db.Use", func() error { return (&gorm.DB{Config: &gorm.Config{}}).Use(outbox.Plugin()) }, "*gorm.DB"},

		{"NewStore(nil)", func() error { _, err := outbox.NewStore(nil); return err }, "*gorm.DB"},
		{"NewStore(db, nil option)", func() error { _, err := outbox.NewStore(db, nil); return err }, "option 1"},
		{"NewPostgresOutboxStore(nil)", func() error { _, err := outbox.NewPostgresOutboxStore(nil); return err }, "*gorm.DB"},
		{"NewPostgresOutboxStore(sqlite)", func() error { _, err := outbox.NewPostgresOutboxStore(db); return err }, "postgres"},
		{"StoreOf(nil)", func() error { _, err := outbox.StoreOf(nil); return err }, "nil"},

		{"NewPublisher(nil db)", newPub(nil, ok), "*gorm.DB"},
		{"NewPublisher(nil sender)", newPub(db, nil), "sender is nil"},
		{"NewPublisher(nil *kafka.Sender)", newPub(db, nilKafka), "sender is nil"},
		{"NewPublisher(SenderFunc(nil))", newPub(db, outbox.SenderFunc(nil)), "sender is nil"},
		{"NewPublisher(nil option)", newPub(db, ok, nil), "option 1"},
		{"WithStore(nil)", newPub(db, ok, outbox.WithStore(nil)), "nil store"},
		{"WithStore(nil *GormStore)", newPub(db, ok, outbox.WithStore(nilStore)), "nil store"},
		{"WithStore(another db's)", newPub(db, ok, outbox.WithStore(otherStore)), "another *gorm.DB"},
		{"WithStore without db", newPub(nil, ok, outbox.WithStore(otherStore)), ""},
		{"NewPublisher(PrepareStmt session)", newPub(db.Session(&gorm.Session{PrepareStmt: true}), ok), ""},
		{"WithStore(its own) on a PrepareStmt session", func() error {
			own, err := outbox.StoreOf(db)
			if err != nil {
				return err
			}
			_, err = outbox.NewPublisher(db.Session(&gorm.Session{PrepareStmt: true}), ok, outbox.WithStore(own))
			return err
		}, ""},
		{"zero Publisher Start", func() error { return (&outbox.Publisher{}).Start(ctx) }, "NewPublisher"},
		{"zero Publisher PublishOnce", func() error { _, err := (&outbox.Publisher{}).PublishOnce(ctx); return err }, "NewPublisher"},
		{"WithBatchSize(0)", newPub(db, ok, outbox.WithBatchSize(0)), "batch size"},
		{"WithBatchSize(-1)", newPub(db, ok, outbox.WithBatchSize(-1)), "batch size"},
		{"WithWorkers(0)", newPub(db, ok, outbox.WithWorkers(0)), "workers"},
		{"WithWorkers(-1)", newPub(db, ok, outbox.WithWorkers(-1)), "workers"},
		{"WithPollInterval(0)", newPub(db, ok, outbox.WithPollInterval(0)), "poll interval"},
		{"WithPollInterval(-1)", newPub(db, ok, outbox.WithPollInterval(-1)), "poll interval"},
		{"WithLease(0)", newPub(db, ok, outbox.WithLease(0)), "lease"},
		{"WithLease(-1)", newPub(db, ok, outbox.WithLease(-time.Second)), "lease"},
		{"WithMaxPause(0)", newPub(db, ok, outbox.WithMaxPause(0)), "max pause"},
		{"WithMaxPause(-1)", newPub(db, ok, outbox.WithMaxPause(-1)), "max pause"},
		{"WithRetention(zero, 0)", newPub(db, ok, outbox.WithRetention(policy, 0)), "retention interval"},
		{"WithRetention(zero, -1)", newPub(db, ok, outbox.WithRetention(policy, -1)), "retention interval"},
		{"WithRetention(zero policy)", newPub(db, ok, outbox.WithRetention(policy, time.Minute)), ""},
		{"WithRetention(Published -1)", newPub(db, ok, outbox.WithRetention(outbox.RetentionPolicy{Published: -1}, time.Minute)), "Published"},
		{"WithRetention(Dead -1)", newPub(db, ok, outbox.WithRetention(outbox.RetentionPolicy{Dead: -1}, time.Minute)), "Dead"},
		{"WithRetention(BatchSize -1)", newPub(db, ok, outbox.WithRetention(outbox.RetentionPolicy{BatchSize: -1}, time.Minute)), "BatchSize"},
		{"WithRetryPolicy(zero)", newPub(db, ok, outbox.WithRetryPolicy(outbox.RetryPolicy{})), ""},
		{"WithRetryPolicy(MaxAttempts -1)", newPub(db, ok, outbox.WithRetryPolicy(outbox.RetryPolicy{MaxAttempts: -1})), "MaxAttempts"},
		{"WithRetryPolicy(MinBackoff -1)", newPub(db, ok, outbox.WithRetryPolicy(outbox.RetryPolicy{MinBackoff: -1})), "MinBackoff"},
		{"WithRetryPolicy(MaxBackoff -1)", newPub(db, ok, outbox.WithRetryPolicy(outbox.RetryPolicy{MaxBackoff: -1})), "MaxBackoff"},
		{"WithKeyPolicy(7)", newPub(db, ok, outbox.WithKeyPolicy(7)), "key policy"},
		{"WithLogger(nil)", newPub(db, ok, outbox.WithLogger(nil)), ""},
		{"WithLogger(logger)", newPub(db, ok, outbox.WithLogger(slog.Default())), ""},

		{"PublishFromOutbox(nil store)", func() error { return outbox.PublishFromOutbox(ctx, nil, ok, 10) }, "store"},
		{"PublishFromOutbox(nil *GormStore)", func() error { return outbox.PublishFromOutbox(ctx, nilStore, ok, 10) }, "store"},
		{"PublishFromOutbox(nil sender)", func() error { return outbox.PublishFromOutbox(ctx, otherStore, nil, 10) }, "sender"},
		{"PublishFromOutbox(limit 0)", func() error { return outbox.PublishFromOutbox(ctx, otherStore, ok, 0) }, "limit"},
		{"PublishFromOutbox(limit -1)", func() error { return outbox.PublishFromOutbox(ctx, otherStore, ok, -1) }, "limit"},
		{"Transaction(nil db)", func() error { return outbox.Transaction(nil, func(*gorm.DB) error { return nil }) }, "*gorm.DB"},
		{"Transaction(nil fn)", func() error { return outbox.Transaction(db, nil) }, "function"},
		{"Enqueue(nil tx)", func() error { return outbox.Enqueue(nil, outbox.Message{Topic: "t"}) }, "nil"},
		{"SaveToOutbox(nil store)", func() error {
			return db.Transaction(func(tx *gorm.DB) error { return outbox.SaveToOutbox(ctx, tx, nil, "t", "p", nil) })
		}, "store"},
		{"SaveToOutbox(nil tx)", func() error { return outbox.SaveToOutbox(ctx, nil, otherStore, "t", "p", nil) }, "nil"},
		{"DDL(\"\", \"\")", func() error { _, err := outbox.DDL("", ""); return err }, "not supported"},
		{"DDL(postgres, \"\")", func() error { _, err := outbox.DDL("postgres", ""); return err }, "table name"},
		{"EncoderFunc(nil).Encode", func() error { _, err := outbox.EncoderFunc(nil).Encode(1); return err }, "nil"},

		{"NewStore(&gorm.DB{})", func() error { _, err := outbox.NewStore(&gorm.DB{}); return err }, "*gorm.DB"},
		{"NewPostgresOutboxStore(&gorm.DB{})", func() error { _, err := outbox.NewPostgresOutboxStore(&gorm.DB{}); return err }, "*gorm.DB"},
		{"StoreOf(&gorm.DB{})", func() error { _, err := outbox.StoreOf(&gorm.DB{}); return err }, "*gorm.DB"},
		{"Enqueue(&gorm.DB{})", func() error { return outbox.Enqueue(&gorm.DB{}, outbox.Message{Topic: "t"}) }, "*gorm.DB"},
		{"NewPublisher(&gorm.DB{})", newPub(&gorm.DB{}, ok), "*gorm.DB"},
		{"Transaction(&gorm.DB{})", func() error { return outbox.Transaction(&gorm.DB{}, func(*gorm.DB) error { return nil }) }, "*gorm.DB"},
		{"Save(nil message)", func() error {
			return db.Transaction(func(tx *gorm.DB) error { return otherStore.Save(ctx, tx, nil) })
		}, "nil"},
		{"SenderFunc(nil).Send", func() error { return outbox.SenderFunc(nil).Send(ctx, nil) }, "nil"},
		{"(*Headers)(nil).Scan", func() error { return (*outbox.Headers)(nil).Scan("{}") }, "nil"},
		{"(*OutboxPlugin)(nil).Initialize", func() error { return (*outbox.OutboxPlugin)(nil).Initialize(db) }, "nil"},
		{"Plugin().Initialize(&gorm.DB{})", func() error { return outbox.Plugin().Initialize(&gorm.DB{}) }, "*gorm.DB"},
		{"kafka.NewSender(nil)", func() error { _, err := kafka.NewSender(nil, nil); return err }, "broker"},
		{"kafka.NewSender([\"\"])", func() error { _, err := kafka.NewSender([]string{""}, nil); return err }, "empty"},
		{"kafka.NewSenderWithProducer(nil)", func() error { _, err := kafka.NewSenderWithProducer(nil, nil); return err }, "nil"},
	} {
		err := call(t, c.name, c.fn)
		switch {
		case err != nil && err.Error() == "panic":
		case c.want == "" && err != nil:
			t.Errorf("%s: %v, want it accepted", c.name, err)
		case c.want != "" && err == nil:
			t.Errorf("%s: accepted, want an error naming %q", c.name, c.want)
		case c.want != "" && !strings.Contains(err.Error(), c.want):
			t.Errorf("%s: %v, want it to name %q", c.name, err, c.want)
		}
	}
}

// Methods given a nil receiver or a nil context return errors, or do
// nothing where nothing is asked, instead of panicking.
func TestNilReceiversAndContextsDoNotPanic(t *testing.T) {
	db := setup(t, outboxtest.SQLite(t, nil))
	store, err := outbox.StoreOf(db)
	if err != nil {
		t.Fatal(err)
	}
	var nilPub *outbox.Publisher
	var nilCtx context.Context
	var events *hooks.Events
	for name, fn := range map[string]func() error{
		"nil Publisher Start":       func() error { return nilPub.Start(t.Context()) },
		"nil Publisher Run":         func() error { return nilPub.Run(t.Context()) },
		"nil Publisher PublishOnce": func() error { _, err := nilPub.PublishOnce(t.Context()); return err },
		"nil Publisher Stop":        func() error { nilPub.Wake(); return nilPub.Stop(t.Context()) },
		"nil Events":                func() error { events.ClearRecordedEvents(); _ = events.RecordedEvents(); return nil },
		"Start(nil ctx)": func() error {
			p, err := outbox.NewPublisher(db, outbox.SenderFunc(func(context.Context, []*outbox.OutboxMessage) error { return nil }))
			if err != nil {
				return err
			}
			if err := p.Start(nilCtx); err == nil {
				_ = p.Stop(nilCtx)
				return fmt.Errorf("Start(nil) was accepted")
			}
			_, err = p.PublishOnce(nilCtx)
			if err == nil {
				return fmt.Errorf("PublishOnce(nil) was accepted")
			}
			return p.Stop(nilCtx)
		},
		"store methods with a nil ctx": func() error {
			if _, _, err := store.Claim(nilCtx, outbox.ClaimOptions{Limit: 1, Lease: time.Second}); err != nil {
				return err
			}
			if _, err := store.List(nilCtx, outbox.ListOptions{}); err != nil {
				return err
			}
			if _, err := store.Stats(nilCtx, 0); err != nil {
				return err
			}
			_, err := store.Cleanup(nilCtx, outbox.RetentionPolicy{}, nil)
			return err
		},
	} {
		err := call(t, name, fn)
		wantErr := strings.HasPrefix(name, "nil Publisher") && name != "nil Publisher Stop"
		if err != nil && err.Error() == "panic" {
			continue
		}
		if wantErr != (err != nil) {
			t.Errorf("%s: %v", name, err)
		}
	}
}
