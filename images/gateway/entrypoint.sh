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
python3 -m ha_agent.gateway.nginx_conf
nginx -e stderr -t -c /run/sglang-ha/nginx.conf
exec supervisord -n -c /etc/sglang-ha/supervisord.conf
