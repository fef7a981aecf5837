#!/bin/sh
# Node entrypoint: check the settings, then hand over to supervisord.
#
# The image's user is `sglang`. The GPU stack starts it as root (compose `user: "0"`)
# only so that this script can make the model cache writable: a bind mount whose host
# folder did not exist is created by Docker, owned by root (and on Ubuntu 24.04 based
# images uid 1000 is `ubuntu`, so our uid is not known in advance). It then runs
# itself again as `sglang` (setpriv from util-linux: no setuid helper), keeping the
# supplementary groups given with `group_add` (the Docker socket's, for the sidecar).
# Only tini (PID 1) stays root.
set -eu

RUN_AS="${SGLANG_HA_USER:-sglang}"
if [ "$(id -u)" = 0 ] && [ "${SGLANG_HA_AS_ROOT:-0}" != 1 ]; then
  as_user() { setpriv --reuid="$RUN_AS" --regid="$RUN_AS" --clear-groups "$@"; }
  for dir in "${HF_HOME:-/data/huggingface}" /var/log/sglang /run/sglang-ha; do
    mkdir -p "$dir"
    if as_user test -w "$dir"; then continue; fi
    if [ -z "$(ls -A "$dir")" ]; then
      chown "$RUN_AS:" "$dir"  # empty: just created (by us or by Docker for a bind mount)
    else
      # Never re-own a user's existing files behind their back: say what to run.
      echo "$dir is not writable by $RUN_AS (uid $(id -u "$RUN_AS")) and not empty;" \
        "on the host: sudo chown -R $(id -u "$RUN_AS") <the folder mounted there>" >&2
      exit 2
    fi
  done
  # supervisord reopens /dev/stdout for the agent's log: let the user open the
  # container's stdout/stderr pipes too.
  chown --dereference "$RUN_AS" /proc/self/fd/1 /proc/self/fd/2 2>/dev/null || true
  groups=$( { id -G; id -G "$RUN_AS"; } | tr ' ' '\n' | grep -vx 0 | sort -un | paste -sd, -)
  HOME=$(getent passwd "$RUN_AS" | cut -d: -f6)
  export HOME USER="$RUN_AS" LOGNAME="$RUN_AS"
  if [ -n "$groups" ]; then
    exec setpriv --reuid="$RUN_AS" --regid="$RUN_AS" --groups="$groups" "$0" "$@"
  fi
  exec setpriv --reuid="$RUN_AS" --regid="$RUN_AS" --clear-groups "$0" "$@"
fi

# A command given to the container (`docker compose run node-1 <cmd>`, e.g. `make
# models`) runs instead of the node, as the unprivileged user.
if [ "$#" -gt 0 ]; then exec "$@"; fi

: "${HA_NODE_NAME:?HA_NODE_NAME must name this node (e.g. sglang-01)}"
if [ "${ENGINE}" = sglang ] && [ ! -w "${HF_HOME:-/data/huggingface}" ]; then
  echo "model cache ${HF_HOME:-/data/huggingface} is not writable by $(id -un) (uid $(id -u)):" \
    "start the container as root (compose: user: \"0\"; the entrypoint then fixes it and" \
    "drops to sglang) or chown the host folder to uid $(id -u)" >&2
  exit 2
fi
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
# The Redis password: a secret file (HA_SECRETS_DIR, compose `secrets:`) or, across
# hosts, the environment.
if [ -z "${HA_REDIS_PASSWORD:-}" ] && [ ! -s "${HA_SECRETS_DIR:-/run/secrets}/ha_redis_password" ]; then
  echo "no Redis password: neither ${HA_SECRETS_DIR:-/run/secrets}/ha_redis_password nor" \
    "HA_REDIS_PASSWORD (run 'make secrets')" >&2
  exit 2
fi
mkdir -p /var/log/sglang /run/sglang-ha
exec /opt/sglang-ha/bin/supervisord -n -c /etc/sglang-ha/supervisord.conf
