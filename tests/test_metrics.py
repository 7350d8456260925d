"""`GET /metrics`: Prometheus' text format, read by promtool and by the figures it must show
after a daemon has done real work (tasks that succeed, fail, retry and die, HTTP requests,
a stream, a schedule's fire, memory, an LLM call); its auth; the Grafana dashboard's names."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agentd.app import Daemon
from agentd.config import load_config
from agentd.errors import ConfigError
from agentd.metrics import Exposition, Histogram
from agentd.safemode import SafeMode
from agentd.testing import daemon_url, make_config
from fake_openai import FakeOpenAI

pytestmark = pytest.mark.both_stores

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "docs" / "grafana" / "agentd.json"
WAIT = 10.0

PLUGIN = '''
import asyncio

from agentd import Fail, Plugin, Retry

plugin = Plugin("mt")
GATE = asyncio.Event()


@plugin.task()
async def ok(ctx):
    return "ok"


@plugin.task()
async def refuse(ctx):
    raise Fail("refused")


@plugin.task(max_attempts=2)
async def flaky(ctx):
    if ctx.task.attempt == 1:
        raise Retry(delay=0)
    return "second time"


@plugin.task(max_attempts=1)
async def broken(ctx):
    raise RuntimeError("broken")


@plugin.task()
async def chat(ctx):
    return (await ctx.llm.chat([{"role": "user", "content": "hello"}])).content


@plugin.task()
async def hold(ctx):
    await GATE.wait()
'''

_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Each sample of a scrape: (name, its labels) → value."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match is not None, f"not a sample line: {line!r}"
        labels = frozenset(_LABEL.findall(match["labels"] or ""))
        samples[match["name"], labels] = float(match["value"])
    return samples


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sample `name` with exactly `labels`; 0 when there is none (a counter not yet made)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def families(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


async def scrape(client: aiohttp.ClientSession) -> str:
    async with client.get("/metrics") as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return await response.text()


def promtool(*args: str, text: str = "") -> None:
    """Run `promtool <args>` (given `text` on its input) and require it to pass: skipped
    without promtool, except in CI (.ci/run installs it), where its absence fails."""
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed; .ci/run installs Debian's prometheus package")
        pytest.skip("promtool is not installed (apt-get install --no-install-recommends prometheus)")
    checked = subprocess.run([found, *args], input=text, capture_output=True, text=True, timeout=30,
                             check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def promtool_check(text: str) -> None:
    """`promtool check metrics` on a scrape's `text`: the format and Prometheus' naming rules."""
    promtool("check", "metrics", text=text)


@pytest.fixture
def mt_dir(plugin_dir: Any) -> Path:
    return plugin_dir({"mt.py": PLUGIN}, name="mt_plugins")


async def run_task(client: aiohttp.ClientSession, daemon: Any, name: str) -> str:
    async with client.post("/v1/tasks", json={"name": name}) as response:
        assert response.status == 201, await response.text()
        task_id = (await response.json())["id"]
    return (await daemon.queue.wait(task_id, WAIT)).status


async def test_a_daemon_that_worked_shows_it_in_a_scrape_promtool_accepts(
        start_daemon: Any, http: Any, mt_dir: Path) -> None:
    async with FakeOpenAI() as llm:
        llm.reply("hi there")
        daemon, _ = await start_daemon(plugin_dirs=[mt_dir], overrides={
            "llm": {"base_url": llm.url, "model": "test-model"},
            "tasks": {"retry_base": 0.01, "retry_max": 0.02}})
        client = http(daemon)
        before = parse(await scrape(client))
        assert value(before, "agentd_tasks_succeeded_total", task="mt.ok") == 0

        assert [await run_task(client, daemon, "mt.ok") for _ in range(3)] == ["succeeded"] * 3
        assert await run_task(client, daemon, "mt.refuse") == "failed"
        assert await run_task(client, daemon, "mt.flaky") == "succeeded"
        assert await run_task(client, daemon, "mt.broken") == "dead"
        assert await run_task(client, daemon, "mt.chat") == "succeeded"

        # A stream client, counted while it is open.
        async with client.get("/v1/stream") as stream:
            assert stream.status == 200
            open_now = parse(await scrape(client))
        # A schedule fired by hand, and memory remembered and recalled.
        tick = {"id": "mt.tick", "every": 3600, "task": "mt.ok"}
        async with client.post("/v1/schedules", json=tick) as made:
            assert made.status == 201, await made.text()
        async with client.post("/v1/schedules/mt.tick/run") as fired:
            assert fired.status == 200, await fired.text()
            scheduled = (await fired.json())["last_task_id"]
        async with client.post("/v1/memory", json={"text": "The rover landed in Jezero crater."}) as kept:
            assert kept.status == 201, await kept.text()
        async with client.get("/v1/memory/search", params={"q": "Where did the rover land?"}) as found:
            assert found.status == 200, await found.text()
        async with client.get("/v1/no-such-route") as missing:
            assert missing.status == 404
        assert (await daemon.queue.wait(scheduled, WAIT)).status == "succeeded"

        text = await scrape(client)
        after = parse(text)

    promtool_check(text)
    assert value(open_now, "agentd_stream_clients") >= 1
    assert value(after, "agentd_tasks_succeeded_total", task="mt.ok") == 4  # three, and the schedule's
    assert value(after, "agentd_tasks_enqueued_total", task="mt.ok") == 4
    assert value(after, "agentd_tasks_failed_total", task="mt.refuse") == 1
    assert value(after, "agentd_tasks_retried_total", task="mt.flaky") == 1
    assert value(after, "agentd_tasks_succeeded_total", task="mt.flaky") == 1
    assert value(after, "agentd_tasks_started_total", task="mt.flaky") == 2
    assert value(after, "agentd_tasks_dead_total", task="mt.broken") == 1
    assert value(after, "agentd_task_run_seconds_count", task="mt.flaky") == 2
    assert value(after, "agentd_task_run_seconds_bucket", task="mt.ok", le="+Inf") == 4
    assert value(after, "agentd_task_dispatch_latency_seconds_count", task="mt.ok") == 4
    assert value(after, "agentd_tasks", queue="default", state="dead") == 1
    assert value(after, "agentd_tasks", queue="default", state="failed") == 1
    assert value(after, "agentd_schedule_fires_total", schedule="mt.tick") == 1
    assert value(after, "agentd_llm_calls_total", model="test-model", task="mt.chat") == 1
    assert value(after, "agentd_llm_tokens_total", model="test-model", task="mt.chat", kind="completion") > 0
    assert value(after, "agentd_memories", namespace="default") == 1
    assert value(after, "agentd_memory_recall_duration_seconds_count") == 1
    # One text remembered, one query recalled: two model calls, nothing left waiting.
    assert value(after, "agentd_memory_embed_calls_total") == 2
    assert value(after, "agentd_memory_embedded_texts_total") == 2
    assert value(after, "agentd_memory_embed_queued") == 0
    assert value(after, "agentd_memory_remembers_in_flight") == 0
    assert value(after, "agentd_http_requests_total", method="POST", route="/v1/tasks", status="201") == 7
    assert value(after, "agentd_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert value(after, "agentd_http_request_duration_seconds_count", method="POST", route="/v1/tasks") == 7
    published = "agentd_bus_published_total"
    assert value(after, published, bus="daemon") > value(before, published, bus="daemon")
    assert value(after, "agentd_database_bytes", database=daemon.store.name) > 0
    assert value(after, "process_resident_memory_bytes") > 0
    assert value(after, "agentd_scrape_failed", part="tasks") == 0


async def test_queue_depth_and_the_oldest_due_tasks_age(start_daemon: Any, http: Any, mt_dir: Path) -> None:
    # The daemon's own maintenance tasks (the event sweep fires each minute, on the clock)
    # would be counted too, one time in many: pushed past 2060, as in test_queue.
    never = 3e9
    daemon, events = await start_daemon(plugin_dirs=[mt_dir], overrides={
        "tasks": {"queues": {"default": 1}, "purge_interval": never},
        "events": {"sweep_interval": never}, "store": {"maintenance_interval": never},
        "memory": {"purge_interval": never}})
    client = http(daemon)
    holding = await daemon.queue.enqueue("mt.hold")
    await events.wait_for("task.started", task_id=holding.id)
    waiting = await daemon.queue.enqueue("mt.ok")
    await daemon.queue.enqueue("mt.ok", delay=3600)  # queued, not due
    samples = parse(await scrape(client))
    assert value(samples, "agentd_tasks", queue="default", state="queued") == 2
    assert value(samples, "agentd_tasks", queue="default", state="running") == 1
    assert value(samples, "agentd_queue_depth", queue="default") == 1
    assert value(samples, "agentd_queue_oldest_age_seconds", queue="default") > 0
    sys.modules["agentd_plugins.mt"].GATE.set()
    assert (await daemon.queue.wait(waiting.id, WAIT)).status == "succeeded"
    samples = parse(await scrape(client))
    assert value(samples, "agentd_queue_depth", queue="default") == 0
    assert value(samples, "agentd_queue_oldest_age_seconds", queue="default") == 0


@pytest.mark.sqlite_only
async def test_a_daemon_in_safe_mode_without_memory_still_scrapes(tmp_path: Path, plugin_dir: Any) -> None:
    """Safe mode starts no plugin, worker or scheduler, and memory with a plugin's embedder
    stays closed: the scrape leaves memory's figures out and shows the rest."""
    plugins = plugin_dir({"vec.py": (
        "from agentd import Plugin\n"
        "plugin = Plugin('vec')\n"
        "class Embedder:\n"
        "    id, dimension = 'vec-2', 2\n"
        "    async def embed(self, texts):\n"
        "        return [[1.0, 0.0] for _ in texts]\n"
        "@plugin.embedder('vec')\n"
        "def make(config):\n"
        "    return Embedder()\n")})
    config = make_config(tmp_path, [plugins], {"memory": {"embedder": "vec"}})
    async with Daemon(config, safe_mode=SafeMode("two starts crashed", 1.0, ())) as daemon:
        assert daemon.memory is None
        async with aiohttp.ClientSession(daemon_url(daemon)) as client:
            text = await scrape(client)
    promtool_check(text)
    samples = parse(text)
    assert not any(name == "agentd_memories" for name, _ in samples)
    assert value(samples, "agentd_tasks", queue="default", state="queued") == 0
    assert not any(name == "agentd_scrape_failed" for name, _ in samples)


