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
