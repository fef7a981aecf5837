#!/bin/sh
# Start the engine in the foreground for supervisord. The first line marks a new run
# in the stderr log, so the agent reads only this run's output (OOM detection).
#
# SGLang runs in the base image's own Python (ENGINE_PYTHON, /usr/bin/python3 on the
# official image), never in the agent's venv. Its API key comes from a file (a compose
# secret, HA_ENGINE_API_KEY_FILE), the one the agent presents too. SGLang takes the
# key only as --api-key (python/sglang/srt/server_args.py), so it shows in this
# container's process list; it is in no environment and no `docker inspect`. Keys go
# as --api-key=KEY: a key that begins with "-" (1 in 64 of those scripts/secrets.sh
# makes) given as a separate word is taken by SGLang's argparse for a flag, and the
# engine exits 2 at every start.
#
# TLS: when the agent reaches its engine over https (HA_ENGINE_URL, set so by
# compose/node-host.yaml), the engine serves it with SGLang's own flags, the
# certificate and key from files (ENGINE_SSL_CERTFILE, ENGINE_SSL_KEYFILE: compose
# secrets), reloaded when they change (--enable-ssl-refresh), the agent's CA as
# --ssl-ca-certs. The simulator takes the same flags.
set -eu
# exec keeps the pid: the marker names the engine process that supervisord reports.
echo "sglang-ha: engine starting ENGINE=${ENGINE} (pid $$)" >&2
tls=""
case "${HA_ENGINE_URL:-}" in
  https:*)
    for f in "${ENGINE_SSL_CERTFILE:-}" "${ENGINE_SSL_KEYFILE:-}"; do
      if [ -z "$f" ] || [ ! -r "$f" ]; then
        echo "HA_ENGINE_URL is https: ENGINE_SSL_CERTFILE and ENGINE_SSL_KEYFILE must name files $(id -un) can read (got '$f')" >&2
        exit 2
      fi
    done
    tls="--ssl-certfile ${ENGINE_SSL_CERTFILE} --ssl-keyfile ${ENGINE_SSL_KEYFILE} --enable-ssl-refresh"
    # SGLang's own warm-up request to itself (https://127.0.0.1) then verifies with the
    # stack's CA instead of turning verification off (serving_hook.py, ssl_verify_of).
    if [ -n "${HA_ENGINE_TLS_CA_FILE:-}" ]; then
      tls="$tls --ssl-ca-certs ${HA_ENGINE_TLS_CA_FILE}"
    fi
    ;;
esac
case "${ENGINE}" in
  simulator)
    # shellcheck disable=SC2086  # $tls is a list of flags (paths without spaces)
    exec /opt/sglang-ha/bin/sglang-ha-sim --host 0.0.0.0 --port "${ENGINE_PORT}" $tls
    ;;
  sglang)
    # shellcheck disable=SC2086
    set -- --model-path "${MODEL_PATH}" --tp-size "${TP_SIZE:-1}" \
      --host 0.0.0.0 --port "${ENGINE_PORT}" --enable-metrics $tls
    if [ -n "${HA_ENGINE_API_KEY_FILE:-}" ]; then
      if [ ! -r "${HA_ENGINE_API_KEY_FILE}" ]; then
        echo "HA_ENGINE_API_KEY_FILE=${HA_ENGINE_API_KEY_FILE} is not readable by $(id -un)" >&2
        exit 2
      fi
      set -- "$@" "--api-key=$(cat "${HA_ENGINE_API_KEY_FILE}")"
    elif [ -n "${HA_ENGINE_API_KEY:-}" ]; then
      set -- "$@" "--api-key=${HA_ENGINE_API_KEY}"
    fi
    # --admin-api-key guards admin routes, /abort_request included: the agent and the
    # relay present it from the same file (HA_ENGINE_ADMIN_API_KEY_FILE).
    if [ -n "${HA_ENGINE_ADMIN_API_KEY_FILE:-}" ]; then
      if [ ! -r "${HA_ENGINE_ADMIN_API_KEY_FILE}" ]; then
        echo "HA_ENGINE_ADMIN_API_KEY_FILE=${HA_ENGINE_ADMIN_API_KEY_FILE} is not readable by $(id -un)" >&2
        exit 2
      fi
      set -- "$@" "--admin-api-key=$(cat "${HA_ENGINE_ADMIN_API_KEY_FILE}")"
    fi
    # shellcheck disable=SC2086  # SGLANG_EXTRA_ARGS is a list of flags
    exec "${ENGINE_PYTHON:-/usr/bin/python3}" -m sglang.launch_server "$@" ${SGLANG_EXTRA_ARGS:-}
    ;;
esac
echo "no engine to start for ENGINE=${ENGINE}" >&2
exit 2