@pytest.mark.sqlite_only
async def test_the_scrape_takes_the_api_token_or_the_metrics_token(start_daemon: Any, http: Any) -> None:
    daemon, _ = await start_daemon(overrides={"server": {"token": "api-token"},
                                              "metrics": {"token": "scrape-token"}})
    for token, status in ((None, 401), ("wrong", 401), ("scrape-token", 200), ("api-token", 200)):
        async with http(daemon, token=token).get("/metrics") as response:
            assert response.status == status, token
    # The metrics token scrapes, and does nothing else.
    async with http(daemon, token="scrape-token").get("/v1/status") as response:
        assert response.status == 401


@pytest.mark.sqlite_only
async def test_a_metrics_token_alone_guards_the_scrape_only(start_daemon: Any, http: Any) -> None:
    daemon, _ = await start_daemon(overrides={"metrics": {"token": "scrape-token"}})
    async with http(daemon).get("/metrics") as response:
        assert response.status == 401
        assert "[metrics] token" in (await response.json())["error"]["message"]
    async with http(daemon, token="scrape-token").get("/metrics") as response:
        assert response.status == 200
    async with http(daemon).get("/v1/status") as response:
        assert response.status == 200
    async with http(daemon).get("/v1/openapi.json") as response:
        operation = (await response.json())["paths"]["/metrics"]["get"]
    assert "401" in operation["responses"]
    assert operation["security"] == [{"bearer": []}]


