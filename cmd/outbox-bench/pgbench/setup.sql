-- The tables of outbox-bench's enqueue part, for pgbench: the same SQL without Go (run.sh).
-- The outbox table is outbox.DDL("postgres", "outbox_messages") in schema pgbench_outbox.
DROP SCHEMA IF EXISTS pgbench_outbox CASCADE;
CREATE SCHEMA pgbench_outbox;
SET search_path = pgbench_outbox;
CREATE TABLE bench_orders (id bigserial PRIMARY KEY, customer text, amount bigint, created timestamptz);
CREATE TABLE bench_audits (id bigserial PRIMARY KEY, order_id bigint, note text);
-- A time-ordered uuid like the library's UUIDv7 (PostgreSQL 15 has no uuidv7()): microseconds, then random bits.
CREATE FUNCTION time_uuid() RETURNS uuid LANGUAGE sql VOLATILE AS $$
  SELECT (lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000000)::bigint), 16, '0') ||
          lpad(to_hex((random() * 4611686018427387903)::bigint), 16, '0'))::uuid $$;
