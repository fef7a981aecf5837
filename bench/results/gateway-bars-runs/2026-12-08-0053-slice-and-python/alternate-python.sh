#!/bin/bash
# A/B: the relay on Python 3.11 (the venv's, as the bench) vs on 3.13, alternating.
cd /work/main
unset XP_SLICE_NS
for i in 1 2; do
  for s in py311 py313; do
    out=/tmp/s17/py-$i-$s; mkdir -p $out
    if [ $s = py313 ]; then export XP_RELAY_PYTHON=/tmp/s17/venv313/bin/python; else unset XP_RELAY_PYTHON; fi
    echo "== $(date -u +%H:%M:%S) run $i $s load $(cut -d' ' -f1 /proc/loadavg)"
    .venv/bin/python -m bench --no-build --phases light-latency --out $out > $out/log 2>&1
    grep -E "^\| [124] \|" $out/gateway-bars.md
  done
done
