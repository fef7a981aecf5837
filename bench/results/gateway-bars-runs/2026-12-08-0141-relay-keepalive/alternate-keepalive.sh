#!/bin/bash
# A/B: the gateway's Nginx with and without its cache of idle relay connections.
cd /tmp/s17/tree
for i in 1 2; do
  for s in off on; do
    out=/tmp/s17/ka-$i-$s; mkdir -p $out
    if [ $s = off ]; then export XP_NO_RELAY_KEEPALIVE=1; else unset XP_NO_RELAY_KEEPALIVE; fi
    echo "== $(date -u +%H:%M:%S) run $i keepalive $s load $(cut -d' ' -f1 /proc/loadavg)"
    /work/main/.venv/bin/python -m bench --no-build --phases light-latency --out $out > $out/log 2>&1
    grep -E "^\| [124] \|" $out/gateway-bars.md | sed -n 4,6p
  done
done
