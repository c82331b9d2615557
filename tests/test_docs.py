"""The README's pictures: every picture it shows exists, and every tab picture in docs/screenshots/ is shown
(scripts/screenshots.sh retakes them through the browser tests)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_shows_each_tab_picture_and_each_picture_it_shows_exists():
    readme = (ROOT / "README.md").read_text()
    shown = set(re.findall(r'<img src="([^"]+)"', readme)) | set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme))
    assert shown, "the README shows no picture"
    missing = [p for p in shown if not (ROOT / p).is_file()]
    assert not missing, f"the README shows pictures that do not exist: {missing}"
    taken = {f"docs/screenshots/{p.name}" for p in (ROOT / "docs" / "screenshots").glob("*.png")}
    assert {"annotate", "masks", "attention", "train", "chat", "evaluate", "team"} <= {Path(p).stem for p in taken}
    assert taken <= shown, f"pictures not shown in the README: {sorted(taken - shown)}"
    script = (ROOT / "scripts" / "screenshots.sh").read_text()
    assert all(f"{Path(p).stem}:" in script for p in taken), "screenshots.sh does not retake every picture"


def test_the_zoo_readme_pictures_exist():
    text = (ROOT / "models" / "zoo" / "README.md").read_text()
    for picture in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (ROOT / "models" / "zoo" / picture).is_file(), picture
