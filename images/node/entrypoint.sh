#!/bin/sh
# Node entrypoint: check the settings, then hand over to supervisord.
set -eu

: "${HA_NODE_NAME:?HA_NODE_NAME must name this node (e.g. sglang-01)}"
case "${ENGINE}" in
  simulator|sglang) export ENGINE_AUTOSTART=true ;;
  external)
    # Sidecar mode: the user runs SGLang; we watch it over HTTP, and through the
    # Docker API (HA_ENGINE_CONTAINER) or /proc (HA_ENGINE_PID / HA_ENGINE_PROCESS,
    # with --pid=host) when one is named, to tell a crash from an OOM kill.
    export ENGINE_AUTOSTART=false
    export HA_SUPERVISOR_SOCKET=""
    : "${HA_ENGINE_URL:?ENGINE=external needs HA_ENGINE_URL (the engine you run)}"
    if [ -n "${HA_ENGINE_CONTAINER:-}" ]; then
      sock="${HA_DOCKER_HOST:-unix:///var/run/docker.sock}"
      case "${sock}" in
        unix://*)
          if [ ! -r "${sock#unix://}" ] || [ ! -w "${sock#unix://}" ]; then
            echo "warning: HA_ENGINE_CONTAINER=${HA_ENGINE_CONTAINER} but ${sock#unix://} is not" \
              "usable by uid $(id -u) (mount it and add its group: DOCKER_GID);" \
              "falling back to HTTP signals only" >&2
          fi
          ;;
      esac
    elif [ -z "${HA_ENGINE_PID:-}${HA_ENGINE_PROCESS:-}" ]; then
      echo "note: no HA_ENGINE_CONTAINER / HA_ENGINE_PROCESS: engine judged over HTTP only" \
        "(a crash and an OOM kill look alike)" >&2
    fi
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
