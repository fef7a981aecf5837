#!/bin/sh
# Start the engine in the foreground for supervisord. The first line marks a new run
# in the stderr log, so the agent reads only this run's output (OOM detection).
#
# SGLang runs in the base image's own Python (ENGINE_PYTHON, /usr/bin/python3 on the
# official image), never in the agent's venv. Its API key comes from a file (a compose
# secret, HA_ENGINE_API_KEY_FILE), the one the agent presents too. SGLang takes the
# key only as --api-key (python/sglang/srt/server_args.py), so it shows in this
# container's process list; it is in no environment and no `docker inspect`.
set -eu
# exec keeps the pid: the marker names the engine process that supervisord reports.
echo "sglang-ha: engine starting ENGINE=${ENGINE} (pid $$)" >&2
case "${ENGINE}" in
  simulator)
    exec /opt/sglang-ha/bin/sglang-ha-sim --host 0.0.0.0 --port "${ENGINE_PORT}"
    ;;
  sglang)
    set -- --model-path "${MODEL_PATH}" --tp-size "${TP_SIZE:-1}" \
      --host 0.0.0.0 --port "${ENGINE_PORT}" --enable-metrics
    if [ -n "${HA_ENGINE_API_KEY_FILE:-}" ]; then
      if [ ! -r "${HA_ENGINE_API_KEY_FILE}" ]; then
        echo "HA_ENGINE_API_KEY_FILE=${HA_ENGINE_API_KEY_FILE} is not readable by $(id -un)" >&2
        exit 2
      fi
      set -- "$@" --api-key "$(cat "${HA_ENGINE_API_KEY_FILE}")"
    elif [ -n "${HA_ENGINE_API_KEY:-}" ]; then
      set -- "$@" --api-key "${HA_ENGINE_API_KEY}"
    fi
    # --admin-api-key guards admin routes, /abort_request included: the agent and the
    # relay present it from the same file (HA_ENGINE_ADMIN_API_KEY_FILE).
    if [ -n "${HA_ENGINE_ADMIN_API_KEY_FILE:-}" ]; then
      if [ ! -r "${HA_ENGINE_ADMIN_API_KEY_FILE}" ]; then
        echo "HA_ENGINE_ADMIN_API_KEY_FILE=${HA_ENGINE_ADMIN_API_KEY_FILE} is not readable by $(id -un)" >&2
        exit 2
      fi
      set -- "$@" --admin-api-key "$(cat "${HA_ENGINE_ADMIN_API_KEY_FILE}")"
    fi
    # shellcheck disable=SC2086  # SGLANG_EXTRA_ARGS is a list of flags
    exec "${ENGINE_PYTHON:-/usr/bin/python3}" -m sglang.launch_server "$@" ${SGLANG_EXTRA_ARGS:-}
    ;;
esac
echo "no engine to start for ENGINE=${ENGINE}" >&2
exit 2
