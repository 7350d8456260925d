"""Plugins written into tmp dirs and loaded by a real daemon: discovery, isolation of
failures, config tables, fire-and-forget handlers, unload and shutdown hooks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agentd.errors import PatternError, PluginError
from agentd.plugin import Plugin

HELLO = """
    from agentd import Plugin

    plugin = Plugin("hello", description="says hello")

    @plugin.startup
    async def start(ctx):
        ctx.publish("test.hello.started", {"config": dict(ctx.config)})

    @plugin.on("greet.*")
    async def on_greet(ctx, event):
        gate = event.data.get("gate")
        if gate is not None:
            await gate.wait()
        ctx.publish("test.hello.greeted", {"topic": event.topic, "cause": event.id})

    @plugin.on("boom")
    async def explode(ctx, event):
        raise ValueError("handler exploded")

    @plugin.shutdown
    def first_declared(ctx):
        ctx.publish("test.hello.shutdown", {"hook": "first_declared"})

    @plugin.shutdown
    async def second_declared(ctx):
        ctx.publish("test.hello.shutdown", {"hook": "second_declared"})
"""

PACKAGE_INIT = """
    from agentd import Plugin

    from .helper import VALUE

    plugin = Plugin("pkgplug")

    @plugin.startup
    def start(ctx):
        ctx.publish("test.pkgplug.started", {"value": VALUE})
"""

STARTUP_FAILS = """
    from agentd import Plugin

    plugin = Plugin("startup_fails")

    @plugin.on("greet.*")
    async def on_greet(ctx, event):
        ctx.publish("test.startup_fails.greeted")

    @plugin.startup
    async def start(ctx):
        raise RuntimeError("cannot start")

    @plugin.shutdown
    def stop(ctx):
        ctx.publish("test.startup_fails.shutdown")
"""

BROKEN = {
    "broken_syntax.py": "def broken(:\n",
    "raises_on_import.py": "raise RuntimeError('import went wrong')\n",
    "no_plugin.py": "VALUE = 1\n",
    "sync_handler.py": """
        from agentd import Plugin
        plugin = Plugin("sync_handler")

        @plugin.on("x")
        def not_async(ctx, event):
            pass
    """,
    "bad_name.py": "from agentd import Plugin\nplugin = Plugin('Bad Name')\n",
}


@pytest.fixture
def good_plugins(plugin_dir: Callable[..., Path]) -> Path:
    return plugin_dir({
        "hello.py": HELLO,
        "pkgplug/__init__.py": PACKAGE_INIT,
        "pkgplug/helper.py": "VALUE = 42\n",
        "_private.py": "raise RuntimeError('modules starting with _ are not plugins')\n",
        ".hidden.py": "raise RuntimeError('hidden files are not plugins')\n",
        "README.txt": "not a plugin",
        "not_a_package/data.py": "raise RuntimeError('a folder without __init__ is not a plugin')\n",
    })


# --------------------------------------------------------------------------- loading


async def test_module_and_package_plugins_start(start_daemon: Any, good_plugins: Path) -> None:
    daemon, events = await start_daemon([good_plugins])
    assert daemon.plugins.states() == [
        {"name": "hello", "source": str(good_plugins / "hello.py"), "state": "started", "error": None},
        {"name": "pkgplug", "source": str(good_plugins / "pkgplug"), "state": "started", "error": None},
    ]
    assert (await events.wait_for("test.pkgplug.started")).data == {"value": 42}
    assert (await events.wait_for("plugin.started", plugin="hello")).data == {"plugin": "hello"}


async def test_plugin_config_is_its_table(start_daemon: Any, good_plugins: Path) -> None:
    daemon, events = await start_daemon(
        [good_plugins], overrides={"plugins": {"hello": {"greeting": "hi", "times": 2}}}
    )
    started = await events.wait_for("test.hello.started")
    assert started.data == {"config": {"greeting": "hi", "times": 2}}
    plugin = daemon.plugins.plugins["hello"].plugin
    assert dict(plugin.config) == {"greeting": "hi", "times": 2}
    with pytest.raises(TypeError):
        plugin.config["greeting"] = "changed"  # read-only
    # pkgplug has no table: it gets an empty one.
    assert dict(daemon.plugins.plugins["pkgplug"].plugin.config) == {}


def test_max_attempts_on_a_fire_and_forget_handler_is_refused() -> None:
    """It was taken and ignored: the handler still ran at most once, never retried."""
    plugin = Plugin("retries")
    with pytest.raises(PluginError, match=r"plugin retries: @on\('x\.y'\) max_attempts needs "
                                          r"durable=True"):
        plugin.on("x.y", max_attempts=3)
    plugin.on("x.y", durable=True, max_attempts=3)


def test_the_plugin_name_agentd_is_refused() -> None:
    """A plugin named agentd could declare the schedule agentd.purge_tasks and replace the
    daemon's own without a word (finished tasks were then never purged)."""
    with pytest.raises(PluginError, match=r"plugin name 'agentd' is the daemon's own: its tasks "
                                          r"and schedules are named agentd\.\*; choose another"):
        Plugin("agentd")


