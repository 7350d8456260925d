"""Crash safety: a real `agentd run` working through a few thousand tasks (a third of them with
memoized steps) is killed with SIGKILL at a random moment, restarted, and every task it
acknowledged reaches its final state exactly as the queue's semantics say: none is lost, none
is added, and a step whose result was committed is never run again (only a step in flight at
the kill may run twice).

The moment of the kill comes from a seeded `random.Random`; the seed is printed, and
`CRASH_TEST_SEED=<seed>` replays the same choices. The test never sleeps: it waits on the
daemon's output, on long-polls (`GET /v1/tasks/{id}?wait=`) and on HTTP answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import textwrap
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from agentd.taskqueue import SqliteTasks
from conftest import HEAVY

TASKS = 3000
BATCH = 100  # tasks per POST /v1/tasks/batch
WORKERS = 8  # [tasks] queues = { default = 8 }
# Short tasks are claimed ahead of the free slots ([tasks] claim_ahead, SQLite's default 3):
# a kill finds up to this many running rows, of which at most WORKERS had started.
CLAIMED = WORKERS * (1 + SqliteTasks.default_claim_ahead)
MAX_ATTEMPTS = 5  # more than MAX_KILLS + 1: a killed task is never dead for lack of attempts
MAX_KILLS = 3  # kill again (at most this often) until a kill interrupted running tasks
# The enqueuer keeps at most this many batches ahead of the workers: the queue is never
# empty while tasks are still to come, so the workers are busy whenever the kill lands.
AHEAD = 3
START_TIMEOUT = 30.0
WAIT = 60.0  # seconds one long-poll may wait
NOT_JSON = "<not json>"
FINAL = frozenset({"succeeded", "failed", "dead", "cancelled"})

PLUGIN = '''
import asyncio

from agentd import Plugin

plugin = Plugin("crash")


async def _side_effect(log, task_id, step, attempt, pause):
    # The effect happens first, then the step "awaits its answer": a kill in between
    # leaves the effect done but the step's result not committed (the step is in flight).
    with open(log, "a") as out:
        out.write(f"{task_id} {step} {attempt}\\n")
        out.flush()
    await asyncio.sleep(pause)
    return {"task": task_id, "step": step, "attempt": attempt}


@plugin.task(max_attempts=MAX_ATTEMPTS)
async def work(ctx, n: int, log: str, pause: float):
    if n % 3:
        return {"n": n, "double": n * 2}
    task_id, attempt = ctx.task.id, ctx.task.attempt
    one = await ctx.step("one", lambda: _side_effect(log, task_id, "one", attempt, pause))
    await asyncio.sleep(pause)
    two = await ctx.step("two", lambda: _side_effect(log, task_id, "two", attempt, pause))
    return {"n": n, "double": n * 2, "one": one, "two": two}
'''


def write_setup(root: Path) -> tuple[Path, Path]:
    """The plugin and an agentd.toml keeping all state under `root`: (config, effects log)."""
    plugins = root / "plugins"
    plugins.mkdir()
    (plugins / "crash.py").write_text(PLUGIN.replace("MAX_ATTEMPTS", str(MAX_ATTEMPTS)))
    config = root / "agentd.toml"
    # Maintenance schedules far apart: no task but ours appears while the test runs.
    config.write_text(textwrap.dedent(f"""
        [daemon]
        data_dir = "{root / 'data'}"
        stop_timeout = 5.0

        [server]
        port = 0

        [store]
        maintenance_interval = 315360000.0

        [tasks]
        queues = {{ default = {WORKERS} }}
        purge_interval = 315360000.0

        [events]
        sweep_interval = 315360000.0

        [plugins]
        paths = ["{plugins}"]
        entry_points = false

        [log]
        format = "json"
        """))
    return config, root / "effects.log"


def read_effects(path: Path) -> list[tuple[int, str, int]]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [(int(task), step, int(attempt)) for task, step, attempt in map(str.split, lines)]


def recovered_count(record: dict[str, Any]) -> int:
    """The count of a `tasks.recovered` log record (0 for any other record)."""
    return int(record["count"]) if record.get("event") == "tasks.recovered" else 0


class AgentdRun:
    """One `python -m agentd run` child; its stdout and stderr are read until it exits."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.records: list[dict[str, Any]] = []  # stdout's JSON lines
        self.stderr: list[str] = []
        self.port = 0
        self.recovered = 0  # tasks found running at start (left by a killed process)
        self._readers: list[asyncio.Task[None]] = []

    @classmethod
    async def start(cls, config: Path, env: dict[str, str]) -> AgentdRun:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentd", "run", "--config", str(config),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env, cwd=config.parent,
        )
        run = cls(proc)
        assert proc.stderr is not None
        run._readers.append(asyncio.create_task(run._read_stderr(proc.stderr)))
        try:
            started = await asyncio.wait_for(run._read_until("daemon.started"), START_TIMEOUT)
        except BaseException:
            await run.kill()
            raise
        run.port = int(started["port"])
        run.recovered = sum(recovered_count(record) for record in run.records)
        run._readers.append(asyncio.create_task(run._read_until(None)))  # keep the pipe drained
        return run

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            self.stderr.append(raw.decode(errors="replace").rstrip("\n"))

    async def _read_until(self, event: str | None) -> dict[str, Any]:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = {"event": NOT_JSON, "line": line}
            self.records.append(record)
            if event is not None and record.get("event") == event:
                return record
        if event is None:
            return {}
        await self.proc.wait()
        raise AssertionError(
            f"agentd exited with {self.proc.returncode} before logging {event!r}; "
            f"stdout: {self.records}; stderr: {self.stderr}")

    def errors(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("level") in ("error", "critical")]

    async def _finish(self) -> int:
        code = await asyncio.wait_for(self.proc.wait(), START_TIMEOUT)
        await asyncio.wait_for(asyncio.gather(*self._readers), START_TIMEOUT)
        return code

    async def kill(self) -> int:
        if self.proc.returncode is None:
            self.proc.kill()  # SIGKILL
        return await self._finish()

    async def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return await self._finish()


