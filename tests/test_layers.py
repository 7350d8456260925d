"""The layering: config.py is the bottom of agentd, with the value modules it parses into.

Each module here may import only the agentd modules listed for it, wherever in the file the
import is (at the top, inside a function, under TYPE_CHECKING): read from the source's
syntax tree, since an import inside a function runs only when called and an import-time
check would miss it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "daemon" / "agentd"

# The bottom of the layering and what each module of it may import of agentd: only what is
# listed below it here, so none of them imports a module built on the configuration.
BOTTOM = {
    "errors": set(),
    "events": {"errors"},
    "schedule": {"errors", "events"},
    "specs": {"errors", "events", "schedule"},
    "config": {"errors", "events", "schedule", "specs"},
}


def agentd_imports(source: str) -> set[str]:
    """The agentd modules (first part below `agentd`, or "agentd" for the package itself)
    that `source`, a module directly in the package, imports anywhere."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(_below_agentd(alias.name) for alias in node.names
                         if alias.name == "agentd" or alias.name.startswith("agentd."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative, in a module of the package: from the package
                module = "agentd" + (f".{node.module}" if node.module else "")
            else:
                module = node.module or ""
            if module == "agentd":  # `from agentd import errors`: the names are modules
                found.update(alias.name for alias in node.names)
            elif module.startswith("agentd."):
                found.add(_below_agentd(module))
    return found


def _below_agentd(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "agentd"


def test_the_checker_sees_imports_wherever_they_are() -> None:
    source = """
from __future__ import annotations
import os
import agentd.bus
from typing import TYPE_CHECKING
from agentd.errors import ConfigError
from . import plugin
from .web.server import build_app
if TYPE_CHECKING:
    from agentd.db import Store

def later() -> None:
    from agentd.digests import DigestSpec
    import agentd

class Late:
    def method(self) -> None:
        from agentd import taskqueue, worker
"""
    assert agentd_imports(source) == {"bus", "errors", "plugin", "web", "db", "digests", "agentd",
                                      "taskqueue", "worker"}


@pytest.mark.parametrize("module", sorted(BOTTOM))
def test_the_bottom_modules_import_nothing_above_them(module: str) -> None:
    imported = agentd_imports((PACKAGE / f"{module}.py").read_text())
    assert imported <= BOTTOM[module], (
        f"agentd/{module}.py imports {sorted(imported - BOTTOM[module])}: it may import only "
        f"{sorted(BOTTOM[module]) or 'nothing'} of agentd")
