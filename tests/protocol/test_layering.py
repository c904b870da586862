"""The codec stays sans-I/O: no module of smartmeter_ophyd.protocol may import I/O,
concurrency or clock modules (architecture.md, "The codec")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import smartmeter_ophyd.protocol as protocol

FORBIDDEN = {
    "socket",
    "asyncio",
    "threading",
    "selectors",
    "time",
    "multiprocessing",
    "subprocess",
    "concurrent",
}
MODULES = sorted(Path(protocol.__file__).parent.glob("*.py"))


def imported_roots(source: str) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "__import__"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            roots.add(node.args[0].value.split(".")[0])
    return roots


def test_modules_found() -> None:
    names = {path.name for path in MODULES}
    assert {"__init__.py", "_decoder.py", "_wire.py", "_events.py"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_protocol_module_is_sans_io(path: Path) -> None:
    bad = imported_roots(path.read_text()) & FORBIDDEN
    assert not bad, f"{path.name} imports {sorted(bad)}: the codec must stay sans-I/O"


def test_checker_detects_forbidden_imports() -> None:
    source = "import os\nimport time\nfrom asyncio import sleep\nfrom concurrent.futures import x\n"
    assert imported_roots(source) & FORBIDDEN == {"time", "asyncio", "concurrent"}
