package outbox

import (
	"math/rand/v2"
	"time"
)

// RetryPolicy decides when a failed message is tried again, and when it is
// given up as dead.
type RetryPolicy struct {
	// MaxAttempts is how many failed sends make a message dead (default 10).
	MaxAttempts int
	// MinBackoff is the wait after the first failure (default 1s); each
	// further failure doubles it, up to MaxBackoff (default 5m). The wait is
	// jittered between half and all of it so that retries of a batch spread out.
	MinBackoff time.Duration
	MaxBackoff time.Duration
}

func (r RetryPolicy) withDefaults() RetryPolicy {
	if r.MaxAttempts <= 0 {
		r.MaxAttempts = DefaultRetryPolicy.MaxAttempts
	}
	if r.MinBackoff <= 0 {
		r.MinBackoff = DefaultRetryPolicy.MinBackoff
	}
	if r.MaxBackoff <= 0 {
		r.MaxBackoff = DefaultRetryPolicy.MaxBackoff
	}
	if r.MaxBackoff < r.MinBackoff {
		r.MaxBackoff = r.MinBackoff
	}
	return r
}

// Backoff is the wait before the next try of a message that has now failed
// attempts times (attempts >= 1).
func (r RetryPolicy) Backoff(attempts int) time.Duration {
	return jitter(exponential(r.MinBackoff, r.MaxBackoff, attempts))
}

// exponential is min * 2^(n-1), capped at max.
func exponential(lo, hi time.Duration, n int) time.Duration {
	d := lo
	for i := 1; i < n && d < hi; i++ {
		d *= 2
	}
	return min(d, hi)
}

// jitter returns a duration between d/2 and d.
func jitter(d time.Duration) time.Duration {
	if d <= 1 {
		return d
	}
	half := d / 2
	return half + rand.N(d-half+1)
}
