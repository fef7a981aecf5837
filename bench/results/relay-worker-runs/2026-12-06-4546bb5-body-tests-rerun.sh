#!/bin/bash
cd /work/wt/bodybuf
echo "start $(date -u +%FT%TZ) $(git rev-parse --short HEAD)"
timeout 400 .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/integration/test_least_privilege.py
echo "rc=$? lp done $(date -u +%FT%TZ)"
timeout 500 .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/integration/test_overload.py -k heavy_requests
echo "rc=$? overload done $(date -u +%FT%TZ)"
