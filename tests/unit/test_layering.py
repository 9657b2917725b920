"""Import contracts from DESIGN.md, enforced on the source and at run time.

- only ``cloudmon/ui/`` imports Qt (PySide6, shiboken6, pyqtgraph);
- ``agents/`` imports nothing of ``cloudmon``;
- every core module imports with Qt made unimportable (core runs without Qt).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QT = {"PySide6", "shiboken6", "pyqtgraph"}


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def test_only_ui_imports_qt() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in (ROOT / "cloudmon").rglob("*.py")
        if "ui" not in path.relative_to(ROOT / "cloudmon").parts[:1]
        for line, name in _imports(path)
        if _top(name) in QT
    ]
    assert offenders == []


@pytest.mark.parametrize("forbidden", [{"cloudmon"}, QT])
def test_agent_imports_neither_cloudmon_nor_qt(forbidden: set[str]) -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in (ROOT / "agents").rglob("*.py")
        for line, name in _imports(path)
        if _top(name) in forbidden
    ]
    assert offenders == []


def test_the_contract_checker_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from PySide6 import QtCore\nimport cloudmon.store\n", encoding="utf-8")
    assert {_top(n) for _, n in _imports(bad)} == {"PySide6", "cloudmon"}


BLOCKED_IMPORT = """
import importlib, pkgutil, sys
BLOCKED = set(sys.argv[1].split(','))
EXEMPT = set(sys.argv[2].split(',')) - {''}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError('blocked for this check: ' + name)
        return None
sys.meta_path.insert(0, Block())
import cloudmon, cloudmon_agent
names = []
for pkg in (cloudmon, cloudmon_agent):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):
        if info.name.startswith('cloudmon.ui') or info.name.endswith('__main__') or info.name in EXEMPT:
            continue
        importlib.import_module(info.name)
        names.append(info.name)
print(len(names))
"""


@pytest.mark.parametrize(
    ("blocked", "exempt"),
    [
        # Core tests run without Qt: nothing outside cloudmon.ui may need it.
        (QT, set()),
        # A plain install (no extras) must run the console and collector: redis-py,
        # pymongo, libvirt, NVML and OR-Tools (the exact planner) are imported only when
        # configured or used.  The shared
        # queue module is the one place that needs redis-py at import time, and the
        # collector imports it only when a queue URL is set.
        (
            {"redis", "pymongo", "bson", "libvirt", "pynvml", "ortools"},
            {"cloudmon.collector.queue"},
        ),
    ],
    ids=["without-qt", "without-optional-extras"],
)
def test_core_and_agent_import_without(blocked: set[str], exempt: set[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORT, ",".join(sorted(blocked)), ",".join(sorted(exempt))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) >= 5
