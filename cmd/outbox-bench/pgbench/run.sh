#!/bin/sh
# The enqueue part's three transactions as plain SQL through pgbench (8 clients, no Go): what the
# database alone charges for the event's row. Usage: cmd/outbox-bench/pgbench/run.sh [seconds]
# Connection: the usual PG* variables (default 127.0.0.1, user postgres, database test).
set -e
dir=$(cd "$(dirname "$0")" && pwd)
export PGHOST=${PGHOST:-127.0.0.1} PGUSER=${PGUSER:-postgres} PGDATABASE=${PGDATABASE:-test}
pgbench=$(command -v pgbench || ls /usr/lib/postgresql/*/bin/pgbench | tail -1)
psql -q -v ON_ERROR_STOP=1 -f "$dir/setup.sql" 2>/dev/null
{ echo "SET search_path = pgbench_outbox;"; (cd "$dir/.." && go run . -ddl); } | psql -q -v ON_ERROR_STOP=1 >/dev/null
tps() { "$pgbench" -n -M prepared -c 8 -j 2 -T "${1:-5}" -f "$dir/$2.sql" 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p'; }
echo "8 clients, ${1:-5}s per script, three interleaved rounds; time per transaction against the domain row alone:"
for round in 1 2 3; do
  domain=$(tps "$1" domain); bare=$(tps "$1" bare); event=$(tps "$1" event)
  awk -v r="$round" -v d="$domain" -v b="$bare" -v e="$event" 'BEGIN {
    printf "round %s: domain row %6.0f tx/s, + bare INSERT %6.0f tx/s (%+.0f%%), + outbox row %6.0f tx/s (%+.0f%%)\n",
      r, d, b, 100*(d/b-1), e, 100*(d/e-1) }'
done
psql -q -c "DROP SCHEMA pgbench_outbox CASCADE" 2>/dev/null
