"""The layering: config.py is the bottom of agentd, with the value modules it parses into.

Each module here may import only the agentd modules listed for it, wherever in the file the
import is (at the top, inside a function, under TYPE_CHECKING): read from the source's
syntax tree, since an import inside a function runs only when called and an import-time
check would miss it."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
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
    from agentd.store import Store

def later() -> None:
    from agentd.digests import DigestSpec
    import agentd

class Late:
    def method(self) -> None:
        from agentd import taskqueue, worker
"""
    assert agentd_imports(source) == {"bus", "errors", "plugin", "web", "store", "digests", "agentd",
                                      "taskqueue", "worker"}


@pytest.mark.parametrize("module", sorted(BOTTOM))
def test_the_bottom_modules_import_nothing_above_them(module: str) -> None:
    imported = agentd_imports((PACKAGE / f"{module}.py").read_text())
    assert imported <= BOTTOM[module], (
        f"agentd/{module}.py imports {sorted(imported - BOTTOM[module])}: it may import only "
        f"{sorted(BOTTOM[module]) or 'nothing'} of agentd")


# The whole package, in groups from the bottom up (docs/architecture.md lists them): a module
# may import at run time only from its own group and those above it. Imports under
# TYPE_CHECKING are exempt: annotations may name a type of a higher layer.
LAYERS = [
    {"errors", "events", "schedule", "specs", "config", "jsontext", "log", "metrics"},
    {"store"},
    {"bus", "spawn", "supervise", "eventlog", "taskdef", "taskqueue", "steps", "waits", "streamkey",
     "task_warnings", "throughput"},
    {"memory", "ramindex", "bitindex", "embed", "embed_batch", "llm", "mail", "webhooks", "hooks",
     "services"},
    {"context", "protocols", "worker", "scheduler", "digests", "maintenance", "backup", "postgres",
     "storage"},
    {"plugin", "plugins"},
    {"web", "health", "systemd", "watchdog", "shutdown", "safemode", "reload", "app", "cli", "memory_import",
     "__main__",
     "testing",
     "agentd"},
]


def _layer(module: str) -> int:
    return next(index for index, group in enumerate(LAYERS) if module in group)


def runtime_imports(source: str) -> set[str]:
    """`agentd_imports` of `source` without those under `if TYPE_CHECKING:`."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = [ast.Pass()]
    return agentd_imports(ast.unparse(tree))


def test_every_module_has_a_layer() -> None:
    tops = {path.relative_to(PACKAGE).parts[0].removesuffix(".py")
            for path in PACKAGE.rglob("*.py")} - {"__init__"}
    assert not [top for top in tops if not any(top in group for group in LAYERS)]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda path: str(
    path.relative_to(PACKAGE)))
def test_no_module_imports_a_layer_below_its_own(path: Path) -> None:
    parts = path.relative_to(PACKAGE).parts
    module = "agentd" if parts == ("__init__.py",) else parts[0].removesuffix(".py")
    below = {imported for imported in runtime_imports(path.read_text())
             if imported.isidentifier() and any(imported in group for group in LAYERS)
             and _layer(imported) > _layer(module)}
    assert not below, f"agentd/{'/'.join(parts)} imports {sorted(below)}, from layers below its own"


def test_a_daemon_on_sqlite_starts_without_the_postgresql_engine_or_numpy(tmp_path: Path) -> None:
    """Start time is import time, mostly: asyncpg with agentd's PostgreSQL modules, and numpy
    (which the sqlite_vec package imports, and MiniLM on its first use), cost a daemon on
    SQLite about 0.3 s of its start and 15 MB it never uses. A real daemon (memory.db with
    sqlite-vec loaded, the shipped task queue, HTTP) starts here in a fresh interpreter."""
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from agentd.testing import running_daemon\n"
        "async def main():\n"
        f"    async with running_daemon(Path({str(tmp_path)!r})) as daemon:\n"
        "        await daemon.services.memory.stats()\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in ('asyncpg', 'numpy', 'sqlite_vec', 'onnxruntime') if m in sys.modules)"
        " + sorted(m for m in sys.modules if m.startswith('agentd.postgres')))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