async def test_broken_plugins_are_failed_and_the_daemon_runs_on(
    start_daemon: Any, plugin_dir: Callable[..., Path], good_plugins: Path, http: Any
) -> None:
    broken = plugin_dir({**BROKEN, "startup_fails.py": STARTUP_FAILS}, name="broken")
    daemon, events = await start_daemon([good_plugins, broken])
    records = {p["name"]: p for p in daemon.plugins.states()}
    assert records["hello"]["state"] == "started"
    assert records["pkgplug"]["state"] == "started"
    expected_errors = {
        "broken_syntax": "SyntaxError: ",
        "raises_on_import": "RuntimeError: import went wrong",
        "no_plugin": f"PluginError: {broken / 'no_plugin.py'} defines no `plugin = Plugin(...)`",
        "sync_handler": "PluginError: plugin sync_handler: @on handler not_async must be async def",
        "bad_name": "PluginError: plugin name 'Bad Name' must match [a-z][a-z0-9_]*",
        "startup_fails": "RuntimeError: cannot start",
    }
    for name, error in expected_errors.items():
        assert records[name]["state"] == "failed", name
        assert records[name]["error"].startswith(error), (name, records[name]["error"])
    assert sorted(daemon.plugins.failed) == sorted(expected_errors)
    failed_events = {e.data["plugin"] for e in events.events if e.topic == "plugin.failed"}
    assert failed_events == set(expected_errors)

    client = http(daemon)
    async with client.get("/healthz") as response:
        assert response.status == 200
        health = await response.json()
    assert health["status"] == "degraded"
    health_plugins = {p["name"]: p for p in health["plugins"]}
    for name, error in expected_errors.items():
        assert health_plugins[name]["state"] == "failed"
        assert health_plugins[name]["error"].startswith(error)
    assert health_plugins["hello"] == {
        "name": "hello", "source": str(good_plugins / "hello.py"), "state": "started", "error": None
    }

    async with client.get("/v1/status") as response:
        assert response.status == 200
        status = await response.json()
    assert status["plugins"] == health["plugins"]

    async with client.get("/readyz") as response:
        assert response.status == 503  # a deployment with failed plugins is not ready
        ready = await response.json()
    assert ready["ready"] is False
    assert ready["checks"]["plugins"]["ok"] is False
    assert sorted(ready["checks"]["plugins"]["failed"]) == sorted(expected_errors)


async def test_a_plugin_calling_sys_exit_on_import_is_failed_not_fatal(
    start_daemon: Any, plugin_dir: Callable[..., Path], good_plugins: Path
) -> None:
    """A common script idiom: `sys.exit("pip install x")` when a dependency is missing.
    SystemExit is a BaseException, but it is this plugin's failure, not the daemon's."""
    broken = plugin_dir({"needs_dep.py": """
        import sys
        try:
            import a_module_that_is_not_installed  # noqa: F401
        except ImportError:
            sys.exit("needs_dep: pip install a_module_that_is_not_installed")
    """}, name="broken")
    daemon, _ = await start_daemon([good_plugins, broken])
    records = {p["name"]: p for p in daemon.plugins.states()}
    assert records["hello"]["state"] == "started"
    assert records["needs_dep"]["state"] == "failed"
    assert records["needs_dep"]["error"] == (
        "SystemExit: needs_dep: pip install a_module_that_is_not_installed"
    )


