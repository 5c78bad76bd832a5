#!/usr/bin/env bash
# The test command: set up (idempotent), lint, then run the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q --timeout=900 "$@"
