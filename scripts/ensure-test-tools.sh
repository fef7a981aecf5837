#!/usr/bin/env bash
# Programs the tests run for real: redis-server and redis-sentinel (unit tests), and
# nsenter + ip on the host to take a node's NIC down (integration tests), promtool
# (Debian's prometheus package) for the alert rules' tests.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
missing=()
have redis-server || missing+=(redis-server)
have redis-sentinel || missing+=(redis-sentinel)
have nsenter || missing+=(util-linux)
have ip || missing+=(iproute2)
have promtool || missing+=(prometheus)
have nginx || missing+=(nginx)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt_install "${missing[@]}"
fi
