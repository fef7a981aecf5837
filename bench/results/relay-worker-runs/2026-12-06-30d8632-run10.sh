#!/bin/bash
# Nginx buffering request bodies (proxy_request_buffering on): 10 runs of the
# relay-worker tests in one session (one stack), one core kept busy; then the
# integration tests that send bodies, once, on a quiet machine.
cd "$(dirname "$0")/../../.."
echo "lock acquired $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD)"
timeout 1500 .venv/bin/python -c 'while True: pass' &
BURN=$!
F=tests/integration/test_relay_workers.py
timeout 1500 .venv/bin/python -m pytest -q -s --keep-duplicates $F $F $F $F $F $F $F $F $F $F -p no:cacheprovider
RC=$?
kill $BURN
echo "rc=$RC done $(date -u +%FT%TZ)"
