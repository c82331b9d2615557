#!/usr/bin/env bash
# Retake the README's pictures of each tab: the browser tests that drive those tabs take them
# (headless Chromium through Playwright); this copies the chosen ones into docs/screenshots/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
SHOTS="$(mktemp -d)"
WORKBENCH_SCREENSHOTS="$SHOTS" python -m pytest -q tests/test_annotate_browser.py tests/test_masks_tab.py \
  tests/test_attention_browser.py tests/test_train_browser.py tests/test_chat_browser.py tests/test_evaluate_browser.py \
  tests/test_team_browser.py tests/test_annotate_team_browser.py
# README picture <- the test's screenshot
for pair in annotate:annotate-labelled masks:masks-sharegpt attention:attention-layer0 train:train_curve_later \
            chat:chat-compare evaluate:evaluate_results team:team-review team-annotate:annotate-team-disagreements; do
  cp "$SHOTS/${pair#*:}.png" "docs/screenshots/${pair%%:*}.png"
done
rm -rf "$SHOTS"
echo "docs/screenshots/ updated"
