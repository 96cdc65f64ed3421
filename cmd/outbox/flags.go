package main

import (
	"errors"
	"flag"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/gorm-outbox/outbox"
)

// The flag values below check what is typed as it is parsed, so that every
// value is either used as typed or refused with what is allowed: the flag
// package prints their error as `invalid value "x" for flag -name: <error>`.

// durationValue is a duration that may not be negative, nor zero if positive.
type durationValue struct {
	d        *time.Duration
	positive bool
}

func (v durationValue) String() string {
	if v.d == nil {
		return ""
	}
	return v.d.String()
}

func (v durationValue) Set(s string) error {
	d, err := time.ParseDuration(strings.TrimSpace(s))
	if err != nil {
		return errors.New("want a duration such as 720h, 90m or 30s (h is the largest unit: a day is 24h)")
	}
	if d < 0 {
		return errors.New("a duration must not be negative")
	}
	if v.positive && d == 0 {
		return errors.New("want a duration above zero, such as 1s or 500ms")
	}
	*v.d = d
	return nil
}

func durationFlag(fs *flag.FlagSet, name string, def time.Duration, positive bool) *time.Duration {
	d := def
	fs.Var(durationValue{&d, positive}, name, "")
	return &d
}

// intValue is a whole number in decimal of at least min.
type intValue struct {
	n   *int
	min int
}

func (v intValue) String() string {
	if v.n == nil {
		return ""
	}
	return strconv.Itoa(*v.n)
}

func (v intValue) Set(s string) error {
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if errors.Is(err, strconv.ErrRange) && !strings.HasPrefix(strings.TrimSpace(s), "-") {
		return fmt.Errorf("want a whole number of at least %d, up to %d", v.min, math.MaxInt)
	}
	if err != nil || n < v.min {
		return fmt.Errorf("want a whole number of at least %d", v.min)
	}
	*v.n = n
	return nil
}

func intFlag(fs *flag.FlagSet, name string, def, min int) *int {
	n := def
	fs.Var(intValue{&n, min}, name, "")
	return &n
}

// boolValue is a switch: --name alone, or --name=true / --name=false.
type boolValue struct{ b *bool }

func (v boolValue) String() string {
	if v.b == nil {
		return ""
	}
	return strconv.FormatBool(*v.b)
}

func (v boolValue) Set(s string) error {
	b, err := strconv.ParseBool(s)
	if err != nil {
		return errors.New("give the flag alone, or =true or =false")
	}
	*v.b = b
	return nil
}

func (boolValue) IsBoolFlag() bool { return true }

func boolFlag(fs *flag.FlagSet, name string) *bool {
	var b bool
	fs.Var(boolValue{&b}, name, "")
	return &b
}

// stringValue is a string that must not be empty: an empty one would
// silently mean "no filter" or "no value".
type stringValue struct {
	s    *string
	what string // what to give instead, e.g. "a topic name"
}

func (v stringValue) String() string {
	if v.s == nil {
		return ""
	}
	return *v.s
}

func (v stringValue) Set(s string) error {
	if s == "" {
		return fmt.Errorf("give %s", v.what)
	}
	*v.s = s
	return nil
}

func stringFlag(fs *flag.FlagSet, name, def, what string) *string {
	s := def
	fs.Var(stringValue{&s, what}, name, "")
	return &s
}

// stateValue is one of the message states.
type stateValue struct{ st *outbox.State }

func (v stateValue) String() string {
	if v.st == nil {
		return ""
	}
	return string(*v.st)
}

func (v stateValue) Set(s string) error {
	for _, st := range states {
		if string(st) == s {
			*v.st = st
			return nil
		}
	}
	return errors.New("want pending, published or dead")
}

func stateFlag(fs *flag.FlagSet, name string) *outbox.State {
	var st outbox.State
	fs.Var(stateValue{&st}, name, "")
	return &st
}

// isSet says whether name was given on the command line, so that a value
// given as zero is told apart from no value at all.
func isSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) {
		if f.Name == name {
			set = true
		}
	})
	return set
}

// inboxStateValue is one of the inbox's states.
type inboxStateValue struct{ st *string }

func (v inboxStateValue) String() string {
	if v.st == nil {
		return ""
	}
	return *v.st
}

func (v inboxStateValue) Set(s string) error {
	for _, st := range inboxStates {
		if st == s {
			*v.st = st
			return nil
		}
	}
	return errors.New("want applied, parked, held or retry")
}

func inboxStateFlag(fs *flag.FlagSet, name string) *string {
	var st string
	fs.Var(inboxStateValue{&st}, name, "")
	return &st
}
