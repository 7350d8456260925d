"""A task's status has one definition, `TaskStatus`, and enqueue's options are parameters of
their own: the table's CHECK, the SQL, `?status=` and the API document agree with it; an
unknown status or a misspelt option is refused at run time, and by mypy before that."""

from __future__ import annotations

import ast
import re
import sqlite3
import sys
import textwrap
from pathlib import Path
from typing import Any, get_args

import pytest

from agentd.errors import InvalidTaskError
from agentd.taskqueue import FINAL_STATES, STATES, UNSUCCESSFUL, FinalStatus, TaskStatus

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "daemon" / "agentd"
# `status = 'a'`, `status IN ('a', 'b')`, `status = iif(c, 'a', 'b')`: the states named.
_SQL_STATES = re.compile(r"status\s*(?:=|IN)\s*(?:iif\(\w+,\s*)?\(?\s*((?:'\w+'\s*,?\s*)+)")


@pytest.fixture
async def qt(start_daemon: Any, http: Any, copied_plugin: Any) -> Any:
    daemon, _ = await start_daemon(plugin_dirs=[copied_plugin("queue_plugin.py", "qt")])
    return daemon, http(daemon)


def test_the_status_sets_are_parts_of_the_one_definition() -> None:
    assert get_args(TaskStatus) == ("queued", "running", "waiting", "succeeded", "failed", "dead",
                                    "cancelled")
    assert set(get_args(TaskStatus)) == STATES
    assert FINAL_STATES == set(get_args(FinalStatus)) == STATES - {"queued", "running", "waiting"}
    assert FINAL_STATES - {"succeeded"} == UNSUCCESSFUL


async def test_the_status_column_holds_exactly_the_task_statuses(qt: Any) -> None:
    """The CHECK of the table the migrations made lists the statuses, in their order."""
    daemon, _ = qt
    with sqlite3.connect(daemon.store.path) as conn:
        (table,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'tasks'").fetchone()
    check = re.search(r"CHECK \(status IN\s*\(([^)]*)\)\)", table)
    assert check is not None, table
    assert tuple(re.findall(r"'(\w+)'", check.group(1))) == get_args(TaskStatus)


def test_every_state_the_sql_names_is_a_task_status() -> None:
    """A misspelt state in a statement (`WHERE status = 'queud'`) matches nothing and
    fails no check: every state named in the package's SQL and migrations must be one."""
    named: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for found in _SQL_STATES.findall(node.value):
                    named.setdefault(path.name, set()).update(re.findall(r"'(\w+)'", found))
    for path in (PACKAGE / "sql").glob("*.sql"):
        for found in _SQL_STATES.findall(path.read_text(encoding="utf-8")):
            named.setdefault(path.name, set()).update(re.findall(r"'(\w+)'", found))
    # The scan finds the statements it is for (the claim, the cancel, the partial indexes).
    assert {"queued", "running", "cancelled"} <= named["taskqueue.py"]  # the claim, the cancel
    assert {"queued", "running"} <= named["0002_tasks.sql"]
    assert {name: states - STATES for name, states in named.items() if states - STATES} == {}


async def test_the_api_accepts_and_documents_exactly_the_task_statuses(qt: Any) -> None:
    daemon, client = qt
    async with client.get("/v1/openapi.json") as response:
        document = await response.json()
    (parameter,) = [p for p in document["paths"]["/v1/tasks"]["get"]["parameters"]
                    if p["name"] == "status"]
    assert sorted(parameter["schema"]["enum"]) == sorted(get_args(TaskStatus))
    for status in get_args(TaskStatus):
        async with client.get("/v1/tasks", params={"status": status}) as response:
            assert response.status == 200, status
    async with client.get("/v1/tasks", params={"status": "succeded"}) as response:
        assert response.status == 400
    with pytest.raises(InvalidTaskError, match="status must be one of cancelled, dead, failed, "
                                               "queued, running, succeeded, waiting, got 'succeded'"):
        await daemon.queue.list(status="succeded")


async def test_a_misspelt_enqueue_option_is_a_type_error_naming_it(qt: Any) -> None:
    """`**options` took any keyword and passed it on; the options are parameters now."""
    daemon, _ = qt
    with pytest.raises(TypeError, match=r"enqueue\(\) got an unexpected keyword argument 'dely'"):
        await daemon.queue.enqueue("qt.echo", {}, dely=5)
    assert await daemon.queue.counts() == {}
    record = await daemon.queue.enqueue("qt.echo", {}, delay=3600, priority=2, max_attempts=1,
                                        timeout=5.0, idempotency_key="k", dedupe_window=60.0)
    assert (record.priority, record.max_attempts, record.timeout, record.idempotency_key) == (
        2, 1, 5.0, "k")


def test_mypy_refuses_a_misspelt_state_or_enqueue_option(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests are not type-checked, so this one runs mypy on code that misspells."""
    mypy_api = pytest.importorskip("mypy.api")
    snippet = tmp_path / "misspelt.py"
    snippet.write_text(textwrap.dedent("""\
        from agentd.taskqueue import TaskQueue, TaskRecord, TaskStatus

        async def uses(queue: TaskQueue, record: TaskRecord) -> bool:
            await queue.enqueue("x", {}, dely=5)
            await queue.list(status="sleeping")
            record.status = "sucess"
            spelt_right: TaskStatus = "succeeded"
            await queue.enqueue("x", {}, delay=5, dedupe_window=float("inf"))
            await queue.list(status=spelt_right)
            return record.status == "succeded"
        """), encoding="utf-8")
    monkeypatch.chdir(ROOT)  # the config's mypy_path is relative to it
    out, err, _ = mypy_api.run(["--config-file", str(ROOT / "pyproject.toml"),
                                "--cache-dir", str(tmp_path / "cache"), "--python-executable",
                                sys.executable, str(snippet)])
    errors = {int(line.split(":")[1]): line for line in out.splitlines() if ": error:" in line}
    assert sorted(errors) == [4, 5, 6, 10], out + err
    assert 'Unexpected keyword argument "dely"' in errors[4]
    assert "[arg-type]" in errors[5] and "[assignment]" in errors[6]
    assert "[comparison-overlap]" in errors[10]
