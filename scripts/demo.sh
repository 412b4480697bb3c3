#!/usr/bin/env bash
# README command 1: install everything, then run the whole pipeline at toy scale on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m joyai_megatron.demo "$@"
