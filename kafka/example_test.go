package kafka_test

import (
	"crypto/tls"
	"fmt"

	"github.com/IBM/sarama"

	"github.com/gorm-outbox/outbox/kafka"
)

// TLS and SASL are set on the reliable config, which NewSender then uses.
func ExampleNewConfig() {
	cfg := kafka.NewConfig()
	cfg.Net.TLS.Enable = true
	cfg.Net.TLS.Config = &tls.Config{MinVersion: tls.VersionTLS12}
	cfg.Net.SASL.Enable = true
	cfg.Net.SASL.Mechanism = sarama.SASLTypeSCRAMSHA512
	cfg.Net.SASL.User = "outbox"
	cfg.Net.SASL.Password = "from-your-secret-store"
	// cfg.Net.SASL.SCRAMClientGeneratorFunc = ... (see sarama's SCRAM example)

	// sender, err := kafka.NewSender([]string{"broker-1:9093"}, cfg)
	fmt.Println(cfg.Producer.Idempotent, cfg.Producer.RequiredAcks == sarama.WaitForAll, cfg.Net.MaxOpenRequests)
	// Output: true true 1
}
