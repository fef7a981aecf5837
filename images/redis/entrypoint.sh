#!/bin/sh
# Write the config for this role from its secrets, then run it in the foreground.
#   ROLE=master | replica | sentinel | exporter
# Secrets: the compose secret file /run/secrets/NAME when mounted, else the variable
# (multi-host stacks still pass secrets.env). Each role gets only what it needs:
#   redis_password (REDIS_PASSWORD)          the default (admin) user: master, replica,
#                                            exporter
#   ha_redis_password.sha256 (HA_REDIS_PASSWORD, hashed here)
#                                            the agents' and relay's ACL user
#   redis_sentinel_password.sha256 (REDIS_SENTINEL_PASSWORD, hashed here)
#                                            the Sentinels' ACL user `sentinel`
#   ha_sentinel_password (HA_SENTINEL_PASSWORD) a Sentinel's own requirepass
#   redis_sentinel_password (REDIS_SENTINEL_PASSWORD) what a Sentinel logs in with
#                                            (without it: REDIS_PASSWORD, as before)
#   EXPORTER_REDIS, EXPORTER_SENTINELS  what the exporter scrapes, host:port, comma
#                          separated (defaults: this stack's members)
#   REDIS_DATA_DIR         config and replication files (default /data)
#   REDIS_MASTER_HOST      initial master's name (default redis-1)
#   SENTINEL_MASTER_NAME   default sglang-ha;  SENTINEL_QUORUM default 2
#   SENTINEL_DOWN_AFTER_MS default 5000;       SENTINEL_FAILOVER_TIMEOUT_MS default 15000
#   REDIS_MASTER_PORT      initial master's port (default 6379)
#   ANNOUNCE_HOST          the name other members should use for this one
#   ANNOUNCE_PORT          the port they should use, when published under another one
#   HA_REDIS_USERNAME      the agents' and relay's own ACL user (default sglang-ha)
set -eu

ROLE="${ROLE:-master}"

secret() {  # NAME VAR: /run/secrets/NAME if mounted, else $VAR (may be empty)
  if [ -r "/run/secrets/$1" ]; then cat "/run/secrets/$1"; else eval "printf '%s' \"\${$2:-}\""; fi
}
hashed() {  # NAME VAR: the SHA-256 of a password: NAME.sha256 if mounted, else of $VAR
  if [ -r "/run/secrets/$1.sha256" ]; then cat "/run/secrets/$1.sha256"; return; fi
  plain=$(eval "printf '%s' \"\${$2:-}\"")
  if [ -n "$plain" ]; then printf '%s' "$plain" | sha256sum | cut -d' ' -f1; fi
}
need() {  # VALUE WHAT
  if [ -z "$1" ]; then echo "$2 is not set (run 'make secrets')" >&2; exit 2; fi
}
MASTER_HOST="${REDIS_MASTER_HOST:-redis-1}"
MASTER_PORT="${REDIS_MASTER_PORT:-6379}"
NAME="${SENTINEL_MASTER_NAME:-sglang-ha}"
ANNOUNCE="${ANNOUNCE_HOST:-$(hostname)}"
# The working folder: /data, or a tmpfs the stack mounts for a read-only root.
DIR="${REDIS_DATA_DIR:-/data}"
CONF=${DIR}/${ROLE}.conf
cd "${DIR}"
umask 077

# The agents' and relay's user: their own keys and channels (sglang-ha:*), the data,
# pub/sub, scripting and transaction commands they use, nothing dangerous or admin
# (no FLUSHALL, CONFIG, KEYS, SHUTDOWN, REPLICAOF, ACL, DEBUG, FUNCTION...). The
# default user (redis_password) stays for replication and health checks.
# tests/unit/test_hardening_redis_acl.py runs the lease store under exactly this rule.
SGLANG_HA_ACL="resetkeys ~sglang-ha:* resetchannels &sglang-ha:* -@all +@read +@write +@pubsub +@scripting +@transaction +@connection -@dangerous -@admin -function -script|flush -script|kill"
AGENT_USER="${HA_REDIS_USERNAME:-sglang-ha}"

# The Sentinels' user: what monitoring and a failover need (Redis's Sentinel docs,
# "Redis Access Control List authentication"), no data and no other admin command.
SENTINEL_ACL="resetchannels &* -@all +multi +exec +ping +info +role +publish +subscribe +slaveof +replicaof +config|rewrite +client|setname +client|kill +script|kill"

acl_users() {
  # Stored as SHA-256 hashes: the plain passwords are not in this container at all.
  hash=$(hashed ha_redis_password HA_REDIS_PASSWORD)
  if [ -n "$hash" ]; then echo "user ${AGENT_USER} on #${hash} ${SGLANG_HA_ACL}"; fi
  hash=$(hashed redis_sentinel_password REDIS_SENTINEL_PASSWORD)
  if [ -n "$hash" ]; then echo "user sentinel on #${hash} ${SENTINEL_ACL}"; fi
}

