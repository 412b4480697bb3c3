#!/usr/bin/env bash
# README command 2: install everything, then run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout 1200 "$@"
