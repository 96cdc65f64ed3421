package sqlstore

// AfterGuardedWalk makes s run f between a guarded claim's walk and its turn.
func AfterGuardedWalk(s *Store, f func()) { s.afterGuardedWalk = f }