@pytest.mark.sqlite_only
async def test_the_document_lists_the_scrape_as_prometheus_text(start_daemon: Any, http: Any) -> None:
    daemon, _ = await start_daemon()
    async with http(daemon).get("/v1/openapi.json") as response:
        operation = (await response.json())["paths"]["/metrics"]["get"]
    assert list(operation["responses"]["200"]["content"]) == ["text/plain; version=0.0.4"]
    assert "401" not in operation["responses"]  # no token configured: loopback is trusted


@pytest.mark.sqlite_only
def test_a_metrics_token_that_cannot_be_sent_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[metrics\] token: expected visible ASCII"):
        load_config(overrides={"metrics": {"token": "two words"}})
    secret = tmp_path / "metrics-token"
    secret.write_text("from-a-file\n")
    secret.chmod(0o600)
    config = load_config(overrides={"metrics": {"token_file": str(secret)}})
    assert config.secrets.metrics_token == "from-a-file"
    with pytest.raises(ConfigError, match=r"\[metrics\] token and token_file are both set"):
        load_config(overrides={"metrics": {"token": "x", "token_file": str(secret)}})


@pytest.mark.sqlite_only
def test_label_values_and_help_are_escaped_and_buckets_cumulative() -> None:
    """A label value is whatever a plugin named (a model, a namespace): quotes, backslashes
    and line breaks must not break the format."""
    odd = 'a "quoted"\\ model\nname'
    out = Exposition()
    out.counter("agentd_test_total", "Help with a \\ and a\nline break.", ("model",), {(odd,): 2})
    latency = Histogram((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 7.0):
        latency.observe(seconds)
    out.histogram("agentd_test_seconds", "A histogram.", (), {(): latency})
    text = out.text()
    promtool_check(text)
    samples = parse(text)
    assert value(samples, "agentd_test_total", model='a \\"quoted\\"\\\\ model\\nname') == 2
    assert [value(samples, "agentd_test_seconds_bucket", le=le) for le in ("0.1", "1.0", "+Inf")] == [2, 3, 4]
    assert value(samples, "agentd_test_seconds_sum") == pytest.approx(7.65)
    assert value(samples, "agentd_test_seconds_count") == 4


@pytest.mark.sqlite_only
async def test_every_metric_the_dashboard_queries_is_exported_in_promql_that_parses(
        start_daemon: Any, http: Any, tmp_path: Path) -> None:
    daemon, _ = await start_daemon()
    exported = families(await scrape(http(daemon)))
    series = exported | {f"{name}_{suffix}" for name in exported for suffix in ("bucket", "sum", "count")}
    dashboard = json.loads(DASHBOARD.read_text())
    queried = _queried_names(dashboard)
    assert len(queried) >= 20
    assert sorted(queried - series) == []
    # Every panel's query goes through the dashboard's Prometheus data source variable.
    datasources = {json.dumps(panel.get("datasource")) for panel in _panels(dashboard)}
    assert datasources == {json.dumps({"type": "prometheus", "uid": "${datasource}"})}
    assert [v["type"] for v in dashboard["templating"]["list"] if v["name"] == "datasource"] == ["datasource"]
    # Every query is PromQL Prometheus parses: promtool checks them as recording rules, with
    # Grafana's variables given values.
    grafana = {"$__rate_interval": "5m", "$__range": "1h", "$instance": ".*"}
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for number, query in enumerate(_expressions(dashboard)):
        expr = re.sub(r"\$\w+", lambda variable: grafana[variable[0]], query)
        rules += [f"      - record: dashboard:query{number}", f"        expr: {json.dumps(expr)}"]
    rules_file = tmp_path / "dashboard_rules.yml"
    rules_file.write_text("\n".join(rules) + "\n")
    promtool("check", "rules", str(rules_file))


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels += [panel] if panel["type"] != "row" else []
        panels += panel.get("panels", [])
    return panels


def _expressions(dashboard: dict[str, Any]) -> list[str]:
    """The PromQL of the dashboard's panels."""
    return [target["expr"] for panel in _panels(dashboard) for target in panel.get("targets", [])]


def _queried_names(dashboard: dict[str, Any]) -> set[str]:
    """The metric names the dashboard's panels and variables query."""
    expressions = _expressions(dashboard)
    expressions += [str(v.get("query", "")) for v in dashboard["templating"]["list"] if v["type"] == "query"]
    names = set()
    for expr in expressions:
        stripped = re.sub(r'\{[^}]*\}|"[^"]*"|\[[^\]]*\]', " ", expr)  # selectors, strings, ranges
        names |= {word for word in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", stripped)
                  if word.startswith(("agentd_", "process_"))}
    return names

