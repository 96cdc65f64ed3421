// Package pgmark holds the mark that the outbox puts on the statements a
// pipelining driver may hold back, so that the outbox and the driver
// (package pgxpipeline) agree on it without the outbox importing the
// driver, whose import registers it with database/sql.
package pgmark

// WaitMark starts the outbox's own statements that may wait for the
// transaction's next one (the enqueue's INSERT and NOTIFY). Another driver
// runs them as they come: to PostgreSQL it is a comment.
const WaitMark = "/* outbox: sent with the next statement */ "
