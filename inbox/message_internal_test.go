package inbox

import (
	"errors"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/IBM/sarama"
)

// A header's id that the table could not keep gives way to the record's
// place in Kafka, and that place fits the table however long the topic.
func TestMessageIDFallsBackWhenTheHeaderCannotBeKept(t *testing.T) {
	header := func(v string) []*sarama.RecordHeader {
		return []*sarama.RecordHeader{{Key: []byte(MessageIDHeader), Value: []byte(v)}}
	}
	for _, tc := range []struct {
		name, topic string
		headers     []*sarama.RecordHeader
		want        string
	}{
		{"header", "orders", header("0193-abc"), "0193-abc"},
		{"no header", "orders", nil, "orders/2/7"},
		{"not UTF-8", "orders", header("id\xff"), "orders/2/7"},
		{"NUL", "orders", header("id\x00x"), "orders/2/7"},
		{"too long", "orders", header(strings.Repeat("x", maxID+1)), "orders/2/7"},
	} {
		m := fromKafka(&sarama.ConsumerMessage{Topic: tc.topic, Partition: 2, Offset: 7, Headers: tc.headers})
		if m.ID != tc.want {
			t.Errorf("%s: id %q, want %q", tc.name, m.ID, tc.want)
		}
	}
	long := strings.Repeat("t", 249)
	a := fromKafka(&sarama.ConsumerMessage{Topic: long, Partition: 2, Offset: 7})
	b := fromKafka(&sarama.ConsumerMessage{Topic: long, Partition: 2, Offset: 8})
	if len(a.ID) > maxID || a.ID == b.ID {
		t.Errorf("a 249-character topic's ids: %q (%d bytes) and %q", a.ID, len(a.ID), b.ID)
	}
}

// A parked message's error is text every database keeps.
func TestErrorTextIsValidUTF8WithoutNUL(t *testing.T) {
	got := errorText(errors.New("bad record \x00\xff" + strings.Repeat("é", 3000)))
	if !utf8.ValidString(got) || strings.ContainsRune(got, 0) || len(got) > 4000 {
		t.Fatalf("error text not storable: valid=%v NUL=%v len=%d", utf8.ValidString(got), strings.ContainsRune(got, 0), len(got))
	}
}
