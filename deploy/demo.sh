#!/usr/bin/env bash
# Sets up Tabiji (once) and runs the local demo: the gateway in front of the demo app
# 「庁内グループウェア」, all on 127.0.0.1, embedded defaults. Extra arguments go to `tabiji demo`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/deploy/bootstrap.sh" gateway
exec "${TABIJI_VENV:-$root/.venv}/bin/tabiji" demo "$@"
