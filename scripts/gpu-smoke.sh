#!/usr/bin/env bash
# `make gpu-smoke`: the failover harness against real SGLang on a two-GPU host.
#
# Brings up the GPU stack (compose.gpu.yaml, one SGLang node per GPU) with a small
# model under a test project name, runs the crash (engine-kill), freeze
# (container-pause) and NIC (nic-down) faults of `python -m tests.failover`, and
# writes the report to reports/gpu-smoke/ (failover-report.md/.json/.png and each
# component's log). The stack is always taken down afterwards.
#
# Needs: two NVIDIA GPUs, the NVIDIA container toolkit, the lmsysorg/sglang image
# (pulled on the first build), nsenter (util-linux) for the NIC fault, and network
# access to Hugging Face for the first download. Settings (environment):
#   MODEL_PATH   default Qwen/Qwen2.5-0.5B-Instruct
#   FAULTS       default engine-kill,container-pause,nic-down
#   TRIALS       default 1
#   REJOIN       default 600 (s a killed SGLang may take to reload and rejoin)
#   OUT          default reports/gpu-smoke
# Not run by this project's CI (no GPU there): see README "Running on GPU hosts".
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# shellcheck source=lib.sh
. scripts/lib.sh

export MODEL_PATH="${MODEL_PATH:-Qwen/Qwen2.5-0.5B-Instruct}"
faults="${FAULTS:-engine-kill,container-pause,nic-down}"
out="${OUT:-reports/gpu-smoke}"
py="${VENV:-.venv}/bin/python"

n=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
[ "$n" -ge 2 ] || die "gpu-smoke needs two NVIDIA GPUs (found $n): one SGLang node per GPU"
scripts/detect-stack.sh --check compose.gpu.yaml
have nsenter || die "nsenter (util-linux) is needed for the NIC fault"

log "downloading $MODEL_PATH into the model cache (once)"
docker compose -p sglang-ha-gpu-smoke -f compose/compose.gpu.yaml build node-1
docker compose -p sglang-ha-gpu-smoke -f compose/compose.gpu.yaml \
  run --rm --no-deps node-1 /etc/sglang-ha/download-model.sh

log "failover harness on the GPU stack: $faults"
PYTHONPATH="$root" "$py" -m tests.failover \
  --stack-files compose.gpu.yaml,compose.test.yaml \
  --faults "$faults" --trials "${TRIALS:-1}" \
  --rejoin-timeout "${REJOIN:-600}" --out "$out"
log "report: $out/failover-report.md"