async def test_healthz_is_ok_without_failures(start_daemon: Any, good_plugins: Path, http: Any) -> None:
    daemon, _ = await start_daemon([good_plugins])
    async with http(daemon).get("/healthz") as response:
        assert (await response.json())["status"] == "ok"


async def test_duplicate_names_fail_the_second(start_daemon: Any, plugin_dir: Callable[..., Path]) -> None:
    source = "from agentd import Plugin\nplugin = Plugin('dup')\n"
    directory = plugin_dir({"dup_a.py": source, "dup_b.py": source})
    daemon, _ = await start_daemon([directory])
    assert daemon.plugins.states() == [
        {"name": "dup", "source": str(directory / "dup_a.py"), "state": "started", "error": None},
        {"name": "dup", "source": str(directory / "dup_b.py"), "state": "failed",
         "error": f"PluginError: plugin name 'dup' is already used by {directory / 'dup_a.py'}"},
    ]
    assert daemon.plugins.failed == ["dup"]


async def test_enabled_loads_only_those(start_daemon: Any, plugin_dir: Callable[..., Path],
                                        good_plugins: Path) -> None:
    broken = plugin_dir(BROKEN, name="broken")
    daemon, _ = await start_daemon([good_plugins, broken], overrides={"plugins": {"enabled": ["hello"]}})
    # Filtered before import: the broken modules were not even imported, so not failed.
    assert [(p["name"], p["state"]) for p in daemon.plugins.states()] == [("hello", "started")]


async def test_disabled_skips_by_module_and_by_plugin_name(
    start_daemon: Any, plugin_dir: Callable[..., Path], good_plugins: Path
) -> None:
    extra = plugin_dir({
        "module_name.py": "from agentd import Plugin\nplugin = Plugin('plugin_name')\n",
        "other.py": "from agentd import Plugin\nplugin = Plugin('other')\n",
    }, name="extra")
    broken = plugin_dir(BROKEN, name="broken")
    daemon, _ = await start_daemon(
        [good_plugins, extra, broken],
        overrides={"plugins": {"disabled": ["hello", "plugin_name", *[n[:-3] for n in BROKEN]]}},
    )
    assert [(p["name"], p["state"]) for p in daemon.plugins.states()] == [
        ("pkgplug", "started"), ("other", "started")
    ]


async def test_a_name_in_enabled_or_disabled_that_matches_no_plugin_is_warned_about(
    start_daemon: Any, good_plugins: Path
) -> None:
    """A misspelt name would otherwise do nothing, silently (`news` for `news_watch`)."""
    with capture_logs() as logs:
        daemon, _ = await start_daemon([good_plugins], overrides={"plugins": {"disabled": ["helo", "hello"]}})
    warned = [e for e in logs if e["event"] == "plugins.unknown_names"]
    assert [e["names"] for e in warned] == [["helo"]]
    assert "hello" not in [p["name"] for p in daemon.plugins.states()]


async def test_missing_plugin_directory_is_a_warning_that_healthz_shows(
    start_daemon: Any, tmp_path: Path, http: Any
) -> None:
    missing = tmp_path / "does-not-exist"
    with capture_logs() as logs:
        daemon, _ = await start_daemon([missing])
    assert daemon.plugins.states() == []
    assert {"event": "plugins.directory_missing", "log_level": "warning", "component": "plugins",
            "path": str(missing)} in logs
    async with http(daemon).get("/healthz") as response:
        health = await response.json()
    assert health["status"] == "ok"
    assert health["warnings"] == [{"warning": "plugin_directory_missing", "path": str(missing),
                                   "message": f"plugin directory {missing} does not exist"}]


