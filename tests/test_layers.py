"""The import layers point down only: the lower packages never import the stages, the CLI or the
web app, and teran/ never imports pipeline/ (parsed with ast, so lazy imports inside functions
count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import teranprep

PACKAGE = Path(teranprep.__file__).parent
LOWER = ("teran", "manifests", "extractors", "tokenizers")
UPPER = ("pipeline", "commands", "web")


def imported_modules(path: Path, package_dir: Path = PACKAGE) -> set[str]:
    """Every teranprep module `path` imports, as a dotted name (relative imports resolved)."""
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if m == "teranprep" or m.startswith("teranprep.")}


def layer_violations(lower: tuple[str, ...], upper: tuple[str, ...], package_dir: Path = PACKAGE) -> list[str]:
    problems = []
    for pkg in lower:
        for path in sorted((package_dir / pkg).rglob("*.py")):
            for module in sorted(imported_modules(path, package_dir)):
                if any(module == f"teranprep.{u}" or module.startswith(f"teranprep.{u}.") for u in upper):
                    problems.append(f"{path.relative_to(package_dir).as_posix()} imports {module}")
    return problems


def test_lower_layers_never_import_stages_cli_or_web():
    assert layer_violations(LOWER, UPPER) == []


def test_teran_never_imports_pipeline():
    assert layer_violations(("teran",), ("pipeline",)) == []


def test_the_checker_sees_relative_lazy_and_absolute_imports(tmp_path):
    # the checker itself must catch an arrow pointing up, however it is written
    fake = tmp_path / "teranprep"
    (fake / "teran" / "sub").mkdir(parents=True)
    (fake / "teran" / "ok.py").write_text("from ..errors import PrepError\nfrom .model import TERAN\n")
    (fake / "teran" / "sub" / "bad.py").write_text(
        "def f():\n    from ...pipeline import evaluate\n    import teranprep.web.app\n")
    assert imported_modules(fake / "teran" / "ok.py", fake) == {
        "teranprep.errors", "teranprep.errors.PrepError", "teranprep.teran.model", "teranprep.teran.model.TERAN"}
    assert layer_violations(("teran",), ("pipeline", "web"), fake) == [
        "teran/sub/bad.py imports teranprep.pipeline",
        "teran/sub/bad.py imports teranprep.pipeline.evaluate",
        "teran/sub/bad.py imports teranprep.web.app"]
