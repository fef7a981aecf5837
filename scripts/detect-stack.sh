#!/usr/bin/env bash
# Print the compose file to use: the GPU pair where NVIDIA GPUs and the container
# toolkit are present, the CPU demo (simulator) everywhere else.
#   scripts/detect-stack.sh            -> compose.gpu.yaml | compose.yaml
#   scripts/detect-stack.sh --check F  -> exit 1 with a clear answer if stack F cannot
#                                         run here (`make up` calls this first)
gpus() {
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else echo 0; fi
}

if [ "${1:-}" = --check ]; then
  [ "${2:-}" = compose.gpu.yaml ] || exit 0
  n=$(gpus)
  if ! docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia; then
    echo "error: the GPU stack needs the NVIDIA container toolkit (no 'nvidia' runtime in docker info)" >&2
    exit 1
  fi
  # One GPU per node (NODE1_GPU, NODE2_GPU...). Naming both GPUs is an explicit choice.
  if [ "$n" -ge "${NODES:-2}" ] || { [ "${NODES:-2}" = 2 ] && [ -n "${NODE1_GPU:-}" ] && [ -n "${NODE2_GPU:-}" ]; }; then exit 0; fi
  cat >&2 <<MSG
error: this host has $n NVIDIA GPU(s); the GPU stack runs one SGLang node per GPU (NODES=${NODES:-2})
(node-1 on NODE1_GPU=0, node-2 on NODE2_GPU=1), so a failover has somewhere to go.
Choose one:
  - two GPU hosts, one node each:      docs/multi-host.md
  - share this GPU (small models only; not tested by this project):
      make up NODE1_GPU=0 NODE2_GPU=0 SGLANG_EXTRA_ARGS='--mem-fraction-static 0.4'
  - the CPU demo with the simulator:   make up STACK=compose.yaml
MSG
  exit 1
fi

if [ "$(gpus)" -ge 1 ] && docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia; then
  echo compose.gpu.yaml
else
  echo compose.yaml
fi