async def test_healthz_shows_plugin_files_and_errors_only_with_the_token(
    start_daemon: Any, plugin_dir: Callable[..., Path], good_plugins: Path, http: Any,
    tmp_path: Path,
) -> None:
    """/healthz is public: without the token it says which plugins run and which failed, not
    where their files are nor what went wrong (paths, messages from a traceback)."""
    broken = plugin_dir({"raises_on_import.py": BROKEN["raises_on_import.py"]}, name="broken")
    missing = tmp_path / "missing"
    daemon, _ = await start_daemon([good_plugins, broken, missing],
                                   overrides={"server": {"token": "s3cret"}})
    for token in (None, "wrong"):
        async with http(daemon, token=token).get("/healthz") as response:
            assert response.status == 200
            anonymous = await response.json()
        assert anonymous["status"] == "degraded"
        assert anonymous["plugins"] == [
            {"name": "hello", "state": "started"}, {"name": "pkgplug", "state": "started"},
            {"name": "raises_on_import", "state": "failed"}]
        assert anonymous["warnings"] == [{"warning": "plugin_directory_missing"}]
    async with http(daemon, token="s3cret").get("/healthz") as response:
        detailed = await response.json()
    assert detailed["plugins"] == daemon.plugins.states()
    assert detailed["plugins"][2] == {
        "name": "raises_on_import", "source": str(broken / "raises_on_import.py"),
        "state": "failed", "error": "RuntimeError: import went wrong"}
    assert detailed["warnings"][0]["path"] == str(missing)


async def test_a_bad_plugin_schedule_fails_that_plugin_alone_naming_its_file(
    start_daemon: Any, plugin_dir: Callable[..., Path], good_plugins: Path
) -> None:
    """Only an agentd.toml schedule stops the start; a plugin's is the plugin's problem."""
    bad = plugin_dir({"badqueue.py": """
        from agentd import Plugin

        plugin = Plugin("badqueue")

        @plugin.schedule(every="1h", queue="nowhere")
        @plugin.task()
        async def work(ctx):
            pass
    """}, name="bad")
    with capture_logs() as logs:
        daemon, _ = await start_daemon([good_plugins, bad])
    record = daemon.plugins.plugins["badqueue"]
    assert record.state == "failed"
    assert record.error == ("InvalidScheduleError: plugin schedule 'badqueue.work': queue: "
                            "'nowhere' has no workers; configured: default")
    failed = [e for e in logs if e["event"] == "plugin.failed"]
    assert [(e["plugin"], e["source"]) for e in failed] == [("badqueue", str(bad / "badqueue.py"))]
    assert daemon.registry.find("badqueue.work") is None  # unloaded
    assert "badqueue.work" not in daemon.scheduler.schedules
    assert daemon.plugins.plugins["hello"].state == "started"


# --------------------------------------------------------------------------- check-config

WORKER = """
    from agentd import Plugin

    plugin = Plugin("worker")

    @plugin.task()
    async def work(ctx):
        pass
"""


async def test_check_config_loads_plugins_and_checks_schedules_against_their_tasks(
    run_cli: Any, config_file: Callable[..., Path], plugin_dir: Callable[..., Path],
    process_env: Callable[..., dict[str, str]], tmp_path: Path,
) -> None:
    """A config schedule may name a plugin's task; check-config says ok as run would start;
    a missing plugin directory is a warning; no startup hook runs and no state is made."""
    plugins = plugin_dir({"worker.py": WORKER + """
    @plugin.startup
    def start(ctx):
        raise RuntimeError("check-config must not run startup hooks")
    """})
    missing = tmp_path / "missing"
    path = config_file('\n[[schedules]]\nid = "hourly"\nevery = "1h"\ntask = "worker.work"\n')
    env = process_env(AGENTD_PLUGINS_PATHS=f"{plugins},{missing}")
    code, out, err = await run_cli("check-config", "--config", str(path), env=env)
    assert code == 0, err
    assert out.startswith(f"{path}: ok")
    assert f"agentd: warning: plugin directory {missing} does not exist" in err
    assert not (tmp_path / "data").exists()


