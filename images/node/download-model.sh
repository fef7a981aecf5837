#!/bin/sh
# `make models`: download MODEL_PATH into the model cache (HF_HOME) before the stack
# starts, with progress, so `make up`'s wait covers loading weights, not a download.
# Runs in the engine's Python (huggingface_hub comes with SGLang); HF_TOKEN_PATH
# points at the token secret (empty: anonymous, enough for public models).
set -eu
: "${MODEL_PATH:?MODEL_PATH must name a Hugging Face model id or a local folder}"
if [ -d "${MODEL_PATH}" ]; then
  echo "MODEL_PATH=${MODEL_PATH} is a local folder: nothing to download"
  exit 0
fi
echo "downloading ${MODEL_PATH} into ${HF_HOME:-~/.cache/huggingface} (resumes if interrupted)"
exec "${ENGINE_PYTHON:-/usr/bin/python3}" - "${MODEL_PATH}" <<'PY'
import sys
from huggingface_hub import snapshot_download

path = snapshot_download(sys.argv[1])
print(f"ready: {path}")
PY
