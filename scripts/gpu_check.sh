#!/usr/bin/env bash
# The GPU check, one command on a machine with a CUDA GPU and lmedit installed (bash scripts/install.sh with a
# CUDA build of torch; LMEDIT_WITH_GEMMA=1 adds the second embedded model):
#   1. the contract test (every method x tiny Llama, GPT-2, Gemma 3 x float32, bfloat16, float16) on the GPU;
#   2. the embedded models in bfloat16 and float16 on the GPU: packed pre-edit scores against float32 CPU scores,
#      then every method once: seconds per edit, peak GPU memory, rewrite before -> after, bit-exact restore.
# Extra arguments go to step 2 (e.g. --limit 4 --methods FT-M,ROME). Output: docs/precision-and-devices.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device here: the GPU check needs one")'
LMEDIT_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/test_contract.py tests/test_precision.py
"$PY" -u scripts/gpu_check.py --device cuda "$@"
