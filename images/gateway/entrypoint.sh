#!/bin/sh
# Gateway entrypoint: render Nginx's config from the environment, then supervisord.
set -eu
# The Redis password: a secret file (HA_SECRETS_DIR, compose `secrets:`) or, across
# hosts, the environment.
if [ -z "${HA_REDIS_PASSWORD:-}" ] && [ ! -s "${HA_SECRETS_DIR:-/run/secrets}/ha_redis_password" ]; then
  echo "no Redis password: neither ${HA_SECRETS_DIR:-/run/secrets}/ha_redis_password nor" \
    "HA_REDIS_PASSWORD (run 'make secrets')" >&2
  exit 2
fi
mkdir -p /run/sglang-ha /var/log/sglang /var/lib/sglang-ha/nginx
# Relay workers: HA_RELAY_WORKERS, or the CPUs this container may use. Their metrics
# are summed through files in PROMETHEUS_MULTIPROC_DIR (fresh at every start).
HA_RELAY_WORKERS="$(python3 -m ha_agent.gateway.edge.workers)"
export HA_RELAY_WORKERS
export PROMETHEUS_MULTIPROC_DIR=/run/sglang-ha/relay-metrics
rm -rf "$PROMETHEUS_MULTIPROC_DIR"
mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
# Each worker's heartbeat, which the watchdog reads (gateway/edge/watchdog.py).
export HA_HEARTBEAT_DIR=/run/sglang-ha/relay-heartbeat
rm -rf "$HA_HEARTBEAT_DIR"
# A query of death one worker quarantined is refused by all (gateway/admission/quarantine.py).
export HA_QUARANTINE_DIR=/run/sglang-ha/quarantine
rm -rf "$HA_QUARANTINE_DIR"
python3 -m ha_agent.gateway.edge.nginx_conf
nginx -e stderr -t -c /run/sglang-ha/nginx.conf
exec supervisord -n -c /etc/sglang-ha/supervisord.conf
