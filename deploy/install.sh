#!/usr/bin/env bash
# Install Tabiji on a plain Linux VM with systemd, no containers (idempotent: run it again to
# upgrade). Creates the `tabiji` system user, a venv under PREFIX from the hash-pinned lock
# deploy/lock/gateway.txt plus this checkout, /etc/tabiji (a starting config and policies, never
# overwritten), and the sandboxed unit deploy/systemd/tabiji-gateway.service.
#
#   sudo deploy/install.sh [--prefix /opt/tabiji] [--no-start] [--no-enable] [--python PYTHON]
#
# Needs: root, Python >= 3.11 with venv (Debian/Ubuntu: apt-get install python3 python3-venv),
# systemd, and access to PyPI (or a mirror: PIP_INDEX_URL; a private CA: PIP_CERT).
set -euo pipefail

prefix=/opt/tabiji
start=yes
enable=yes
python="${PYTHON:-}"
source_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
config_dir=/etc/tabiji
state_dir=/var/lib/tabiji
unit_name=tabiji-gateway.service
unit_dir=/etc/systemd/system
user=tabiji

usage() {
  cat <<EOF
Usage: sudo $0 [options]

Install (or upgrade) the Tabiji gateway as a systemd service on this machine.

  --prefix DIR     where the venv goes (default /opt/tabiji → /opt/tabiji/venv)
  --python PYTHON  the Python >= 3.11 to build the venv with (default: the first found)
  --source DIR     the Tabiji checkout to install (default: the one holding this script)
  --no-enable      do not enable the unit at boot
  --no-start       do not start or restart the service now
  -h, --help       this text

Never overwritten on a re-run: $config_dir/gateway.yaml, $config_dir/policies/, $state_dir.
EOF
}

say() { printf 'tabiji-install: %s\n' "$*"; }
die() { printf 'tabiji-install: error: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) [ $# -ge 2 ] || { usage >&2; exit 2; }; prefix="$2"; shift 2 ;;
    --prefix=*) prefix="${1#*=}"; shift ;;
    --python) [ $# -ge 2 ] || { usage >&2; exit 2; }; python="$2"; shift 2 ;;
    --python=*) python="${1#*=}"; shift ;;
    --source) [ $# -ge 2 ] || { usage >&2; exit 2; }; source_dir="$2"; shift 2 ;;
    --source=*) source_dir="${1#*=}"; shift ;;
    --no-start) start=no; shift ;;
    --no-enable) enable=no; shift ;;
    -h|--help) usage; exit 0 ;;
    *) printf 'unknown option: %s\n\n' "$1" >&2; usage >&2; exit 2 ;;
  esac
done

