#!/usr/bin/env bash
# Creates .venv-tools from the hash-pinned deploy/lock/tools.txt: the offline checkers for the
# deployment files (kubernetes-validate, checkov, check-jsonschema, yamllint) and podman-compose.
# Kept apart from .venv because checkov pins many packages exactly. Idempotent: re-installs only
# when the lock changes. Usage: deploy/tools.sh   (TABIJI_TOOLS_VENV overrides the directory)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
lock="$root/deploy/lock/tools.txt"
venv="${TABIJI_TOOLS_VENV:-$root/.venv-tools}"

# shellcheck source=deploy/find-python.sh
source "$root/deploy/find-python.sh" "The deploy tools"

stamp="$venv/.tabiji-tools-$(sha256sum "$lock" | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
echo "Setting up $venv from deploy/lock/tools.txt …" >&2
# --clear: a changed lock gets a fresh environment, so nothing the old lock had lingers.
"$python" -m venv --clear "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes -r "$lock"
"$venv/bin/python" -m pip check >&2
touch "$stamp"
