#!/bin/sh
# The enqueue part's three transactions as plain SQL through pgbench (8 clients, no Go): what the
# database alone charges for the event's row. Usage: cmd/outbox-bench/pgbench/run.sh [seconds]
# Connection: the usual PG* variables (default 127.0.0.1, user postgres, database test).
set -e
dir=$(dirname "$0")
export PGHOST=${PGHOST:-127.0.0.1} PGUSER=${PGUSER:-postgres} PGDATABASE=${PGDATABASE:-test}
pgbench=$(command -v pgbench || ls /usr/lib/postgresql/*/bin/pgbench | tail -1)
psql -q -v ON_ERROR_STOP=1 -f "$dir/setup.sql" 2>/dev/null
{ echo "SET search_path = pgbench_outbox;"; go run "$dir/.." -ddl; } | psql -q -v ON_ERROR_STOP=1 >/dev/null
for round in 1 2 3; do
  for script in domain bare event; do
    tps=$("$pgbench" -n -M prepared -c 8 -j 2 -T "${1:-5}" -f "$dir/$script.sql" 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
    echo "round $round  $script  $tps tx/s"
  done
done
psql -q -c "DROP SCHEMA pgbench_outbox CASCADE" 2>/dev/null
