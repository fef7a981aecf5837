#!/bin/bash
# Alternates main's HEAD (old) and the spares commit (new), light-latency phase, in one hold of the lock.
set -u
for i in 1 2 3; do
  for which in old new; do
    echo "== $which $i start $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
    (cd /tmp/preconnect-$which && .venv/bin/python -m bench --no-build --phases light-latency --out /tmp/bench-lat-$which-$i) > /tmp/bench-lat-$which-$i.log 2>&1
    echo "== $which $i rc $? end $(date -u +%H:%M:%S)"
  done
done
