#!/usr/bin/env bash
# Three Tabiji replicas behind a real nginx on this machine's Redis and PostgreSQL, and the checks
# of tests/integration/test_replicas.py run against them; prints the measured numbers at the end.
#
#   deploy/replicas/run.sh            # the whole check (about a minute)
#   deploy/replicas/run.sh -k revoke  # only some checks (pytest -k)
#
# Needs: nginx, node + tests/idp/node_modules (npm ci there), the dev venv (deploy/bootstrap.sh
# dev), Redis on TABIJI_TEST_REDIS_URL (default redis://127.0.0.1:6379) and PostgreSQL on
# TABIJI_TEST_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/test; a throwaway
# database is created there and dropped). Redis keeps its data: one empty DB (1-15) is borrowed
# and emptied again. Every process started is stopped by PID at the end.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
python="${PYTHON:-.venv/bin/python}"
report="$(mktemp -t tabiji-replicas-XXXXXX.json)"
trap 'rm -f "$report"' EXIT
export TABIJI_REPLICAS_REPORT="$report"
# Missing Redis, PostgreSQL, nginx or node is a failure here, with the reason, never a skip.
export CI=true
"$python" -m pytest tests/integration/test_replicas.py -q -s -p no:cacheprovider "$@"
status=$?
echo
echo "== measured (tests/integration/test_replicas.py; a shared machine's load shows in them)"
"$python" - "$report" <<'PY'
import json
import sys

with open(sys.argv[1], encoding="utf-8") as handle:
    text = handle.read().strip()
figures = json.loads(text) if text else {}
if not figures:
    print("nothing was measured (see the test output above)")
for name in sorted(figures):
    print(f"  {name}: {figures[name]}")
PY
exit "$status"
