"""The layering rule: model code never imports the workbench (the conversation model and the alignment sit
below both, in models.data). Checked statically over every module under models/, so an import inside a
function counts too."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_no_module_under_models_imports_the_workbench():
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                 for path in sorted((ROOT / "models").rglob("*.py"))
                 for line, name in imported_modules(path)
                 if name == "workbench" or name.startswith("workbench.")]
    assert not offenders, "model code must not import the workbench:\n" + "\n".join(offenders)


def test_the_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from workbench.store import Store\n    import workbench\n")
    assert [name for _, name in imported_modules(module)] == ["workbench.store", "workbench"]


def test_the_old_name_is_the_same_module():
    import models.data.align
    import workbench.align

    assert workbench.align is models.data.align