case "$prefix" in
  /*) prefix="${prefix%/}" ;;
  *) die "--prefix must be an absolute path (got '$prefix')" ;;
esac
# The unit's ExecStart= is rewritten with this path: keep it to characters systemd takes verbatim.
[[ "$prefix" =~ ^[A-Za-z0-9/._-]+$ ]] || die "--prefix may hold only letters, digits, / . _ -"
venv="$prefix/venv"
lock="$source_dir/deploy/lock/gateway.txt"
unit_src="$source_dir/deploy/systemd/$unit_name"

[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0 …): it creates a system user and a service"
for needed in "$source_dir/pyproject.toml" "$lock" "$unit_src"; do
  [ -f "$needed" ] || die "$source_dir is not a Tabiji checkout ($needed is missing)"
done
command -v systemctl >/dev/null 2>&1 || die "systemctl not found: this installer needs systemd"

# --- Python ----------------------------------------------------------------------------------
if [ -z "$python" ]; then
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      python="$(command -v "$candidate")"; break
    fi
  done
fi
[ -n "$python" ] || die "Python 3.11 or newer not found (Debian/Ubuntu: apt-get install python3 python3-venv)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  die "$python is older than 3.11"
"$python" -c 'import ensurepip, venv' 2>/dev/null ||
  die "$python has no venv/ensurepip module (Debian/Ubuntu: apt-get install python3-venv)"

# --- the system user -------------------------------------------------------------------------
if getent passwd "$user" >/dev/null; then
  say "user $user exists"
else
  # No login shell, no home of its own: it exists only to own /var/lib/tabiji.
  nologin="$(command -v nologin || echo /usr/sbin/nologin)"
  useradd --system --user-group --home-dir "$state_dir" --no-create-home \
    --shell "$nologin" --comment "Tabiji gateway" "$user"
  say "created system user $user"
fi

# --- the venv: dependencies from the hash lock, then this checkout ----------------------------
# A stamp of the lock and the sources makes a re-run with nothing changed a no-op.
digest="$(cd "$source_dir" && {
  sha256sum pyproject.toml deploy/lock/gateway.txt
  find gateway policies device_agent -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 |
    sort -z | xargs -0 sha256sum
} | sha256sum | cut -c1-16)"
stamp="$venv/.tabiji-install-$digest"
if [ -f "$stamp" ]; then
  say "venv $venv is up to date"
else
  umask 022  # the venv is read by the tabiji user, written only by root
  if [ ! -x "$venv/bin/python" ]; then
    say "creating venv $venv with $python"
    mkdir -p "$prefix"
    "$python" -m venv "$venv"
  fi
  pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input --quiet)
  say "installing dependencies from deploy/lock/gateway.txt (hash-checked)"
  "${pip[@]}" install --require-hashes --no-deps -r "$lock"
  say "installing Tabiji from $source_dir"
  # A copy, not an editable install: the checkout may move or change under a running service.
  build_dir="$(mktemp -d)"
  trap 'rm -rf "$build_dir"' EXIT
  (cd "$source_dir" && tar -c --exclude=.venv --exclude=.git --exclude=node_modules \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=build \
    pyproject.toml README.md gateway policies device_agent) | tar -x -C "$build_dir"
  "${pip[@]}" install --no-deps --force-reinstall "$build_dir"
  rm -rf "$build_dir"
  trap - EXIT
  "$venv/bin/python" -m compileall -q "$venv/lib" >/dev/null || true  # the service cannot write it
  rm -f "$venv"/.tabiji-install-*
  touch "$stamp"
fi
"$venv/bin/tabiji" --help >/dev/null || die "the installed tabiji does not run: see the errors above"
ln -sfn "$venv/bin/tabiji" /usr/local/bin/tabiji
ln -sfn "$venv/bin/tabiji-policy" /usr/local/bin/tabiji-policy

# --- /etc/tabiji: root-owned, readable by the service's group ----------------------------------
install -d -m 0750 -o root -g "$user" "$config_dir" "$config_dir/policies"
# The annotated reference of every setting: always the current version's.
install -m 0644 -o root -g root "$source_dir/deploy/gateway.example.yaml" "$config_dir/gateway.example.yaml"
if ! compgen -G "$config_dir/policies/*.yaml" >/dev/null; then
  install -m 0640 -o root -g "$user" "$source_dir/policies/examples/minimal/policies.yaml" \
    "$config_dir/policies/policies.yaml"
  say "wrote $config_dir/policies/policies.yaml (policy staff-only: group staff)"
fi
if [ -f "$config_dir/gateway.yaml" ]; then
  say "keeping $config_dir/gateway.yaml"
else
  tmp="$(mktemp "$config_dir/.gateway.yaml.XXXXXX")"
  cat >"$tmp" <<'EOF'
# Tabiji gateway — the starting config written by deploy/install.sh. Every setting, with its
# default, is in /etc/tabiji/gateway.example.yaml. After a change:
#   tabiji check-config /etc/tabiji/gateway.yaml && systemctl restart tabiji-gateway
#
# Until you configure it this gateway lets nobody in: it listens on loopback only, knows no
# identity provider, and its one route needs a signed-in member of group "staff".

listen: {host: 127.0.0.1, port: 8080}   # 0.0.0.0:8443 with `tls:` or behind a trusted proxy
public_url: http://127.0.0.1:8080       # the gateway's public origin (https in production)

policies:
  dir: /etc/tabiji/policies             # `tabiji-policy lint /etc/tabiji/policies` first

# The service may write only under /var/lib/tabiji (and /var/log/tabiji): keep every state path
# there (paths elsewhere fail at start with "read-only file system").
identity:
  providers: []                         # your OpenID Connect provider(s): see the example file
  session:
    store: sqlite:////var/lib/tabiji/state.db   # redis://… for several replicas
assertion:
  key_dir: /var/lib/tabiji/assertion-keys
audit:
  store: sqlite:////var/lib/tabiji/audit.db     # postgresql://… for several replicas
  spool_dir: /var/lib/tabiji/audit-spool
  key_file: /var/lib/tabiji/audit-key.pem
  checkpoint_export: /var/log/tabiji/checkpoints.jsonl   # copy it off the box for the auditors
# devices:                              # device trust (README "Devices")
#   store: sqlite:////var/lib/tabiji/devices.db
#   ca_dir: /var/lib/tabiji/device-ca

routes:
  - name: example
    from: http://127.0.0.1:8080
    to: http://127.0.0.1:9001
    policy: staff-only
EOF
  chown root:"$user" "$tmp"
  chmod 0640 "$tmp"
  mv "$tmp" "$config_dir/gateway.yaml"
  say "wrote $config_dir/gateway.yaml (loopback only, nobody allowed in until you configure it)"
fi

# The state directory: systemd creates it too (StateDirectory=); made here so check-config and
# admin commands run as the tabiji user find it.
install -d -m 0700 -o "$user" -g "$user" "$state_dir"
install -d -m 0750 -o "$user" -g "$user" /var/log/tabiji

config_ok=yes
if ! runuser -u "$user" -- "$venv/bin/tabiji" check-config "$config_dir/gateway.yaml"; then
  config_ok=no
  say "WARNING: $config_dir/gateway.yaml has the problems above; fix them before starting"
fi

[ -x /bin/kill ] || say "note: /bin/kill is missing (Debian: apt-get install procps), so \
\`systemctl reload tabiji-gateway\` cannot work; restart instead"

# --- the unit --------------------------------------------------------------------------------
unit_tmp="$(mktemp "$unit_dir/.$unit_name.XXXXXX")"
sed "s#/opt/tabiji/venv/#$venv/#g" "$unit_src" >"$unit_tmp"
chmod 0644 "$unit_tmp"
mv "$unit_tmp" "$unit_dir/$unit_name"
say "installed $unit_dir/$unit_name"

running_systemd=no
[ -d /run/systemd/system ] && running_systemd=yes
if [ "$running_systemd" = yes ]; then
  systemctl daemon-reload
fi
if [ "$enable" = yes ]; then
  systemctl enable --quiet "$unit_name"
  say "enabled $unit_name (starts at boot)"
fi
if [ "$start" = no ]; then
  say "not started (--no-start): systemctl start tabiji-gateway"
elif [ "$running_systemd" = no ]; then
  say "systemd is not running here (a chroot or an image build): the service starts at boot"
elif [ "$config_ok" = no ]; then
  say "not started: fix $config_dir/gateway.yaml, then systemctl restart tabiji-gateway"
  exit 1
else
  # restart, not start: a re-run after an upgrade must load the new code.
  systemctl restart "$unit_name"
  # Type=exec returns once the program runs: wait until it accepts connections (or fails).
  if runuser -u "$user" -- "$venv/bin/python" - "$config_dir/gateway.yaml" <<'PY'
import socket, subprocess, sys, time
from pathlib import Path
from gateway.settings import load_settings
listen = load_settings(Path(sys.argv[1])).listen
host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen.host, listen.host)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        socket.create_connection((host, listen.port), timeout=1).close()
        sys.exit(0)
    except OSError:
        # Exited and waiting to be restarted (auto-restart), or given up (failed): not up.
        show = ["systemctl", "show", "-p", "SubState", "--value", "tabiji-gateway"]
        if subprocess.run(show, capture_output=True, text=True).stdout.strip() in {
            "auto-restart", "failed", "dead"}:
            sys.exit(1)
        time.sleep(0.5)
sys.exit(1)
PY
  then
    say "running: systemctl status tabiji-gateway ; journalctl -u tabiji-gateway"
  else
    systemctl --no-pager status "$unit_name" >&2 || true
    die "$unit_name did not start: journalctl -u tabiji-gateway"
  fi
fi
say "done. Next: edit $config_dir/gateway.yaml (identity provider, routes, TLS), then restart."
