BEGIN;
INSERT INTO pgbench_outbox.bench_orders (customer, amount, created) VALUES ('c', 42, now());
COMMIT;
