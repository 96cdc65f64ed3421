package mysql

import (
	"strings"
	"testing"
)

func TestServerVersionsWithoutSkipLockedAreRefused(t *testing.T) {
	for v, want := range map[string]string{
		"10.11.19-MariaDB-0+deb12u1": "",
		"10.6.0-MariaDB":             "",
		"10.5.23-MariaDB":            "needs MariaDB 10.6 or later",
		"5.7.44-log":                 "needs MySQL 8.0.4 or later",
		"8.0.3":                      "needs MySQL 8.0.4 or later",
		"8.0.4":                      "",
		"8.0.36":                     "",
		"9.1.0":                      "",
	} {
		err := CheckVersion(v)
		if want == "" && err != nil || want != "" && (err == nil || !strings.Contains(err.Error(), want)) {
			t.Errorf("%s: %v, want %q", v, err, want)
		}
	}
}