@dataclass
class Client:
    """What has been sent to and acknowledged by the daemons, across restarts."""

    batches: list[list[dict[str, Any]]]
    acked: dict[int, int] = field(default_factory=dict)  # n → task id, once answered 201
    sent: int = 0  # batches acknowledged (or settled as uncertain, see `uncertain`)
    uncertain: int | None = None  # the batch in flight when a daemon was killed
    resent: list[tuple[int, bool]] = field(default_factory=list)  # (batch, it had committed)
    progress: asyncio.Event = field(default_factory=asyncio.Event)

    async def post(self, session: aiohttp.ClientSession, index: int) -> list[bool]:
        async with session.post("/v1/tasks/batch", json={"tasks": self.batches[index]}) as response:
            text = await response.text()
            assert response.status == 201, f"batch {index}: HTTP {response.status}: {text}"
        answered = json.loads(text)["tasks"]
        assert len(answered) == len(self.batches[index])
        for request, task in zip(self.batches[index], answered, strict=True):
            assert task["args"] == request["args"] and task["idempotency_key"] == request["idempotency_key"]
            n = request["args"]["n"]
            assert self.acked.get(n, task["id"]) == task["id"], f"task n={n} got a second id"
            self.acked[n] = task["id"]
        self.progress.set()
        return [task["created"] for task in answered]

    async def enqueue(self, session: aiohttp.ClientSession) -> None:
        """Send every batch not sent yet, staying at most AHEAD batches ahead of the workers.

        A batch in flight when the daemon dies may or may not have committed; it is sent
        again with the same idempotency keys once the next daemon is up (see `resend`)."""
        while self.sent < len(self.batches):
            if self.sent >= AHEAD:
                task = await wait_final(session, self.acked[self.batches[self.sent - AHEAD][-1]["args"]["n"]])
                assert task["status"] in FINAL, f"task {task['id']} is still {task['status']} after {WAIT} s"
            self.uncertain = self.sent
            created = await self.post(session, self.sent)
            assert all(created), f"batch {self.sent}: fresh idempotency keys matched a task: {created}"
            self.uncertain = None
            self.sent += 1

    async def resend(self, session: aiohttp.ClientSession) -> None:
        if self.uncertain is None:
            return
        index, self.uncertain = self.uncertain, None
        created = await self.post(session, index)
        # One transaction: the killed daemon committed all of the batch or none of it.
        assert len(set(created)) == 1, f"batch {index} was partly committed before the kill: {created}"
        self.resent.append((index, not created[0]))
        self.sent += 1

    async def wait_acked(self, n: int, enqueuer: asyncio.Task[None]) -> int:
        while n not in self.acked:
            assert not enqueuer.done(), f"the enqueuer stopped: {enqueuer}"
            self.progress.clear()
            await asyncio.wait_for(self.progress.wait(), WAIT)
        return self.acked[n]


