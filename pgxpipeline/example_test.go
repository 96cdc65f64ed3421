package pgxpipeline_test

import (
	"fmt"

	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/gorm-outbox/outbox"
	"github.com/gorm-outbox/outbox/outboxtest"
	"github.com/gorm-outbox/outbox/pgxpipeline"
)

// Open GORM on PostgreSQL with this driver instead of pgx's own, and each
// transaction's events go to the server with its COMMIT. (Not run by go
// test: it needs a PostgreSQL server; the outbox's test suite runs every
// shared case through this driver.)
func Example() {
	dsn := outboxtest.PostgresDSN() // e.g. "host=127.0.0.1 user=postgres dbname=test sslmode=disable"
	db, err := gorm.Open(postgres.New(postgres.Config{DriverName: pgxpipeline.DriverName, DSN: dsn}),
		&gorm.Config{Logger: logger.Discard})
	if err != nil {
		fmt.Println(err)
		return
	}
	if err := db.Use(outbox.Plugin()); err != nil {
		fmt.Println(err)
		return
	}
	err = db.Transaction(func(tx *gorm.DB) error {
		// ... domain writes on tx ...
		return outbox.Enqueue(tx, outbox.Message{Topic: "orders", Key: "42", Payload: []byte(`{"id":42}`)})
	}) // the INSERT went out with the COMMIT; an error in it would be this error
	fmt.Println(err)
}
