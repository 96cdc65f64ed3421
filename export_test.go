package outbox

// CleanupLockKey exposes the cleanup's advisory lock to the tests, which
// hold it as another process would.
func CleanupLockKey(s *GormStore) int64 { return s.lockKey() + 1 }

// CheckSkipLocked exposes the server version check to the tests.
var CheckSkipLocked = checkSkipLocked
