#!/usr/bin/env bash
# Create .venv with Python 3.12 and install the pinned requirements plus this package (editable).
# Idempotent: re-running with unchanged requirements only re-links the package.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local candidate
  for candidate in "${PYTHON312:-}" python3.12; do
    if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  # pyenv installs that are not the global version are not reachable through the shim.
  for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
    if [ -x "$candidate" ]; then echo "$candidate"; return 0; fi
  done
  return 1
}

if [ ! -x .venv/bin/python ]; then
  PY=$(find_python) || { echo "install.sh: Python 3.12 not found (set PYTHON312=/path/to/python3.12)" >&2; exit 1; }
  echo "install.sh: creating .venv with $PY"
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  echo "$want" > "$stamp"
fi
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .

# The RL code verifier sandbox (bubblewrap); prints what to do instead of failing without root.
bash scripts/setup_bwrap.sh
