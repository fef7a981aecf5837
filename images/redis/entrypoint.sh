#!/bin/sh
# Write the config for this role from the environment, then run it in the foreground.
#   ROLE=master | replica | sentinel | exporter
#   REDIS_PASSWORD         requirepass / masterauth / sentinel auth-pass (required)
#   REDIS_MASTER_HOST      initial master's name (default redis-1)
#   SENTINEL_MASTER_NAME   default sglang-ha;  SENTINEL_QUORUM default 2
#   SENTINEL_DOWN_AFTER_MS default 5000;       SENTINEL_FAILOVER_TIMEOUT_MS default 15000
#   REDIS_MASTER_PORT      initial master's port (default 6379)
#   ANNOUNCE_HOST          the name other members should use for this one
#   ANNOUNCE_PORT          the port they should use, when published under another one
#   HA_REDIS_USERNAME      the agents' and relay's own ACL user (default sglang-ha)
#   HA_REDIS_PASSWORD      its password; without it no such user is created
set -eu

: "${REDIS_PASSWORD:?REDIS_PASSWORD must be set (run 'make secrets')}"
ROLE="${ROLE:-master}"
MASTER_HOST="${REDIS_MASTER_HOST:-redis-1}"
MASTER_PORT="${REDIS_MASTER_PORT:-6379}"
NAME="${SENTINEL_MASTER_NAME:-sglang-ha}"
ANNOUNCE="${ANNOUNCE_HOST:-$(hostname)}"
CONF=/data/${ROLE}.conf
umask 077

# The agents' and relay's user: their own keys and channels (sglang-ha:*), the data,
# pub/sub, scripting and transaction commands they use, nothing dangerous or admin
# (no FLUSHALL, CONFIG, KEYS, SHUTDOWN, REPLICAOF, ACL, DEBUG, FUNCTION...). The
# default user (REDIS_PASSWORD) stays for replication, Sentinel and health checks.
# tests/unit/test_hardening_redis_acl.py runs the lease store under exactly this rule.
SGLANG_HA_ACL="resetkeys ~sglang-ha:* resetchannels &sglang-ha:* -@all +@read +@write +@pubsub +@scripting +@transaction +@connection -@dangerous -@admin -function -script|flush -script|kill"
AGENT_USER="${HA_REDIS_USERNAME:-sglang-ha}"

agent_user() {
  if [ -n "${HA_REDIS_PASSWORD:-}" ]; then
    # Stored as a SHA-256 hash: the plain password is not written to the file.
    hash=$(printf '%s' "${HA_REDIS_PASSWORD}" | sha256sum | cut -d' ' -f1)
    echo "user ${AGENT_USER} on #${hash} ${SGLANG_HA_ACL}"
  fi
}

common() {
  cat <<CONF
bind * -::*
protected-mode no
dir /data
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
  agent_user
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
      cat > "${CONF}" <<CONF
port 26379
bind * -::*
protected-mode no
dir /data
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip ${ANNOUNCE}
${ANNOUNCE_PORT:+sentinel announce-port ${ANNOUNCE_PORT}}
requirepass "${REDIS_PASSWORD}"
sentinel sentinel-pass "${REDIS_PASSWORD}"
sentinel monitor ${NAME} ${MASTER_HOST} ${MASTER_PORT} ${SENTINEL_QUORUM:-2}
sentinel auth-pass ${NAME} "${REDIS_PASSWORD}"
sentinel down-after-milliseconds ${NAME} ${SENTINEL_DOWN_AFTER_MS:-5000}
sentinel failover-timeout ${NAME} ${SENTINEL_FAILOVER_TIMEOUT_MS:-15000}
sentinel parallel-syncs ${NAME} 1
CONF
    fi
    exec redis-sentinel "${CONF}"
    ;;
  exporter)
    # Multi-target: Prometheus asks /scrape?target=redis://<member>:6379 for each
    # member. The password is read from REDIS_PASSWORD, never put on a command line.
    exec prometheus-redis-exporter -web.listen-address ":9121" \
      -redis.addr "redis://${MASTER_HOST}:${MASTER_PORT}"
    ;;
  *)
    echo "ROLE must be master, replica, sentinel or exporter (got '${ROLE}')" >&2
    exit 2
    ;;
esac
