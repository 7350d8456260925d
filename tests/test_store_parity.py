"""The HTTP API answers the same on SQLite and on PostgreSQL: one script of requests, sent
to a daemon on each store, gets the same statuses and bodies, times and event ids aside.

Each store's own tests show it works; this shows the two agree, where a difference is easy
to miss: how a value comes back (jsonb once gave metadata back in its own spelling), what
counts as a change, which request is refused and how."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pg import fresh_database

# Fields whose values depend on the clock, and a recall's distance and score: SQLite and
# pgvector compute them in float32 each its own way (the 7th digit differs; the order not).
VARYING = frozenset({"created_at", "updated_at", "run_at", "started_at", "finished_at", "expires_at",
                     "at", "next_fire_at", "last_fire_at", "open_until", "token", "distance", "score"})
ODD = {"unicode": "ü→𝄞", "big": 2**70, "tiny": 5e-324, "huge": 1e300, "minus_zero": -0.0,
       "nested": {"z": [1, 2.5, None, True], "a": {}}}

# (method, path, body): sent in this order. Task and memory ids are the same on both
# stores, as each starts empty.
SCRIPT: list[tuple[str, str, Any]] = [
    ("POST", "/v1/tasks", {"name": "qt.echo", "args": {"value": ODD}, "priority": -3}),
    ("GET", "/v1/tasks/1?wait=5", None),
    ("POST", "/v1/tasks", {"name": "qt.fail_now"}),
    ("GET", "/v1/tasks/2?wait=5", None),
    # Last of the tasks: PostgreSQL's identity spends an id on each duplicate it turns away.
    ("POST", "/v1/tasks/batch", {"tasks": [
        {"name": "qt.echo", "args": {"value": n}, "idempotency_key": f"k{n % 2}"} for n in range(4)]}),
    ("GET", "/v1/tasks/3?wait=5", None),
    ("GET", "/v1/tasks/4?wait=5", None),
    ("GET", "/v1/tasks?status=dead", None),
    ("GET", "/v1/tasks?name=qt.echo&limit=2", None),
    ("POST", "/v1/tasks", {"name": "qt.nothing"}),
    ("POST", "/v1/tasks", {"name": "qt.echo", "idempotency_key": "a\u0000"}),
    ("POST", "/v1/memory", {"text": "the sky is blue", "namespace": "facts", "metadata": ODD}),
    ("POST", "/v1/memory", {"text": "the  sky is blue", "namespace": "facts"}),
    ("POST", "/v1/memory/batch", {"memories": [{"text": "grass is green", "namespace": "facts",
                                                "metadata": {"kind": "fact", "n": 5}},
                                               {"text": "snow is white", "namespace": "facts",
                                                "metadata": {"kind": "guess", "n": 5.0}}]}),
    ("PATCH", "/v1/memory/1", {"metadata": ODD}),
    ("PATCH", "/v1/memory/2", {"text": "grass is very green", "metadata": {"kind": "fact", "n": 6}}),
    ("GET", "/v1/memory/1/history", None),
    ("GET", "/v1/memory/2/history", None),
    ("GET", '/v1/memory/search?q=green&namespace=facts&k=1&where={"kind":"fact"}', None),
    ("GET", '/v1/memory/search?q=snow&namespace=facts&k=1&where={"n":"5"}', None),
    ("GET", '/v1/memory/search?q=snow&namespace=facts&k=1&where={"kind":["guess","x"]}', None),
    ("GET", '/v1/memory/search?q=snow&namespace=facts&hybrid=true&k=1&where={"absent":null}', None),
    ("POST", "/v1/memory", {"text": "a\u0000", "namespace": "facts"}),
    ("DELETE", "/v1/memory/3", None),
    ("GET", "/v1/memory/3", None),
    ("POST", "/v1/sessions/chat-1/messages", {"role": "user", "content": "hi", "meta": ODD}),
    ("POST", "/v1/sessions/chat-1/messages", {"role": "assistant", "content": "hello"}),
    ("GET", "/v1/sessions/chat-1/messages?limit=5", None),
    ("GET", "/v1/sessions", None),
    ("DELETE", "/v1/sessions/chat-1/messages", None),
    ("GET", "/v1/sessions/chat-1/messages", None),
    ("POST", "/v1/events", {"topic": "app.note", "data": ODD}),
    ("POST", "/v1/schedules", {"id": "nightly", "task": "qt.echo", "cron": "0 3 * * *",
                               "args": {"value": ODD}}),
    ("POST", "/v1/schedules", {"id": "nightly", "task": "qt.echo", "every": "1h"}),
    ("PATCH", "/v1/schedules/nightly", {"paused": True}),
    ("GET", "/v1/schedules/nightly", None),
    ("DELETE", "/v1/schedules/nightly", None),
    ("GET", "/v1/schedules/nightly", None),
    ("POST", "/v1/stream-tokens", {"path": "/v1/stream", "topics": "task.*"}),
]


def _masked(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: "<varies>" if key in VARYING else _masked(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_masked(item) for item in value]
    return value


async def _answers(daemon: Any, http: Any) -> list[tuple[str, str, int, str]]:
    client = http(daemon)
    answers = []
    for method, path, body in SCRIPT:
        async with client.request(method, path, json=body) as response:
            text = await response.text()
        shown = json.dumps(_masked(json.loads(text))) if text else ""
        if path == "/v1/events":  # the id is the store's numbering: not compared
            shown = json.dumps({k: v for k, v in json.loads(text).items() if k != "id"})
        answers.append((method, path, response.status, shown))
    return answers


async def test_the_api_answers_the_same_on_sqlite_and_postgresql(
        start_daemon: Any, http: Any, copied_plugin: Any, tmp_path: Path) -> None:
    plugins = copied_plugin("queue_plugin.py", "qt")
    answers = {}
    for store, url in (("sqlite", None), ("postgresql", await fresh_database())):
        overrides = {"tasks": {"queues": {"default": 1}}}
        if url is not None:
            overrides["store"] = {"url": url}
        daemon, _ = await start_daemon(plugin_dirs=[plugins], overrides=overrides,
                                       state_dir=tmp_path / store)
        answers[store] = await _answers(daemon, http)
        await daemon.stop()
    different = [(sqlite, postgresql) for sqlite, postgresql in zip(
        answers["sqlite"], answers["postgresql"], strict=True) if sqlite != postgresql]
    for sqlite, postgresql in different:
        print("sqlite:    ", sqlite, "\npostgresql:", postgresql)
    assert different == []
