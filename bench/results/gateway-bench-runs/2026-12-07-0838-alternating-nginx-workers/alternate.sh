#!/bin/bash
# Alternating capacity runs: the default (1 Nginx worker for 2 relay workers) and HA_NGINX_WORKERS=2.
cd /work/main
i=0
for n in 1 2 1 2; do
  i=$((i+1))
  git checkout -q compose/env/gateway.env compose/bench.yaml
  if [ $n = 2 ]; then
    echo "HA_NGINX_WORKERS=2" >> compose/env/gateway.env
    sed -i 's/      HA_RELAY_WORKERS: "1"/      HA_RELAY_WORKERS: "1"\n      HA_NGINX_WORKERS: "1"/' compose/bench.yaml
  fi
  out=/tmp/alt/$i-nginx$n
  mkdir -p $out
  flock /tmp/sglang-ha-docker.lock .venv/bin/python -m bench --no-build --phases capacity --out $out > $out.log 2>&1
  echo "run $i nginx=$n rc=$? $(date -u +%H:%M)"
done
git checkout -q compose/env/gateway.env compose/bench.yaml
