#!/usr/bin/env bash
# Makes the throw-away secrets the compose demo (deploy/compose.yaml) needs, in deploy/secrets/
# (or $1): a demo CA and a TLS certificate for the demo identity provider (idp.tabiji.test), the
# OIDC client secret shared by the gateway and the demo provider, and random Redis and PostgreSQL
# passwords in compose.env. Nothing here is ever committed (the directory ignores itself) or
# built into an image (.containerignore). Run it once; it refuses to overwrite existing secrets.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/../secrets}"
uid=10001  # the gateway image's user (deploy/Containerfile) reads the client secret
nginx_uid=33  # www-data, the user nginx runs as in container/nginx.Containerfile, reads the TLS key

if [ -e "$out/compose.env" ]; then
  echo "$out already holds demo secrets; remove the directory to make new ones." >&2
  exit 1
fi
command -v openssl >/dev/null || { echo "openssl is needed" >&2; exit 2; }
mkdir -p "$out"
chmod 0700 "$out"
printf '*\n' >"$out/.gitignore"
cd "$out"
umask 077

openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -days 30 \
  -subj "/CN=Tabiji demo CA (throw-away)" -keyout ca.key -out ca.pem \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  2>/dev/null
openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
  -subj "/CN=idp.tabiji.test" -keyout idp.key -out idp.csr 2>/dev/null
printf 'subjectAltName=DNS:idp.tabiji.test\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' >idp.ext
openssl x509 -req -in idp.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 \
  -extfile idp.ext -out idp.pem 2>/dev/null
rm -f idp.csr idp.ext ca.srl ca.key  # the CA signs nothing else: its key is not kept
chmod 0644 ca.pem idp.pem

openssl rand -hex 32 >client.secret
{
  echo "TABIJI_REDIS_PASSWORD=$(openssl rand -hex 24)"
  echo "TABIJI_DB_PASSWORD=$(openssl rand -hex 24)"
} >compose.env

# Secrets stay 0600 but must belong to the user that reads them, as the container sees it.
own() {
  if [ "$(id -u)" = 0 ]; then chown "$1:$1" "$2"; else podman unshare chown "$1:$1" "$2"; fi
}
own "$uid" client.secret
own "$nginx_uid" idp.key
echo "demo secrets written to $out" >&2
