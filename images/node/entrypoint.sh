#!/bin/sh
# Node entrypoint: check the settings, then hand over to supervisord.
set -eu

: "${HA_NODE_NAME:?HA_NODE_NAME must name this node (e.g. sglang-01)}"
case "${ENGINE}" in
  simulator|sglang) export ENGINE_AUTOSTART=true ;;
  external)
    # Sidecar mode: the user runs SGLang; we only watch it over HTTP.
    export ENGINE_AUTOSTART=false
    export HA_SUPERVISOR_SOCKET=""
    : "${HA_ENGINE_URL:?ENGINE=external needs HA_ENGINE_URL (the engine you run)}"
    ;;
  *) echo "ENGINE must be sglang, simulator or external (got '${ENGINE}')" >&2; exit 2 ;;
esac
if [ "${ENGINE}" = sglang ]; then
  : "${MODEL_PATH:?ENGINE=sglang needs MODEL_PATH (a Hugging Face id or a local path)}"
fi
if [ -z "${HA_REDIS_PASSWORD:-}" ]; then
  echo "HA_REDIS_PASSWORD is not set: Redis is password-protected (run 'make secrets')" >&2
  exit 2
fi
mkdir -p /var/log/sglang /run/sglang-ha
exec supervisord -n -c /etc/sglang-ha/supervisord.conf
