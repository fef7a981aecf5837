#!/usr/bin/env bash
# After `make up`: where the stack answers and how to try it.
set -euo pipefail
project=${1:-sglang-ha}; stack=${2:-compose.yaml}
port=$(docker compose -p "$project" -f "compose/$stack" port gateway 8000 2>/dev/null || true)
port=${port:-127.0.0.1:8000}
port=${port/#0.0.0.0:/127.0.0.1:}
ca=compose/secrets/tls_ca.crt
# TLS at the edge (GATEWAY_TLS; on by default beyond loopback): a handshake answers.
if curl -sk -o /dev/null -m 3 "https://$port/health" 2>/dev/null; then
  scheme=https; cacert="--cacert $ca "
  tls_line="  TLS:    on; clients trust $ca (the stack's CA) or your own CA's certificate"
else
  scheme=http; cacert=""
  tls_line="  TLS:    off (GATEWAY_TLS; on by default wherever GATEWAY_BIND is beyond loopback)"
fi
cat <<MSG

sglang-ha is up ($stack).
  OpenAI-compatible endpoint:  $scheme://$port/v1
$tls_line
  Try:    curl -s ${cacert}$scheme://$port/v1/chat/completions -H 'Content-Type: application/json' \\
            -d '{"model":"default","messages":[{"role":"user","content":"Hello"}]}'
  Status: make status        HA log: docker compose -p $project -f compose/$stack exec node-1 cat /var/log/sglang/ha.log
  Stop:   make down
MSG
