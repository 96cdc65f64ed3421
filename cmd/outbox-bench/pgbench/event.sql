BEGIN;
INSERT INTO pgbench_outbox.bench_orders (customer, amount, created) VALUES ('c', 42, now());
INSERT INTO pgbench_outbox.outbox_messages (id, topic, message_key, payload, headers, state, next_attempt_at, created_at)
  VALUES (pgbench_outbox.time_uuid(), 'orders', '123', '\x7b226f726465725f6964223a3132332c22637573746f6d6572223a2263222c22616d6f756e74223a34327d', '{}', 'pending', now(), now());
COMMIT;
