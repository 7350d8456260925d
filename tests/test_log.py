"""configure_logging: structlog and stdlib records as one JSON shape, with a component."""

from __future__ import annotations

import io
import json
import logging
import re
from typing import Any

import pytest
from structlog.testing import capture_logs

from agentd.log import configure_logging, get_logger


@pytest.fixture
def stream(logging_restored: None) -> io.StringIO:
    """A log stream; configure_logging's global changes are undone afterwards."""
    return io.StringIO()


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_structlog_and_stdlib_lines_are_json_with_a_component(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream)
    get_logger("bus").info("bus.thing", n=1)
    logging.getLogger("aiohttp.server").warning("oops %s", "here")
    first, second = records(stream)
    assert first["component"] == "bus"
    assert first["event"] == "bus.thing"
    assert first["n"] == 1
    assert first["level"] == "info"
    assert first["timestamp"].endswith("Z")
    assert second["component"] == "aiohttp.server"
    assert second["event"] == "oops here"
    assert second["level"] == "warning"
    assert second["timestamp"].endswith("Z")


def test_a_logger_cached_on_first_use_follows_a_later_configuration(stream: io.StringIO) -> None:
    """A daemon module's logger, once used, is cached with the configured processors list:
    configure_logging changes that list in place, so the cached logger follows a second
    configuration, and structlog's capture_logs. (The bug: tests that captured a module's
    log line failed whenever an earlier test in the same process had run the CLI.)"""
    configure_logging("info", "json", stream)
    log = get_logger("cached")
    log.info("cached.first")
    configure_logging("warning", "json", stream)
    with capture_logs() as captured:
        log.error("cached.second")
    assert [line["event"] for line in captured] == ["cached.second"]
    assert [line["event"] for line in records(stream)] == ["cached.first"]


def test_plugin_loggers_carry_component_and_plugin(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream)
    get_logger("plugin", plugin="news").info("fetched", items=3)
    (record,) = records(stream)
    assert record["component"] == "plugin"
    assert record["plugin"] == "news"
    assert record["items"] == 3


def test_auto_is_json_off_a_terminal(stream: io.StringIO) -> None:
    assert not stream.isatty()
    configure_logging("info", "auto", stream)
    get_logger("x").info("hello")
    assert records(stream)[0]["event"] == "hello"


def test_console_format_is_for_people(stream: io.StringIO) -> None:
    configure_logging("info", "console", stream)
    get_logger("bus").info("bus.thing", n=1)
    line = re.sub(r"\x1b\[[0-9;]*m", "", stream.getvalue())  # colours, if any
    assert "bus.thing" in line
    assert "component=bus" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_level_filters_both_kinds(stream: io.StringIO) -> None:
    configure_logging("warning", "json", stream)
    get_logger("x").info("dropped")
    logging.getLogger("lib").info("dropped too")
    get_logger("x").warning("kept")
    logging.getLogger("lib").error("kept too")
    assert [r["event"] for r in records(stream)] == ["kept", "kept too"]


def test_exceptions_are_structured(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream)
    try:
        raise ValueError("bad value")
    except ValueError:
        get_logger("spawn").exception("handler.failed", handler="p.h")
    (record,) = records(stream)
    assert record["level"] == "error"
    assert record["handler"] == "p.h"
    assert record["exception"][0]["exc_type"] == "ValueError"
    assert record["exception"][0]["exc_value"] == "bad value"


def test_a_traceback_shows_no_local_values(stream: io.StringIO) -> None:
    """Frames' locals hold what must not reach a journal: a request's bearer token (the
    auth middleware's `given` and `expected` were in every 500's line), a task's args."""
    configure_logging("info", "json", stream)

    def check(given: bytes, expected: bytes) -> None:
        raise ValueError("refused")

    try:
        check(b"Bearer s3cret-token", b"Bearer s3cret-token")
    except ValueError:
        get_logger("http").exception("http.handler_failed")
    line = stream.getvalue()
    assert "s3cret-token" not in line
    (record,) = records(stream)
    assert record["exception"][0]["frames"][-1]["name"] == "check"


def test_journald_priority_prefix(stream: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    configure_logging("info", "json", stream)
    get_logger("x").info("i")
    get_logger("x").warning("w")
    logging.getLogger("lib").error("e")
    lines = stream.getvalue().splitlines()
    assert [line[:3] for line in lines] == ["<6>", "<4>", "<3>"]
    assert [json.loads(line[3:])["event"] for line in lines] == ["i", "w", "e"]
