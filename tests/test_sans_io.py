"""The SIP core stays sans-I/O: no module under proxy/sip imports a clock, a socket,
an event loop, a logger, threads, a random source or a store (STYLE.md); nor does the
flood guard (proxy/flood.py), which runs before the core on every message.

The imports are read with ``ast``, not by importing the modules, so a forbidden import
inside a function or under ``if TYPE_CHECKING:`` is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SIP_PACKAGE = Path(__file__).resolve().parent.parent / "proxy" / "sip"
FORBIDDEN = frozenset(
    {
        "asyncio", "socket", "time", "datetime", "logging", "selectors", "threading",
        "redis", "uvloop", "structlog", "random",
    }
)  # fmt: skip
SIP_MODULES = sorted(SIP_PACKAGE.rglob("*.py"))
SANS_IO_MODULES = [*SIP_MODULES, SIP_PACKAGE.parent / "flood.py"]


def forbidden_imports(source: str) -> list[str]:
    """The top-level package of every absolute import in ``source`` that is forbidden."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.extend(name for name in names if name.partition(".")[0] in FORBIDDEN)
    return found


def test_the_package_is_where_the_test_looks() -> None:
    names = {path.name for path in SIP_MODULES}
    assert {"__init__.py", "message.py", "headers.py", "uri.py", "editor.py", "framing.py"} <= names


@pytest.mark.parametrize("path", SANS_IO_MODULES, ids=lambda path: path.name)
def test_module_imports_no_clock_or_io(path: Path) -> None:
    assert forbidden_imports(path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import asyncio", ["asyncio"]),
        ("import os, socket", ["socket"]),
        ("from time import monotonic", ["time"]),
        ("import redis.asyncio as r", ["redis.asyncio"]),
        ("def f():\n    import random\n", ["random"]),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import logging\n", ["logging"]),
        ("from datetime import datetime", ["datetime"]),
        ("import timeit\nfrom . import time\nfrom .time import x", []),
    ],
)
def test_the_check_catches_forbidden_imports(source: str, expected: list[str]) -> None:
    assert forbidden_imports(source) == expected
