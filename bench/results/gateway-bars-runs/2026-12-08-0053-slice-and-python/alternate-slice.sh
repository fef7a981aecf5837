#!/bin/bash
# A/B: relay default slice vs 0.1 ms slice, alternating, light-latency phase alone.
cd /work/main
for i in 1 2; do
  for s in default short; do
    out=/tmp/s17/ll-$i-$s; mkdir -p $out
    if [ $s = short ]; then export XP_SLICE_NS=100000; else unset XP_SLICE_NS; fi
    echo "== $(date -u +%H:%M:%S) run $i $s load $(cut -d' ' -f1 /proc/loadavg)"
    .venv/bin/python -m bench --no-build --phases light-latency --out $out > $out/log 2>&1
    grep -E "^\| [124] \|" $out/gateway-bars.md
  done
done
