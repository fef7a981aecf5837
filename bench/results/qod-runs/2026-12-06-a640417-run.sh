#!/bin/bash
cd "$(dirname "$0")"
echo "lock acquired $(date -u +%FT%TZ) commit $(cat COMMIT)"
timeout 1500 .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/integration/test_overload.py -k "query_of_death or standby_hung or container_kill"
echo "rc=$? done $(date -u +%FT%TZ)"
