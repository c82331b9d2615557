#!/usr/bin/env bash
# Set up (first time) and open the workbench on the embedded default models.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec python app.py "$@"
