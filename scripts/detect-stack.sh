#!/usr/bin/env bash
# Print the compose file to use: the GPU pair where NVIDIA GPUs and the container
# toolkit are present, the CPU demo (simulator) everywhere else.
if command -v nvidia-smi >/dev/null 2>&1 && [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 1 ] \
   && docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia; then
  echo compose.gpu.yaml
else
  echo compose.yaml
fi
