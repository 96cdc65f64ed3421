package kafka

// PauseBeforeCommit makes s's slots call f between a transaction's sends
// and its commit: the instant a publisher can be paused with its records
// in the log, not yet committed.
func PauseBeforeCommit(s *TransactionalSender, f func()) { s.beforeCommit = f }