async def wait_final(session: aiohttp.ClientSession, task_id: int, patience: float = WAIT) -> dict[str, Any]:
    """Long-poll a task until it is finished; past `patience` seconds, return it as it is."""
    deadline = asyncio.get_running_loop().time() + patience
    while True:
        wait = max(0.0, min(WAIT, deadline - asyncio.get_running_loop().time()))
        async with session.get(f"/v1/tasks/{task_id}", params={"wait": f"{wait:.3f}"}) as response:
            assert response.status == 200, f"task {task_id}: HTTP {response.status}: {await response.text()}"
            task: dict[str, Any] = await response.json()
        if task["status"] in FINAL or wait == 0.0:
            return task


async def list_tasks(session: aiohttp.ClientSession) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = []
    params = {"limit": "500"}
    while True:
        async with session.get("/v1/tasks", params=params) as response:
            assert response.status == 200, await response.text()
            page = await response.json()
        tasks += page["tasks"]
        if page["next"] is None:
            return tasks
        params["before"] = str(page["next"])


def session_for(run: AgentdRun) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        f"http://127.0.0.1:{run.port}", timeout=aiohttp.ClientTimeout(total=WAIT + 30))


@HEAVY
async def test_sigkill_loses_no_task_and_reruns_no_committed_step(
    tmp_path: Path, process_env: Callable[..., dict[str, str]]
) -> None:
    seed = int(os.environ.get("CRASH_TEST_SEED") or random.SystemRandom().randrange(2**32))
    print(f"crash test seed {seed}: replay with CRASH_TEST_SEED={seed}")
    rng = random.Random(seed)
    where = f"(seed {seed})"
    config, effects = write_setup(tmp_path)
    tasks = [
        {"name": "crash.work", "idempotency_key": f"crash-{n}",
         "args": {"n": n, "log": str(effects), "pause": round(rng.uniform(0.001, 0.005), 4)}}
        for n in range(TASKS)
    ]
    client = Client([tasks[i:i + BATCH] for i in range(0, TASKS, BATCH)])
    env = process_env()
    kills: list[int] = []  # the n of the task whose end triggered each kill
    recovered: list[int] = []  # tasks.recovered count of each start

    # --- run, kill at a random moment, restart, until a kill interrupted running tasks ---
    runs: list[AgentdRun] = []
    sessions: list[aiohttp.ClientSession] = []
    enqueuers: list[asyncio.Task[None]] = []
    try:
        while True:
            run = await AgentdRun.start(config, env)
            runs.append(run)
            recovered.append(run.recovered)
            assert run.recovered <= CLAIMED, (
                f"{run.recovered} tasks were running with {WORKERS} workers {where}")
            session = session_for(run)
            sessions.append(session)
            await client.resend(session)
            enqueuer = asyncio.create_task(client.enqueue(session))
            enqueuers.append(enqueuer)
            if sum(recovered) > 0 or len(kills) == MAX_KILLS:
                break
            # The kill follows the end of a random task of the first half of what is still
            # to come; the workers are busy with the ones after it.
            first = client.sent * BATCH
            assert first < TASKS, f"every task was enqueued and no kill interrupted one {where}"
            target = rng.randrange(first, first + (TASKS - first) // 2)
            task = await wait_final(session, await client.wait_acked(target, enqueuer))
            assert task["status"] in FINAL, f"task {task['id']} is still {task['status']} after {WAIT} s"
            assert await run.kill() == -signal.SIGKILL
            kills.append(target)
            # The enqueuer fails: its connection was reset or refused.
            with contextlib.suppress(aiohttp.ClientError):
                await asyncio.wait_for(enqueuer, WAIT)
            await session.close()
        print(f"killed after tasks n={kills}; running tasks recovered per start: {recovered}; "
              f"batches sent again after a kill (index, had committed): {client.resent}")
        assert sum(recovered) > 0, (
            f"none of {len(kills)} kills landed while tasks were running {where}: the test proved nothing")

        # --- the last daemon finishes everything -----------------------------------------
        await asyncio.wait_for(enqueuer, WAIT)
        assert sorted(client.acked) == list(range(TASKS)), f"not every task was acknowledged {where}"
        semaphore = asyncio.Semaphore(64)
        deadline = asyncio.get_running_loop().time() + WAIT

        async def final(task_id: int) -> dict[str, Any]:
            async with semaphore:  # each waits until one deadline; a lost task fails below
                return await wait_final(session, task_id, deadline - asyncio.get_running_loop().time())

        finished = await asyncio.gather(*(final(i) for i in client.acked.values()))
        listed = await list_tasks(session)
        async with session.get("/v1/status") as response:
            status = await response.json()
        await session.close()
        assert await run.terminate() == 0, f"stderr: {run.stderr}"
    finally:
        for task in enqueuers:
            task.cancel()
        await asyncio.gather(*enqueuers, return_exceptions=True)
        for opened in sessions:
            await opened.close()
        for leftover in runs:
            await leftover.kill()
    for started in runs:
        assert started.errors() == [], f"the daemon logged errors {where}"

    # --- no task lost, none added, each ended as the semantics say -------------------------
    unfinished = {task["id"]: task["status"] for task in finished if task["status"] not in FINAL}
    assert unfinished == {}, f"tasks still not finished after {WAIT} s (lost?) {where}"
    by_id = {task["id"]: task for task in finished}
    assert len(by_id) == TASKS, f"two tasks share an id {where}"
    assert sorted(t["id"] for t in listed) == sorted(by_id), (
        f"the daemon holds other tasks than those it acknowledged {where}: "
        f"{[t for t in listed if t['id'] not in by_id]}")
    assert status["tasks"]["by_status"] == {"succeeded": TASKS}, where
    ran = read_effects(effects)
    executions: dict[tuple[int, str], list[int]] = defaultdict(list)  # attempts, in order
    for task_id, step, attempt in ran:
        executions[task_id, step].append(attempt)
    extra_runs = 0
    for task in finished:
        n, task_id, attempts = task["args"]["n"], task["id"], task["attempts"]
        label = f"task {task_id} (n={n}, attempts {attempts}) {where}"
        assert task["status"] == "succeeded", f"{label}: {task['status']}: {task['error']}"
        assert 1 <= attempts <= 1 + len(kills), label
        if n % 3:
            assert task["result"] == {"n": n, "double": n * 2}, label
            assert not executions.get((task_id, "one")) and not executions.get((task_id, "two")), label
            continue
        assert set(task["result"]) == {"n", "double", "one", "two"}, label
        assert task["result"]["double"] == n * 2, label
        for step in ("one", "two"):
            runs_of_step = executions.get((task_id, step), [])
            assert runs_of_step, f"{label}: step {step} never ran"
            # Each attempt runs a step at most once, and only until one run commits: the
            # memoized result is that of the last run; a committed step never runs again.
            assert runs_of_step == sorted(set(runs_of_step)), (
                f"{label}: step {step} ran in attempts {runs_of_step}")
            assert task["result"][step] == {"task": task_id, "step": step, "attempt": runs_of_step[-1]}, label
            assert runs_of_step[-1] <= attempts, label
        # Step two starts only after step one committed, so never in an earlier attempt.
        assert executions[task_id, "two"][0] >= executions[task_id, "one"][-1], label
        reruns = len(executions[task_id, "one"]) + len(executions[task_id, "two"]) - 2
        # A kill interrupts one attempt, in which at most one step was in flight.
        assert reruns <= attempts - 1, f"{label}: {reruns} step runs more than once"
        extra_runs += reruns
    assert not {task_id for task_id, _ in executions} - set(by_id), f"steps ran for unknown tasks {where}"
    # Every recovered task ran once more (no task lost, none run again without a kill)...
    assert sum(t["attempts"] - 1 for t in finished) == sum(recovered), where
    # ...and at most the steps in flight at the kills (at most one per worker) ran twice.
    assert extra_runs <= WORKERS * len(kills), where
    assert sum(recovered) <= CLAIMED * len(kills), where
    print(f"steps run: {len(ran)} for {len(executions)} steps; run again after a kill: {extra_runs}")

    # --- [log] format = "json": every line the daemons wrote is one JSON object --------------
    not_json = [r["line"] for started in runs for r in started.records if r["event"] == NOT_JSON]
    assert not_json == [], "the daemon wrote log lines that are not JSON despite [log] format = \"json\""