async def test_check_config_names_the_file_of_each_plugin_that_would_fail(
    run_cli: Any, config_file: Callable[..., Path], plugin_dir: Callable[..., Path],
    process_env: Callable[..., dict[str, str]],
) -> None:
    plugins = plugin_dir({
        "worker.py": WORKER,
        "raises_on_import.py": BROKEN["raises_on_import.py"],
        "badsched.py": """
            from agentd import Plugin

            plugin = Plugin("badsched")
            plugin.schedule(every="1h", task="worker.work", args={"unexpected": 1})
        """,
    })
    env = process_env(AGENTD_PLUGINS_PATHS=str(plugins))
    code, out, err = await run_cli("check-config", "--config", str(config_file()), env=env)
    assert code == 1, err
    assert out == ""
    assert (f"agentd: plugin raises_on_import ({plugins / 'raises_on_import.py'}) would fail: "
            "RuntimeError: import went wrong") in err
    assert (f"agentd: plugin badsched ({plugins / 'badsched.py'}) would fail: "
            "InvalidScheduleError: plugin schedule 'badsched.worker.work': args: ") in err
    assert "2 plugin(s) would fail; the daemon would run without them" in err
    assert "worker (" not in err


# --------------------------------------------------------------------------- handlers


async def test_handler_runs_fire_and_forget(start_daemon: Any, good_plugins: Path) -> None:
    daemon, events = await start_daemon([good_plugins])
    gate = asyncio.Event()
    published = daemon.bus.publish("greet.world", {"gate": gate})
    # publish returned while the handler waits on the gate: it runs in the background.
    assert len(daemon.spawner) == 1
    assert "test.hello.greeted" not in events.topics()
    gate.set()
    greeted = await events.wait_for("test.hello.greeted")
    assert greeted.data == {"topic": "greet.world", "cause": published.id}
    await asyncio.wait_for(daemon.spawner.idle(), 5)


RELAY = """
    from agentd import Plugin
    plugin = Plugin("relay")

    @plugin.startup
    async def start(ctx):
        ctx.publish("test.relay.started")

    @plugin.on("relay.*")
    async def relay(ctx, event):
        ctx.publish("test.relay.before", {"cause": event.id})
        gate = event.data.get("gate")
        if gate is not None:
            await gate.wait()
        ctx.publish("test.relay.after", {"cause": event.id})

    @plugin.shutdown
    def stop(ctx):
        ctx.publish("test.relay.stopped")
"""


async def test_a_handlers_events_are_caused_by_the_event_it_handles(
    start_daemon: Any, plugin_dir: Callable[..., Path]
) -> None:
    """What a handler publishes, before or after an await, names the event it reacts to as
    its cause and carries that event's correlation; two runs in flight at once each keep
    their own (the event is not shared by the plugin's one context); a startup or
    shutdown hook's event has no cause."""
    daemon, events = await start_daemon([plugin_dir({"relay.py": RELAY})])
    started = await events.wait_for("test.relay.started")
    assert (started.causation_id, started.correlation_id) == (None, None)

    first_gate, second_gate = asyncio.Event(), asyncio.Event()
    first = daemon.bus.publish("relay.first", {"gate": first_gate}, correlation_id="41",
                               causation_id="40")
    second = daemon.bus.publish("relay.second", {"gate": second_gate})
    await events.wait_for("test.relay.before", cause=first.id)
    await events.wait_for("test.relay.before", cause=second.id)
    # Both runs are now waiting; let them resume in the other order than they started.
    second_gate.set()
    await events.wait_for("test.relay.after", cause=second.id)
    first_gate.set()
    await events.wait_for("test.relay.after", cause=first.id)
    await asyncio.wait_for(daemon.spawner.idle(), 5)

    relayed = {(e.topic, e.data["cause"]): (e.causation_id, e.correlation_id)
               for e in events.events if e.topic.startswith("test.relay.") and "cause" in e.data}
    assert relayed == {
        ("test.relay.before", first.id): (str(first.id), "41"),
        ("test.relay.after", first.id): (str(first.id), "41"),
        # An event without a correlation (a client's) passes none on: a correlation is a
        # root task's id, and an event id in its place could name a task's tree.
        ("test.relay.before", second.id): (str(second.id), None),
        ("test.relay.after", second.id): (str(second.id), None),
    }
    await daemon.stop()
    stopped = await events.wait_for("test.relay.stopped")
    assert (stopped.causation_id, stopped.correlation_id) == (None, None)


