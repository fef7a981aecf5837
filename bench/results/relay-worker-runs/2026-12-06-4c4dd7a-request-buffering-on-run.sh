#!/bin/bash
# Experiment, not committed: Nginx buffering request bodies; the kill test 3 times.
cd "$(dirname "$0")"
echo "lock acquired $(date -u +%FT%TZ) commit $(cat COMMIT) + proxy_request_buffering on"
timeout 1500 .venv/bin/python -c 'while True: pass' &
BURN=$!
F=tests/integration/test_relay_workers.py
timeout 900 .venv/bin/python -m pytest -q -s -p no:cacheprovider --keep-duplicates $F $F $F -k crash_loses
echo "rc=$? done $(date -u +%FT%TZ)"
kill $BURN
