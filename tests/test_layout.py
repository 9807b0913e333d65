"""The package's architecture holds: the LongLoRA core and the tools that do not need
Axolotl never import it (the Axolotl adapter does, lazily, when Axolotl loads it); nothing
outside the tests imports them; the package's modules have unique names and stay short;
S2's group-size rule is written once."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CORE = [
    "longlora_plugin",
    "longlora_plugin.s2",
    "longlora_plugin.s2.context_parallel",
    "longlora_plugin.s2.halo_exchange",
    "longlora_plugin.s2.row_gather",
    "longlora_plugin.rope",
    "longlora_plugin.trainable",
    "longlora_plugin.hookspecs",
    "longlora_plugin.config",
    "longlora_plugin.memory",
    "longlora_plugin.evaluation.runner",
    "longlora_plugin.cli",
]


def test_core_does_not_import_axolotl():
    code = (
        "import importlib, sys\n"
        f"for name in {CORE!r}: importlib.import_module(name)\n"
        "from longlora_plugin.cli import build_parser\n"
        "build_parser()\n"
        "bad = sorted(m for m in sys.modules if m == 'axolotl' or m.startswith('axolotl.'))\n"
        "assert not bad, bad[:5]\n"
        "import longlora_plugin\n"
        "assert longlora_plugin.LongLoRAPlugin.__module__ == 'longlora_plugin.axolotl.plugin_hooks'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "longlora_plugin"
LINE_LIMIT = 400


def _modules(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def _imported(path: Path) -> set[str]:
    """The absolute module names a file imports (``import a.b``, ``from a.b import c``;
    ``from a import b`` also as ``a.b``), at any depth of the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_nothing_outside_the_tests_imports_them():
    """The package, the benchmarks, the demo and the S2 harness never import ``tests``
    (what the tests and the benchmarks share is ``s2_harness/`` or ``demo/``)."""
    modules = _modules("longlora_plugin", "benchmarks", "demo", "s2_harness")
    assert modules
    bad = {
        str(path.relative_to(REPO)): sorted(
            name for name in _imported(path) if name == "tests" or name.startswith("tests.")
        )
        for path in modules
    }
    assert not {path: names for path, names in bad.items() if names}


def test_package_module_names_are_unique():
    """No two modules of the package share a file name (``__init__``/``__main__`` aside)."""
    modules = [
        p for p in _modules("longlora_plugin") if p.name not in ("__init__.py", "__main__.py")
    ]
    assert modules
    by_name: dict[str, list[str]] = {}
    for path in modules:
        by_name.setdefault(path.name, []).append(str(path.relative_to(REPO)))
    assert not {name: paths for name, paths in by_name.items() if len(paths) > 1}


def test_package_modules_are_short():
    """Every module of the package is at most 400 lines: split one by concept instead."""
    modules = _modules("longlora_plugin")
    assert modules
    lines = {
        str(p.relative_to(REPO)): len(p.read_text(encoding="utf-8").splitlines()) for p in modules
    }
    assert not {path: n for path, n in lines.items() if n > LINE_LIMIT}


GROUP_RULE = PACKAGE / "s2" / "group_size.py"
GROUP_CONSTANTS = {"DEFAULT_GROUP_SIZE_RATIO", "MIN_GROUP_SIZE"}


def _is_ratio(node: ast.AST) -> bool:
    name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", "")
    return "ratio" in name.lower()


def test_group_size_rule_is_written_once():
    """Only :mod:`longlora_plugin.s2.group_size` defines the group-size constants and
    multiplies a ratio into a group size; everyone else imports them."""
    found: dict[str, list[str]] = {}
    for path in _modules("longlora_plugin"):
        if path == GROUP_RULE:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            targets = node.targets if isinstance(node, ast.Assign) else []
            if isinstance(node, ast.AnnAssign):
                targets = [node.target]
            if any(isinstance(t, ast.Name) and t.id in GROUP_CONSTANTS for t in targets):
                found.setdefault("defines a group-size constant", []).append(where)
            if (
                isinstance(node, ast.BinOp)
                and isinstance(node.op, ast.Mult)
                and (_is_ratio(node.left) or _is_ratio(node.right))
            ):
                found.setdefault("multiplies a ratio", []).append(where)
    assert not found


def test_heavy_first_modules_exist():
    """The scheduling list in tests/conftest.py names real modules (a renamed module
    would silently drop out of it)."""
    from tests.conftest import HEAVY_FIRST

    assert HEAVY_FIRST
    for path in HEAVY_FIRST:
        assert (REPO / path).is_file(), path
