#!/usr/bin/env bash
# Install everything, then edit the embedded model and evaluate the edit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
"${PYTHON:-python3}" -m lmedit.cli edit --prompt "The Eiffel Tower is located in the city of" --target "Rome" \
  --rephrase "Where is the Eiffel Tower? It is in the city of" \
  --locality-prompt "The capital of Germany is"
"${PYTHON:-python3}" -m lmedit.cli run --method FT-M --limit 10 --out "runs/demo-ftm-$(date +%Y%m%d-%H%M%S)"
