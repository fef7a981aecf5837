#!/bin/sh
# Write the config for this role from the environment, then run it in the foreground.
#   ROLE=master | replica | sentinel | exporter
#   REDIS_PASSWORD         requirepass / masterauth / sentinel auth-pass (required)
#   REDIS_MASTER_HOST      initial master's name (default redis-1)
#   SENTINEL_MASTER_NAME   default sglang-ha;  SENTINEL_QUORUM default 2
#   SENTINEL_DOWN_AFTER_MS default 5000;       SENTINEL_FAILOVER_TIMEOUT_MS default 15000
#   ANNOUNCE_HOST          the name other members should use for this one
set -eu

: "${REDIS_PASSWORD:?REDIS_PASSWORD must be set (run 'make secrets')}"
ROLE="${ROLE:-master}"
MASTER_HOST="${REDIS_MASTER_HOST:-redis-1}"
NAME="${SENTINEL_MASTER_NAME:-sglang-ha}"
ANNOUNCE="${ANNOUNCE_HOST:-$(hostname)}"
CONF=/data/${ROLE}.conf
umask 077

common() {
  cat <<CONF
bind * -::*
protected-mode no
dir /data
requirepass "${REDIS_PASSWORD}"
masterauth "${REDIS_PASSWORD}"
replica-announce-ip ${ANNOUNCE}
# Coordination data is tiny and rebuilt within a lease TTL; durability comes from
# the replica, so keep the disk out of the latency path.
appendonly no
save ""
maxmemory 64mb
maxmemory-policy noeviction
CONF
}

case "${ROLE}" in
  master)
    common > "${CONF}"
    exec redis-server "${CONF}"
    ;;
  replica)
    common > "${CONF}"
    echo "replicaof ${MASTER_HOST} 6379" >> "${CONF}"
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
requirepass "${REDIS_PASSWORD}"
sentinel sentinel-pass "${REDIS_PASSWORD}"
sentinel monitor ${NAME} ${MASTER_HOST} 6379 ${SENTINEL_QUORUM:-2}
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
      -redis.addr "redis://${MASTER_HOST}:6379"
    ;;
  *)
    echo "ROLE must be master, replica, sentinel or exporter (got '${ROLE}')" >&2
    exit 2
    ;;
esac
