BEGIN;
INSERT INTO pgbench_outbox.bench_orders (customer, amount, created) VALUES ('c', 42, now());
INSERT INTO pgbench_outbox.bench_audits (order_id, note) VALUES (1, 'placed');
COMMIT;
