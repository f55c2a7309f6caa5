#!/bin/sh
# Writes redis.conf to tmpfs (/tmp) with the password from the environment, then runs
# redis-server: append-only persistence in the /var/lib/redis volume, all interfaces of the
# container's private network, no protected mode (a password is required instead).
set -eu
: "${REDIS_PASSWORD:?set REDIS_PASSWORD}"
umask 077
conf=/tmp/redis.conf
cat >"$conf" <<CONF
bind 0.0.0.0
port 6379
protected-mode no
requirepass $REDIS_PASSWORD
dir /var/lib/redis
appendonly yes
save ""
logfile ""
CONF
exec redis-server "$conf"
