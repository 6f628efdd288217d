#!/usr/bin/env bash
# Install (idempotent) and run the whole test suite, the embedded-model integration tests included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not embedded"` for the fast unit tests only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
"${PYTHON:-python3}" -m pytest -q "$@"
