#!/usr/bin/env bash
# SGLang 0.5.19's wheel, for its test kits only (sglang/test/kits: plain HTTP clients),
# into a directory of its own: --no-deps, never into the main venv (it is large and
# its dependencies are torch and CUDA). Usage: scripts/sglang-test-kits.sh [python] [dir]
set -euo pipefail
PY="${1:-.venv/bin/python}"
DIR="${2:-.cache/sglang-0.5.19}"
if [[ -f "$DIR/sglang/test/kits/json_mode_kit.py" ]]; then
    exit 0
fi
mkdir -p "$(dirname "$DIR")"
"$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$DIR" sglang==0.5.19
