#!/usr/bin/env bash
# Creates (or reuses) .venv and installs requirements.txt into it. Sourced by the other scripts.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# Reinstall only when the requirements (pyproject.toml and requirements.txt) changed since the last
# successful install. requirements.txt installs the project itself, editable (`-e .[test]`), so
# `models` and `workbench` import from any folder and runs need no PYTHONPATH.
STAMP="$VENV/.requirements.sha"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  (cd "$ROOT" && "$VENV/bin/python" -m pip install -q -r requirements.txt)
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
