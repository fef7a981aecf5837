#!/usr/bin/env bash
# After `make up`: where the stack answers and how to try it.
set -euo pipefail
project=${1:-sglang-ha}; stack=${2:-compose.yaml}
port=$(docker compose -p "$project" -f "compose/$stack" port gateway 8000 2>/dev/null || true)
port=${port:-127.0.0.1:8000}
cat <<MSG

sglang-ha is up ($stack).
  OpenAI-compatible endpoint:  http://$port/v1
  Try:    curl -s http://$port/v1/chat/completions -H 'Content-Type: application/json' \\
            -d '{"model":"default","messages":[{"role":"user","content":"Hello"}]}'
  Status: make status        HA log: docker compose -p $project -f compose/$stack exec node-1 cat /var/log/sglang/ha.log
  Stop:   make down
MSG
