#!/bin/bash
# The spares commit with 2 (default) and 4 spare connections per node, alternating.
set -u
for i in 1 2; do
  for n in 4 2; do
    echo "== spares$n $i start $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
    (cd /tmp/preconnect-new && HA_SPARE_CONNECTIONS=$n .venv/bin/python -m bench --no-build --phases light-latency --out /tmp/bench-lat-spares$n-$i) > /tmp/bench-lat-spares$n-$i.log 2>&1
    echo "== spares$n $i rc $? end $(date -u +%H:%M:%S)"
  done
done
