"""Layers import downward only: tintc/ uses backends/ and ir/; backends/ uses ir/; ir/ uses neither
(the error types live in ir/errors.py, where the lowest user reaches them)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imports_of(folder: Path, packages: tuple[str, ...]) -> list[str]:
    """`file: module` for every absolute import in `folder`'s Python files of one of `packages`."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            found += [f"{path.relative_to(folder)}: {n}" for n in names if n.split(".")[0] in packages]
    return found


def test_ir_and_backends_import_downward_only():
    assert imports_of(ROOT / "ir", ("tintc", "backends")) == []
    assert imports_of(ROOT / "backends", ("tintc",)) == []


def test_the_check_sees_an_upward_import(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.py").write_text("import os\nfrom ir.errors import IRError\n"
                                           "def f():\n    from tintc.errors import X\n    import tintc\n")
    assert imports_of(tmp_path, ("tintc",)) == ["sub/m.py: tintc.errors", "sub/m.py: tintc"]


# --- size and import circles ------------------------------------------------------------------

MAX_LINES = 400
CHECKED_FOLDERS = ("tintc", "ir", "backends", "scripts")


def long_modules(root: Path, folders=CHECKED_FOLDERS) -> dict[str, int]:
    """`path: lines` for every Python file under root/folder over MAX_LINES lines."""
    found = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            lines = len(path.read_text(encoding="utf-8").splitlines())
            if lines > MAX_LINES:
                found[path.relative_to(root).as_posix()] = lines
    return found


def test_no_module_is_over_the_line_budget():
    long = long_modules(ROOT)
    assert long == {}


def test_the_line_budget_sees_a_long_module(tmp_path):
    (tmp_path / "tintc").mkdir()
    (tmp_path / "tintc" / "short.py").write_text("x = 1\n" * MAX_LINES)
    (tmp_path / "tintc" / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    assert long_modules(tmp_path, ("tintc",)) == {"tintc/long.py": MAX_LINES + 1}


def module_imports(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports anywhere in its body (lazy imports in functions
    too: a circle through one still fails at the first call that takes it)."""
    paths = {}
    for path in (root / package).rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in paths.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]  # the package it sits in
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: up level-1 packages from here
                    up = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                # `from a import b` imports the module a.b when there is one, else names of a
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names}
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each circle once, as the list of its modules from the smallest name, back to it."""
    circles = set()

    def walk(module: str, trail: list[str]) -> None:
        for target in sorted(graph[module]):
            if target in trail:
                circle = trail[trail.index(target):]
                start = circle.index(min(circle))
                circles.add(tuple(circle[start:] + circle[:start]))
            elif target > trail[0]:  # each circle is found from its smallest module only
                walk(target, trail + [target])

    for module in sorted(graph):
        walk(module, [module])
    return [list(c) + [c[0]] for c in sorted(circles)]


def test_no_import_circle_among_tintc_modules():
    assert import_circles(module_imports(ROOT, "tintc")) == []


def test_the_circle_check_sees_a_lazy_circle(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "sub" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from pkg.sub import b\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("def f():\n    from . import c\n")
    (tmp_path / "pkg" / "sub" / "c.py").write_text("from ..a import x\nimport os\n")
    (tmp_path / "pkg" / "d.py").write_text("import pkg.a\n")  # into the circle, not part of it
    graph = module_imports(tmp_path, "pkg")
    assert graph["pkg.sub.b"] == {"pkg.sub.c"} and graph["pkg.d"] == {"pkg.a"}
    assert import_circles(graph) == [["pkg.a", "pkg.sub.b", "pkg.sub.c", "pkg.a"]]