common() {
  REDIS_PASSWORD=$(secret redis_password REDIS_PASSWORD)
  need "$REDIS_PASSWORD" "the Redis password (redis_password / REDIS_PASSWORD)"
  cat <<CONF
bind * -::*
protected-mode no
dir ${DIR}
requirepass "${REDIS_PASSWORD}"
masterauth "${REDIS_PASSWORD}"
replica-announce-ip ${ANNOUNCE}
${ANNOUNCE_PORT:+replica-announce-port ${ANNOUNCE_PORT}}
# Coordination data is tiny and rebuilt within a lease TTL; durability comes from
# the replica, so keep the disk out of the latency path.
appendonly no
save ""
maxmemory 64mb
maxmemory-policy noeviction
CONF
  acl_users
}

case "${ROLE}" in
  master)
    common > "${CONF}"
    exec redis-server "${CONF}"
    ;;
  replica)
    common > "${CONF}"
    echo "replicaof ${MASTER_HOST} ${MASTER_PORT}" >> "${CONF}"
    exec redis-server "${CONF}"
    ;;
  sentinel)
    # Sentinel rewrites its own file; start from a fresh one only the first time.
    if [ ! -s "${CONF}" ]; then
      own=$(secret ha_sentinel_password HA_SENTINEL_PASSWORD)
      login=$(secret redis_sentinel_password REDIS_SENTINEL_PASSWORD)
      if [ -n "$login" ]; then user="sentinel auth-user ${NAME} sentinel"; else
        # An older secrets.env: the admin password, as before.
        login=$(secret redis_password REDIS_PASSWORD)
        user=""
      fi
      need "$login" "the Sentinels' Redis password (redis_sentinel_password)"
      if [ -z "$own" ]; then own="$login"; fi
      cat > "${CONF}" <<CONF
port 26379
bind * -::*
protected-mode no
dir ${DIR}
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip ${ANNOUNCE}
${ANNOUNCE_PORT:+sentinel announce-port ${ANNOUNCE_PORT}}
requirepass "${own}"
sentinel sentinel-pass "${own}"
sentinel monitor ${NAME} ${MASTER_HOST} ${MASTER_PORT} ${SENTINEL_QUORUM:-2}
${user}
sentinel auth-pass ${NAME} "${login}"
sentinel down-after-milliseconds ${NAME} ${SENTINEL_DOWN_AFTER_MS:-5000}
sentinel failover-timeout ${NAME} ${SENTINEL_FAILOVER_TIMEOUT_MS:-15000}
sentinel parallel-syncs ${NAME} 1
CONF
    fi
    exec redis-sentinel "${CONF}"
    ;;
  exporter)
    # Multi-target: Prometheus asks /scrape?target=redis://<member>:6379 for each
    # member. The password is read from REDIS_PASSWORD, never put on a command line:
    # exported to this process only, not the container's configuration.
    REDIS_PASSWORD=$(secret redis_password REDIS_PASSWORD)
    need "$REDIS_PASSWORD" "the Redis password (redis_password / REDIS_PASSWORD)"
    # The Sentinels have their own password: a per-target map. The exporter reads the
    # map only when no single password is set, so it names every target.
    sentinel_pw=$(secret ha_sentinel_password HA_SENTINEL_PASSWORD)
    if [ -n "$sentinel_pw" ]; then
      map=/tmp/redis-exporter-passwords.json
      sep="{"
      : > "$map.new"
      for target in $(echo "${EXPORTER_REDIS:-${MASTER_HOST}:${MASTER_PORT},redis-2:6379}" | tr ',' ' '); do
        printf '%s"redis://%s": "%s"' "$sep" "$target" "$REDIS_PASSWORD" >> "$map.new"
        sep=", "
      done
      for target in $(echo "${EXPORTER_SENTINELS:-sentinel-1:26379,sentinel-2:26379,sentinel-3:26379}" | tr ',' ' '); do
        printf '%s"redis://%s": "%s"' "$sep" "$target" "$sentinel_pw" >> "$map.new"
      done
      echo "}" >> "$map.new"
      mv "$map.new" "$map"
      unset REDIS_PASSWORD
      set -- -redis.password-file "$map"
    else
      export REDIS_PASSWORD
    fi
    exec prometheus-redis-exporter "$@" -web.listen-address ":9121" \
      -redis.addr "redis://${MASTER_HOST}:${MASTER_PORT}"
    ;;
  *)
    echo "ROLE must be master, replica, sentinel or exporter (got '${ROLE}')" >&2
    exit 2
    ;;
esac