async def test_failing_handler_is_reported_with_its_name(
    start_daemon: Any, good_plugins: Path, http: Any
) -> None:
    daemon, events = await start_daemon([good_plugins])
    published = daemon.bus.publish("boom")
    failed = await events.wait_for("handler.failed", handler="hello.explode")
    assert failed.data == {
        "handler": "hello.explode",
        "error": "ValueError: handler exploded",
        "plugin": "hello",
        "topic": "boom",
        "event_id": published.id,
    }
    await asyncio.wait_for(daemon.spawner.idle(), 5)
    # The plugin stays started and the daemon serves on.
    assert daemon.plugins.plugins["hello"].state == "started"
    async with http(daemon).get("/v1/status") as response:
        assert response.status == 200
        assert (await response.json())["handlers"]["failed"] == 1
    daemon.bus.publish("greet.again")
    await events.wait_for("test.hello.greeted", topic="greet.again")


async def test_a_catch_all_failing_handler_does_not_loop(
    start_daemon: Any, plugin_dir: Callable[..., Path]
) -> None:
    directory = plugin_dir({"loud.py": """
        from agentd import Plugin
        plugin = Plugin("loud")

        @plugin.on("**")
        async def everything(ctx, event):
            raise RuntimeError(event.topic)
    """})
    daemon, events = await start_daemon([directory])
    daemon.bus.publish("ping")
    await events.wait_for("handler.failed", topic="ping")
    await asyncio.wait_for(daemon.spawner.idle(), 5)
    failures = [e for e in events.events if e.topic == "handler.failed"]
    assert [e.data["topic"] for e in failures].count("ping") == 1
    assert all(e.data["topic"] != "handler.failed" for e in failures)


CATCH_ALL = """
    from agentd import Plugin
    plugin = Plugin("catch_all")

    @plugin.on("**")
    async def everything(ctx, event):
        gate = event.data.get("gate")
        if gate is not None:
            await gate.wait()

    @plugin.shutdown
    def stop(ctx):
        ctx.publish("test.catch_all.bye")
"""


async def test_a_dropped_catch_all_handler_is_reported_once(
    start_daemon: Any, plugin_dir: Callable[..., Path]
) -> None:
    """A handler matching `handler.dropped` must not be re-run for its own drop report (as it
    is not for its own `handler.failed`): each refused run means one spawn and one report."""
    directory = plugin_dir({"catch_all.py": CATCH_ALL})
    daemon, events = await start_daemon(
        [directory], overrides={"daemon": {"handler_concurrency": 1, "handler_backlog": 1}}
    )
    await asyncio.wait_for(daemon.spawner.idle(), 5)
    before = len(events.events)
    gate = asyncio.Event()
    with capture_logs() as logs:
        daemon.bus.publish("work.one", {"gate": gate})  # runs
        daemon.bus.publish("work.two", {"gate": gate})  # waits
        daemon.bus.publish("work.three")  # no room: dropped
    gate.set()
    await asyncio.wait_for(daemon.spawner.idle(), 5)
    dropped = [e.data for e in events.events[before:] if e.topic == "handler.dropped"]
    assert [(d["handler"], d["topic"]) for d in dropped] == [("catch_all.everything", "work.three")]
    assert daemon.spawner.dropped == 1
    assert [entry for entry in logs if entry["event"] == "bus.callback_failed"] == []


async def test_a_catch_all_handler_does_not_loop_at_stop(
    start_daemon: Any, plugin_dir: Callable[..., Path]
) -> None:
    """After the drain, the shutdown hook's event is refused once for the catch-all handler."""
    directory = plugin_dir({"catch_all.py": CATCH_ALL})
    daemon, events = await start_daemon([directory])
    with capture_logs() as logs:
        await daemon.stop()
    assert "test.catch_all.bye" in events.topics()
    dropped = [e.data for e in events.events if e.topic == "handler.dropped"]
    assert [(d["topic"], d["reason"]) for d in dropped] == [("test.catch_all.bye", "stopping")]
    assert [entry for entry in logs if entry["event"] == "bus.callback_failed"] == []


