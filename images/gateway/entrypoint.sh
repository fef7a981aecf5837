#!/bin/sh
# Gateway entrypoint: render Nginx's config from the environment, then supervisord.
set -eu
if [ -z "${HA_REDIS_PASSWORD:-}" ]; then
  echo "HA_REDIS_PASSWORD is not set: Redis is password-protected (run 'make secrets')" >&2
  exit 2
fi
mkdir -p /run/sglang-ha /var/log/sglang /var/lib/sglang-ha/nginx
python3 -m ha_agent.gateway.nginx_conf
nginx -e stderr -t -c /run/sglang-ha/nginx.conf
exec supervisord -n -c /etc/sglang-ha/supervisord.conf
