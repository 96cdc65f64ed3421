package inbox

import (
	"context"
	"errors"

	"gorm.io/gorm"
)

// Retry asks the consumers of group to apply its parked messages again:
// those whose ids are given, or all of them when none is. The consumer
// holding each message's partition applies it within its retry check
// interval (WithRetryCheckInterval), followed by the messages its key held,
// in order; it parks it again if its attempts fail again. It returns how
// many messages it asked to retry. `outbox inbox retry` does the same.
func Retry(ctx context.Context, db *gorm.DB, group string, ids ...string) (int64, error) {
	store, err := storeOf(db)
	if err != nil {
		return 0, err
	}
	if group == "" {
		return 0, errors.New("inbox: the consumer group is empty")
	}
	if ctx == nil {
		ctx = context.Background()
	}
	return store.Retry(ctx, group, ids...)
}
