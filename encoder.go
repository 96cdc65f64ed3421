package outbox

import (
	"encoding/json"
	"errors"
)

// Encoder turns a payload that is neither []byte nor string into bytes.
// Replace the default JSONEncoder with WithEncoder (for protobuf, Avro...).
type Encoder interface {
	Encode(payload any) ([]byte, error)
}

// JSONEncoder encodes payloads with encoding/json.
type JSONEncoder struct{}

// Encode implements Encoder.
func (JSONEncoder) Encode(payload any) ([]byte, error) { return json.Marshal(payload) }

// EncoderFunc adapts a function to Encoder.
type EncoderFunc func(payload any) ([]byte, error)

// Encode implements Encoder.
func (f EncoderFunc) Encode(payload any) ([]byte, error) {
	if f == nil {
		return nil, errors.New("outbox: the EncoderFunc is nil")
	}
	return f(payload)
}
