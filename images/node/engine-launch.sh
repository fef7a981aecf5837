#!/bin/sh
# Start the engine in the foreground for supervisord. The first line marks a new run
# in the stderr log, so the agent reads only this run's output (OOM detection).
#
# SGLang runs in the base image's own Python (ENGINE_PYTHON, /usr/bin/python3 on the
# official image), never the agent's venv. Its API key comes from a file (a compose
# secret), not the environment; SGLang takes it only as --api-key (server_args.py),
# so it is visible in this container's process list, nowhere else.
set -eu
# exec keeps the pid: the marker names the engine process that supervisord reports.
echo "sglang-ha: engine starting ENGINE=${ENGINE} (pid $$)" >&2
case "${ENGINE}" in
  simulator)
    exec /opt/sglang-ha/bin/sglang-ha-sim --host 0.0.0.0 --port "${ENGINE_PORT}"
    ;;
  sglang)
    py="${ENGINE_PYTHON:-/usr/bin/python3}"
    key_file="${ENGINE_API_KEY_FILE:-${HA_ENGINE_API_KEY_FILE:-}}"
    if [ -n "${key_file}" ]; then
      if [ ! -r "${key_file}" ]; then
        echo "engine API key file ${key_file} is not readable" >&2
        exit 2
      fi
      key=$(cat "${key_file}")
      # shellcheck disable=SC2086  # SGLANG_EXTRA_ARGS is a list of flags
      exec "${py}" -m sglang.launch_server \
        --model-path "${MODEL_PATH}" \
        --tp-size "${TP_SIZE:-1}" \
        --host 0.0.0.0 --port "${ENGINE_PORT}" \
        --enable-metrics \
        --api-key "${key}" \
        ${SGLANG_EXTRA_ARGS:-}
    fi
    # shellcheck disable=SC2086
    exec "${py}" -m sglang.launch_server \
      --model-path "${MODEL_PATH}" \
      --tp-size "${TP_SIZE:-1}" \
      --host 0.0.0.0 --port "${ENGINE_PORT}" \
      --enable-metrics \
      ${SGLANG_EXTRA_ARGS:-}
    ;;
esac
echo "no engine to start for ENGINE=${ENGINE}" >&2
exit 2
