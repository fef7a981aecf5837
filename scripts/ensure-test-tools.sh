#!/usr/bin/env bash
# Programs the unit tests run for real: redis-server and redis-sentinel.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
missing=()
have redis-server || missing+=(redis-server)
have redis-sentinel || missing+=(redis-sentinel)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt_install "${missing[@]}"
fi
