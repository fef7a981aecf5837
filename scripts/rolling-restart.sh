#!/usr/bin/env bash
# Restart the nodes one after the other without failing a request:
# the primary hands over first (planned switchover), then each node restarts and
# must come back as a healthy standby before the next one goes.
#   PROJECT=sglang-ha STACK_FILES="compose/compose.yaml" scripts/rolling-restart.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
cd "$here/.."
project=${PROJECT:-sglang-ha}
read -r -a files <<<"${STACK_FILES:-compose/$(scripts/detect-stack.sh)}"
compose=(docker compose -p "$project")
for f in "${files[@]}"; do compose+=(-f "$f"); done
nodes=${NODES:-"node-1 node-2"}

# role_of SERVICE -> primary | standby | fenced | ... (from the node's own agent)
role_of() {
  "${compose[@]}" exec -T "$1" python3 -c \
    'import json,urllib.request as u; print(json.load(u.urlopen("http://127.0.0.1:8008/ha/status", timeout=3))["role"])' \
    2>/dev/null || echo unreachable
}
healthy_standby() {
  [ "$(role_of "$1")" = standby ] && "${compose[@]}" exec -T "$1" python3 -c \
    'import urllib.request as u; u.urlopen("http://127.0.0.1:8008/replica", timeout=3)' >/dev/null 2>&1
}

for svc in $nodes; do
  if [ "$(role_of "$svc")" = primary ]; then
    log "$svc is primary: planned switchover first"
    "${compose[@]}" exec -T "$svc" sglang-ha switchover
    # The switchover command waits for the hand-over; double-check before restarting.
    [ "$(role_of "$svc")" != primary ] || die "$svc is still primary after the switchover"
  fi
  log "restarting $svc"
  "${compose[@]}" restart "$svc" >/dev/null
  log "waiting for $svc to rejoin as a healthy standby"
  deadline=$((SECONDS + ${REJOIN_TIMEOUT:-300}))
  until healthy_standby "$svc"; do
    [ "$SECONDS" -ge "$deadline" ] && die "$svc did not come back as a healthy standby"
    sleep 1
  done
  log "$svc is back (standby)"
done
log "rolling restart done"
"${compose[@]}" exec -T node-1 sglang-ha status
