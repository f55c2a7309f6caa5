#!/usr/bin/env bash
# Creates .venv from a hash-pinned lock file and installs Tabiji into it (idempotent: re-runs only
# when the lock changes). Usage: deploy/bootstrap.sh [gateway|dev]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
which_lock="${1:-gateway}"
lock="$root/deploy/lock/$which_lock.txt"
venv="${TABIJI_VENV:-$root/.venv}"

# shellcheck source=deploy/find-python.sh
source "$root/deploy/find-python.sh" "Tabiji"

digest() { sha256sum "$root/deploy/lock/$1.txt" "$root/pyproject.toml" | sha256sum | cut -c1-16; }
stamp="$venv/.tabiji-$which_lock-$(digest "$which_lock")"
# The dev lock is a superset of the gateway lock: a dev environment serves the demo too.
if [ "$which_lock" = gateway ] && [ -f "$venv/.tabiji-dev-$(digest dev)" ]; then
  exit 0
fi
if [ ! -f "$stamp" ]; then
  echo "Setting up $venv from deploy/lock/$which_lock.txt …" >&2
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes -r "$lock"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e "$root"
  rm -f "$venv"/.tabiji-*
  touch "$stamp"
fi
