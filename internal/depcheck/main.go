// Command depcheck stands for an application that uses the outbox: it
// imports the library and its Kafka sender and nothing else. CI lists its
// dependencies (go list -deps, in .ci/run) and fails on any that only the
// tests, the examples or the benchmark should bring; running it fails if
// importing the two packages registered a database/sql driver, which is the
// application's choice to make.
package main

import (
	"database/sql"
	"fmt"
	"os"

	_ "github.com/gorm-outbox/outbox"
	_ "github.com/gorm-outbox/outbox/kafka"
)

func main() {
	if drivers := sql.Drivers(); len(drivers) > 0 {
		fmt.Fprintf(os.Stderr, "importing outbox and outbox/kafka registers database/sql drivers: %v\n", drivers)
		os.Exit(1)
	}
}