async def test_startup_failure_unsubscribes_its_handlers(
    start_daemon: Any, plugin_dir: Callable[..., Path], good_plugins: Path
) -> None:
    broken = plugin_dir({"startup_fails.py": STARTUP_FAILS}, name="broken")
    daemon, events = await start_daemon([good_plugins, broken])
    assert daemon.plugins.plugins["startup_fails"].state == "failed"
    daemon.bus.publish("greet.x")
    # Handlers are spawned inside publish: only hello's was.
    assert len(daemon.spawner) == 1
    await events.wait_for("test.hello.greeted")
    await asyncio.wait_for(daemon.spawner.idle(), 5)
    assert "test.startup_fails.greeted" not in events.topics()
    await daemon.stop()
    # A plugin that never started is not stopped either.
    assert "test.startup_fails.shutdown" not in events.topics()


async def test_unload_removes_its_handlers(start_daemon: Any, good_plugins: Path, http: Any) -> None:
    daemon, events = await start_daemon([good_plugins])
    subscriptions = daemon.bus.stats()["subscriptions"]
    daemon.plugins.unload("hello")
    assert daemon.bus.stats()["subscriptions"] == subscriptions - 2  # on_greet and explode
    daemon.bus.publish("greet.x")
    daemon.bus.publish("boom")
    assert len(daemon.spawner) == 0
    assert daemon.plugins.plugins["hello"].state == "stopped"
    async with http(daemon).get("/healthz") as response:
        health = await response.json()
    assert {p["name"]: p["state"] for p in health["plugins"]}["hello"] == "stopped"
    assert health["status"] == "ok"
    assert "test.hello.greeted" not in events.topics()


async def test_shutdown_hooks_run_at_stop_in_reverse(start_daemon: Any, good_plugins: Path) -> None:
    daemon, events = await start_daemon([good_plugins])
    assert "test.hello.shutdown" not in events.topics()
    await daemon.stop()
    hooks = [e.data["hook"] for e in events.events if e.topic == "test.hello.shutdown"]
    assert hooks == ["second_declared", "first_declared"]
    assert {p["name"]: p["state"] for p in daemon.plugins.states()} == {
        "hello": "stopped", "pkgplug": "stopped"
    }
    # Everything the plugins registered is gone.
    assert daemon.bus.stats()["subscriptions"] == 0


async def test_a_failing_shutdown_hook_does_not_stop_the_others(
    start_daemon: Any, plugin_dir: Callable[..., Path]
) -> None:
    directory = plugin_dir({
        "a_first.py": """
            from agentd import Plugin
            plugin = Plugin("a_first")

            @plugin.shutdown
            def stop(ctx):
                ctx.publish("test.a_first.stopped")
        """,
        "b_second.py": """
            from agentd import Plugin
            plugin = Plugin("b_second")

            @plugin.shutdown
            def stop(ctx):
                raise RuntimeError("cannot stop")
        """,
    })
    daemon, events = await start_daemon([directory])
    await daemon.stop()
    assert "test.a_first.stopped" in events.topics()
    assert {p["name"]: p["state"] for p in daemon.plugins.states()} == {
        "a_first": "stopped", "b_second": "stopped"
    }


# --------------------------------------------------------------------------- Plugin itself


def test_plugin_declarations() -> None:
    plugin = Plugin("demo")

    @plugin.on("a.*")
    async def handler(ctx: Any, event: Any) -> None:
        return None

    assert [(h.pattern, h.name) for h in plugin._handlers] == [("a.*", "handler")]
    assert dict(plugin.config) == {}
    with pytest.raises(PluginError, match="must match"):
        Plugin("Demo")
    with pytest.raises(PatternError):
        plugin.on("a..b")
