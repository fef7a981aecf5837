#!/bin/sh
# Start the engine in the foreground for supervisord. The first line marks a new run
# in the stderr log, so the agent reads only this run's output (OOM detection).
set -eu
# exec keeps the pid: the marker names the engine process that supervisord reports.
echo "sglang-ha: engine starting ENGINE=${ENGINE} (pid $$)" >&2
case "${ENGINE}" in
  simulator)
    exec sglang-ha-sim --host 0.0.0.0 --port "${ENGINE_PORT}"
    ;;
  sglang)
    # shellcheck disable=SC2086  # SGLANG_EXTRA_ARGS is a list of flags
    exec python3 -m sglang.launch_server \
      --model-path "${MODEL_PATH}" \
      --tp-size "${TP_SIZE:-1}" \
      --host 0.0.0.0 --port "${ENGINE_PORT}" \
      --enable-metrics \
      ${SGLANG_EXTRA_ARGS:-}
    ;;
esac
echo "no engine to start for ENGINE=${ENGINE}" >&2
exit 2
