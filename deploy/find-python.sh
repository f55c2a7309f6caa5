# shellcheck shell=bash
# Sourced by deploy/bootstrap.sh and deploy/tools.sh: sets $python to an interpreter ≥ 3.11
# ($PYTHON if given, else the first of python3.11 … python3 on PATH), or exits 2 saying why.
# $1: what needs it, for the message.
python="${PYTHON:-}"
if [ -z "$python" ]; then
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      python="$candidate"; break
    fi
  done
fi
if [ -z "$python" ]; then
  echo "$1 needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)." >&2
  exit 2
fi
