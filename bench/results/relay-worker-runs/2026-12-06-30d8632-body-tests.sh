#!/bin/bash
cd /work/wt/bodybuf
echo "queued $(date -u +%FT%TZ)"
bench/results/relay-worker-runs/2026-12-06-30d8632-run10.sh > /tmp/bodybuf-10runs.log 2>&1
echo "others start $(date -u +%FT%TZ)" > /tmp/bodybuf-others.log
timeout 1200 .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/integration/test_least_privilege.py tests/integration/test_hardening.py tests/integration/test_edge_tls.py >> /tmp/bodybuf-others.log 2>&1
echo "rc=$? done $(date -u +%FT%TZ)" >> /tmp/bodybuf-others.log
