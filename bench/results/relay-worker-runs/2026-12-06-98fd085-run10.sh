#!/bin/bash
# 10 runs of the relay-worker tests in one session (one stack), one core kept busy.
cd "$(dirname "$0")"
echo "lock acquired $(date -u +%FT%TZ) commit $(cat COMMIT)"
timeout 1500 .venv/bin/python -c 'while True: pass' &
BURN=$!
F=tests/integration/test_relay_workers.py
timeout 1500 .venv/bin/python -m pytest -q -s --keep-duplicates $F $F $F $F $F $F $F $F $F $F -p no:cacheprovider
RC=$?
kill $BURN
echo "rc=$RC done $(date -u +%FT%TZ)"
