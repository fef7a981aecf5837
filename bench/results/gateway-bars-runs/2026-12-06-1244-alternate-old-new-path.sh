#!/bin/bash
# Alternates main's relay (e891302, "old") and the spares relay (6fe6afc, "new"), both
# with the bench of 6fe6afc (request path timed by the engine's clock), light-latency.
set -u
for i in 1 2 3; do
  for which in old new; do
    echo "== $which $i start $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
    (cd /tmp/preconnect-$which && .venv/bin/python -m bench --no-build --phases light-latency --out /tmp/bench-path-$which-$i) > /tmp/bench-path-$which-$i.log 2>&1
    echo "== $which $i rc $? end $(date -u +%H:%M:%S)"
  done
done
