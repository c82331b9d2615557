"""The layering rules: model code never imports the workbench (the conversation model and the alignment sit
below both, in models.data), and each package imports only what docs/ARCHITECTURE.md's table allows.
Checked statically over every module, so an import inside a function counts too."""
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


ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
WORKBENCH_PACKAGES = ("store", "jobs", "train", "ui", "evaluate")


def package_of(module: str) -> str | None:
    """The row of the rules table a module belongs to: `models.X`, `workbench.X`, or `workbench` for the
    workbench's top-level modules; None outside the project."""
    parts = module.split(".")
    if parts[0] == "models" and len(parts) > 1:
        return ".".join(parts[:2])
    if parts[0] == "workbench":
        return "workbench." + parts[1] if len(parts) > 1 and parts[1] in WORKBENCH_PACKAGES else "workbench"
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """The modules of this project that `path` imports, relative imports resolved."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = {module for _, module in imported_modules(path)}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1]
            found.add(".".join(base + ([node.module] if node.module else [])))
    return {m for m in found if package_of(m)}


def rules() -> dict[str, set[str]]:
    text = ARCHITECTURE.read_text()
    table = text[text.index("<!-- rules -->"):text.index("<!-- /rules -->")]
    allowed = {}
    for row in table.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            allowed[cells[0].strip("`")] = {c.strip().strip("`") for c in cells[2].split(",")} - {"—"}
    return allowed


def permitted(source: str, target: str, allowed: dict[str, set[str]]) -> bool:
    return source == target or target in allowed[source] or (target.startswith("models.") and "models.*" in allowed[source])


def test_every_import_is_one_the_architecture_page_allows():
    allowed = rules()
    assert {"models.hsa", "models.data", "workbench", "workbench.ui"} <= set(allowed)
    violations = []
    for path in sorted([*(ROOT / "models").rglob("*.py"), *(ROOT / "workbench").rglob("*.py")]):
        if module_name(path) == "models":
            continue  # the namespace's __init__ (the first test keeps it off the workbench)
        source = package_of(module_name(path))
        assert source in allowed, f"{path.relative_to(ROOT)}: its package {source} has no row in {ARCHITECTURE.name}"
        violations += [f"{path.relative_to(ROOT)}: {source} imports {target}"
                       for target in sorted({package_of(m) for m in project_imports(path)})
                       if not permitted(source, target, allowed)]
    assert not violations, f"imports that {ARCHITECTURE.name} does not allow:\n" + "\n".join(violations)


def test_the_rules_check_would_see_a_violation():
    allowed = rules()
    assert not permitted("models.hsa", "models.vlm", allowed) and not permitted("workbench.jobs", "models.vlm", allowed)
    assert not permitted("workbench.store", "workbench.ui", allowed) and permitted("workbench.ui", "models.zoo", allowed)
