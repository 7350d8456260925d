"""The plugin API is what `agentd` and `agentd.testing` export, and only that.

The shipped plugins import nothing else; every type a public method or property of an
exported class names is exported itself (the Protocols stand in for internal classes);
the real objects a plugin is handed satisfy those Protocols; both contexts refuse the
daemon's own topics alike; and docs/plugins.md's "Testing your plugin" example runs.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
import sys
import textwrap
import threading
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import aiohttp
import pytest

import agentd
import agentd.testing
from agentd.testing import harness

REPO = Path(__file__).resolve().parent.parent
PUBLIC_MODULES = {"agentd", "agentd.testing"}
PLUGIN_FILES = sorted([*(REPO / "plugins").glob("*.py"), *(REPO / "bench" / "plugins").glob("*.py"),
                       *(REPO / "tests").glob("*_plugin.py")])


# --------------------------------------------------------------------------- (a) imports


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_plugins_use_only_the_public_api(path: Path) -> None:
    """A plugin imports agentd's public modules only, public names only, and reaches into
    no object through an underscored attribute."""
    assert _private_uses(path.read_text(), str(path)) == []


def _private_uses(source: str, filename: str = "<plugin>") -> list[str]:
    tree = ast.parse(source, filename)
    exported = {"agentd": set(agentd.__all__), "agentd.testing": set(agentd.testing.__all__)}
    # The names `import agentd` (or `import agentd.testing`, `import agentd as a`) binds to
    # the package: `agentd.mail.message_args` reaches an internal module through one.
    packages = {alias.asname or "agentd" for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names if alias.name.split(".")[0] == "agentd"
                and (alias.asname is None or alias.name == "agentd")}
    faults = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            faults += [alias.name for alias in node.names
                       if alias.name.split(".")[0] == "agentd" and alias.name not in PUBLIC_MODULES]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id in packages and node.attr not in exported["agentd"] | {"testing"}):
            faults.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "agentd":
            if node.module not in PUBLIC_MODULES:
                faults.append(node.module)
            else:
                faults += [f"{node.module}.{alias.name}" for alias in node.names
                           if alias.name not in exported[node.module or ""]]
        elif (isinstance(node, ast.Attribute) and node.attr.startswith("_")
              and not node.attr.startswith("__")):
            faults.append(f"line {node.lineno}: .{node.attr}")
    return faults


def test_the_check_sees_internal_imports() -> None:
    """The check above would catch what deep_search did before (`agentd.mail`), however
    it reached it: it let `import agentd` then `agentd.mail.message_args` through."""
    assert _private_uses("from agentd.mail import message_args\n") == ["agentd.mail"]
    assert _private_uses("from agentd import Plugin, message_args\n") == ["agentd.message_args"]
    assert _private_uses("import agentd\nagentd.mail.message_args([], '', '', None)\n") == [
        "line 2: agentd.mail"]
    assert _private_uses("import agentd.testing\nagentd.plugins.PluginManager\n") == [
        "line 2: agentd.plugins"]
    assert _private_uses("import agentd as a\na.taskqueue\n") == ["line 2: a.taskqueue"]
    assert _private_uses("import agentd\nagentd.Plugin('x')\nagentd.testing.harness\n") == []
    assert _private_uses("from agentd import Plugin\nPlugin('x')._tasks\n") == ["line 2: ._tasks"]


# --------------------------------------------------------------------------- (b) annotations


def _exported(module: ModuleType) -> dict[str, Any]:
    return {name: getattr(module, name) for name in module.__all__}


def _members(cls: type) -> Iterator[tuple[str, Callable[..., Any]]]:
    """The public methods and property getters of `cls`, its own and inherited from agentd."""
    for name in dir(cls):
        if name.startswith("_"):
            continue
        for owner in cls.__mro__:
            if name in vars(owner):
                member = vars(owner)[name]
                break
        else:
            continue
        if not owner.__module__.startswith("agentd"):
            continue  # what Exception, NamedTuple or Protocol bring
        if isinstance(member, property) and member.fget is not None:
            yield name, member.fget
        elif isinstance(member, staticmethod | classmethod):
            yield name, member.__func__
        elif inspect.isfunction(member):
            yield name, member


def _agentd_types(hint: Any) -> Iterator[type]:
    """Every agentd class named anywhere inside a resolved annotation."""
    if isinstance(hint, list | tuple):
        for item in hint:
            yield from _agentd_types(item)
    elif isinstance(hint, TypeVar):
        yield from _agentd_types([hint.__bound__, *hint.__constraints__])
    elif isinstance(hint, type) and hint.__module__.split(".")[0] == "agentd":
        yield hint
    for arg in typing.get_args(hint):
        yield from _agentd_types(arg)


def _type_checking_imports(module_globals: dict[str, Any]) -> dict[str, Any]:
    """What a module imports under `if TYPE_CHECKING:`, imported: its annotations name it."""
    module = sys.modules[module_globals["__name__"]]
    if module.__file__ is None:
        return {}
    found: dict[str, Any] = {}
    for node in ast.walk(ast.parse(Path(module.__file__).read_text(encoding="utf-8"))):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            exec(compile(ast.Module(body=node.body, type_ignores=[]), module.__file__, "exec"),
                 {"__name__": module.__name__, "__package__": module.__package__}, found)
    return found


def _unexported_types(public: dict[str, Any]) -> list[str]:
    exported_ids = {id(obj) for obj in public.values()}
    faults = []

    def check(where: str, annotated: Any, module_globals: dict[str, Any]) -> None:
        try:
            # A name resolves as mypy sees it: to what the module imports, for type checking
            # alone too (resolved by the exported name instead, an internal class imported
            # under TYPE_CHECKING passed as the Protocol of the same name).
            hints = typing.get_type_hints(
                annotated, globalns={**_type_checking_imports(module_globals), **module_globals})
        except NameError as exc:  # a name imported only for type checking, and not exported
            faults.append(f"{where}: {exc}")
            return
        for key, hint in hints.items():
            faults.extend(f"{where} ({key}): {t.__module__}.{t.__qualname__}"
                          for t in _agentd_types(hint) if id(t) not in exported_ids)

    for name, obj in public.items():
        if inspect.isclass(obj):
            if obj.__module__.startswith("agentd") and not issubclass(obj, BaseException):
                check(name, obj, vars(sys.modules[obj.__module__]))  # dataclass, named tuple fields
            for member_name, fn in _members(obj):
                check(f"{name}.{member_name}", fn, fn.__globals__)
        elif inspect.isfunction(fn := getattr(obj, "__wrapped__", obj)):
            check(name, fn, fn.__globals__)
    return faults


def test_every_exported_name_exists() -> None:
    for module in (agentd, agentd.testing):
        missing = [name for name in module.__all__ if not hasattr(module, name)]
        assert missing == [], module.__name__


def test_public_annotations_name_only_exported_types() -> None:
    public = {**_exported(agentd), **_exported(agentd.testing)}
    assert _unexported_types(public) == []


def test_the_walk_finds_an_internal_type() -> None:
    """Without the Protocols, `Context.memory` named the internal MemoryStore: the walk
    reports such an annotation."""
    from agentd.memory import MemoryStore as Internal

    def memory(self: Any) -> Any:
        raise NotImplementedError

    memory.__annotations__ = {"return": Internal}
    leaky = type("Leaky", (), {"memory": property(memory), "__module__": "agentd.context"})
    faults = _unexported_types({**_exported(agentd), "Leaky": leaky})
    assert faults == ["Leaky.memory (return): agentd.memory.MemoryStore"]


def test_the_contexts_offer_what_the_readme_lists() -> None:
    """Nothing of the daemon's (bus, queue, spawner, manager, slot bookkeeping, a plugin's
    declarations) is public; `publish` is on both contexts, `progress` on a task's alone."""
    def public(obj: object) -> set[str]:
        return {name for name in dir(obj) if not name.startswith("_")}

    assert public(agentd.PluginContext) == {"config", "log", "memory", "mail", "webhook", "publish",
                                            "submit"}
    assert public(agentd.Context) == {"task", "config", "log", "memory", "mail", "webhook", "llm",
                                      "progress", "publish", "token", "call", "gather", "submit",
                                      "step", "sleep", "sleep_until", "wait_for", "ask"}
    assert public(agentd.Plugin("demo")) == {"name", "description", "config", "on", "task",
                                             "schedule", "embedder", "startup", "shutdown"}


def test_the_walk_resolves_names_as_mypy_does(tmp_path: Path) -> None:
    """An internal class imported for type checking alone, under the name of an exported
    Protocol (`MemoryStore`), is found: the walk resolved such a name by the exported one,
    and passed `Context.memory` annotated with the internal MemoryStore that way."""
    source = tmp_path / "agentd_leaky_probe.py"
    source.write_text(textwrap.dedent("""\
        from __future__ import annotations

        from typing import TYPE_CHECKING

        if TYPE_CHECKING:
            from agentd.memory import MemoryStore


        class Leaky:
            @property
            def memory(self) -> MemoryStore:
                raise NotImplementedError
        """), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("agentd_leaky_probe", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        faults = _unexported_types({**_exported(agentd), "Leaky": module.Leaky})
    finally:
        del sys.modules[spec.name]
    assert faults == ["Leaky.memory (return): agentd.memory.MemoryStore"]


# --------------------------------------------------------------------------- (c) the real objects

PROBE = """
    import threading

    import agentd
    from agentd import Context, Event, PatternError, Plugin, PluginContext

    plugin = Plugin("probe")
    SEEN = {}


    def kinds(ctx, record) -> dict:
        return {
            "memory": isinstance(ctx.memory, agentd.MemoryStore),
            "session": isinstance(ctx.memory.session("probe"), agentd.Session),
            "mail": isinstance(ctx.mail, agentd.Mail),
            "webhook": isinstance(ctx.webhook, agentd.Webhook),
            "record": isinstance(record, agentd.TaskRecord),
        }


    @plugin.task()
    async def noop(ctx: Context) -> None:
        return None


    @plugin.task()
    async def in_task(ctx: Context) -> dict:
        found = kinds(ctx, await ctx.submit("probe.noop"))
        found["llm"] = isinstance(ctx.llm, agentd.Llm)
        found["task"] = isinstance(ctx.task, agentd.TaskInfo)
        return found


    @plugin.on("probe.handler")
    async def in_handler(ctx: PluginContext, event: Event) -> None:
        ctx.publish("probe.kinds", kinds(ctx, await ctx.submit("probe.noop")))


    def fake_success(ctx) -> str:
        try:
            ctx.publish("task.succeeded", {"task_id": 1, "name": "probe.noop", "forged": True})
        except PatternError as exc:
            return f"{type(exc).__name__}: {exc}"
        return "published"


    @plugin.task()
    async def forge_in_task(ctx: Context) -> str:
        return fake_success(ctx)


    @plugin.on("probe.forge")
    async def forge_in_handler(ctx: PluginContext, event: Event) -> None:
        ctx.publish("probe.forged", {"outcome": fake_success(ctx)})


    @plugin.task()
    def publish_from_thread(ctx: Context) -> str:
        ctx.publish("probe.threaded", {"thread": threading.get_ident()})
        return fake_success(ctx)


    @plugin.on("probe.threaded")
    async def heard(ctx: PluginContext, event: Event) -> None:
        ctx.publish("probe.heard", {"thread": event.data["thread"]})


    def data(kind):
        nested = {}
        for _ in range(32 if kind == "too deep" else 31):
            nested = {"d": [nested]} if kind == "too deep" else {"d": nested}
        if kind == "itself":
            nested["me"] = nested
        return [1, 2] if kind == "a list" else nested


    def outcomes(ctx, kind) -> list:
        found = []
        for publish in (ctx.publish, lambda topic, value: ctx.progress(topic, value)):
            try:
                publish("probe.data", data(kind))
                found.append("published")
            except Exception as exc:
                found.append(f"{type(exc).__name__}: {exc}")
        return found


    @plugin.task()
    async def data_in_task(ctx: Context, kind: str) -> list:
        return outcomes(ctx, kind)


    @plugin.task()
    def data_in_thread(ctx: Context, kind: str) -> list:
        return outcomes(ctx, kind)


    OPTIONS = {"priority": 7, "delay": 3600.0, "max_attempts": 2, "timeout": 5.0}


    def fields(record) -> dict:
        return {"priority": record.priority, "delay": round(record.run_at - record.created_at),
                "max_attempts": record.max_attempts, "timeout": record.timeout,
                "status": record.status}


    @plugin.task()
    async def submit_in_task(ctx: Context) -> dict:
        return fields(await ctx.submit("probe.noop", **OPTIONS))


    @plugin.on("probe.submit_in_handler")
    async def submit_in_handler(ctx: PluginContext, event: Event) -> None:
        ctx.publish("probe.submitted", fields(await ctx.submit("probe.noop", **OPTIONS)))


    def topic_outcome(ctx, topic) -> str:
        try:
            ctx.publish(topic, {})
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return "published"


    @plugin.task()
    async def topic_in_task(ctx: Context, topic: str) -> str:
        return topic_outcome(ctx, topic)


    @plugin.task()
    def topic_in_thread(ctx: Context, topic: str) -> str:
        return topic_outcome(ctx, topic)


    @plugin.on("probe.topic_in_handler")
    async def topic_in_handler(ctx: PluginContext, event: Event) -> None:
        ctx.publish("probe.topic_outcome", {"outcome": topic_outcome(ctx, event.data["topic"])})


    @plugin.on("probe.data_in_handler")
    async def data_in_handler(ctx: PluginContext, event: Event) -> None:
        ctx.publish("probe.data_outcome", {"outcome": outcomes(ctx, event.data["kind"])[0]})
"""


async def test_the_real_objects_satisfy_the_protocols(tmp_path: Path,
                                                      plugin_dir: Callable[..., Path]) -> None:
    """mypy checks the same statically: Context's and PluginContext's properties return
    the real objects under the Protocols' types."""
    plugins = plugin_dir({"probe.py": PROBE})
    async with harness(tmp_path, [plugins]) as daemon:
        assert daemon.plugin_states() == {"probe": "started"}
        in_task = await daemon.run("probe.in_task")
        assert in_task == dict.fromkeys(
            ("memory", "session", "mail", "webhook", "record", "llm", "task"), True)
        daemon.publish("probe.handler")
        in_handler = await daemon.events.wait_for("probe.kinds")
        assert in_handler.data == dict.fromkeys(("memory", "session", "mail", "webhook", "record"), True)
        assert isinstance(daemon.memory, agentd.MemoryStore)
        assert isinstance(await daemon.submit("probe.noop"), agentd.TaskRecord)


async def test_a_handler_cannot_publish_a_daemon_topic_any_more_than_a_task(
        tmp_path: Path, plugin_dir: Callable[..., Path]) -> None:
    plugins = plugin_dir({"probe.py": PROBE})
    async with harness(tmp_path, [plugins]) as daemon:
        from_task = await daemon.run("probe.forge_in_task")
        daemon.publish("probe.forge")
        from_handler = (await daemon.events.wait_for("probe.forged")).data["outcome"]
        assert from_task == from_handler
        assert re.fullmatch(r"PatternError: topic 'task\.succeeded' is reserved .*", from_handler)
        assert [e for e in daemon.events.events if e.data.get("forged")] == []
        with pytest.raises(agentd.PatternError, match="reserved"):
            daemon.publish("task.succeeded", {"task_id": 1})


async def test_a_sync_task_publishes_on_the_loop_with_the_same_check(
        tmp_path: Path, plugin_dir: Callable[..., Path]) -> None:
    """A sync task runs in a thread of its own: its `ctx.publish` refuses a daemon topic as
    an async task's does, and what it publishes reaches the subscribers (a handler here) as
    any event does. Published from the thread itself, the event log's and the handler's
    callbacks failed there (no running loop) and the handler never ran."""
    plugins = plugin_dir({"probe.py": PROBE})
    async with harness(tmp_path, [plugins]) as daemon:
        outcome = await daemon.run("probe.publish_from_thread")
        assert re.fullmatch(r"PatternError: topic 'task\.succeeded' is reserved .*", outcome)
        heard = await daemon.events.wait_for("probe.heard")
        assert heard.data["thread"] != threading.get_ident()


@pytest.mark.parametrize(("topic", "outcome"), [
    ("probe.fine", "published"),
    ("task.succeeded", "PatternError: topic 'task.succeeded' is reserved for the daemon's own "
                       "events (bus.*, task.*, schedule.*, daemon.*, plugin.*, handler.*)"),
    ("plugin", "PatternError: topic 'plugin' is reserved for the daemon's own events (bus.*, "
               "task.*, schedule.*, daemon.*, plugin.*, handler.*)"),
    ("probe..twice", "PatternError: topic 'probe..twice': segment '' must be letters, digits, "
                     "'_' or '-'"),
    ("probe.*", "PatternError: topic 'probe.*': segment '*' must be letters, digits, '_' or '-'"),
    ("p." + "x" * 300, "PatternError: topic is 302 characters long; at most 255"),
])
async def test_topics_are_checked_alike_wherever_a_plugin_publishes(
        tmp_path: Path, plugin_dir: Callable[..., Path], topic: str, outcome: str) -> None:
    plugins = plugin_dir({"probe.py": PROBE})
    async with harness(tmp_path, [plugins]) as daemon:
        assert await daemon.run("probe.topic_in_task", {"topic": topic}) == outcome
        assert await daemon.run("probe.topic_in_thread", {"topic": topic}) == outcome
        daemon.publish("probe.topic_in_handler", {"topic": topic})
        assert (await daemon.events.wait_for("probe.topic_outcome")).data["outcome"] == outcome


@pytest.mark.parametrize(("kind", "outcome"), [
    ("deepest allowed", "published"),
    ("too deep", "ValueError: event data nests more than 32 deep (or contains itself)"),
    ("itself", "ValueError: event data nests more than 32 deep (or contains itself)"),
    ("a list", "TypeError: event data must be a mapping, got list"),
])
async def test_event_data_is_checked_alike_wherever_a_plugin_publishes(
        tmp_path: Path, plugin_dir: Callable[..., Path], kind: str, outcome: str) -> None:
    """Data that contains itself or nests past the HTTP API's bound cannot be encoded: it
    was published unchecked, and the event log's write of it failed in the store's writer
    with every write of its batch (the task's own ack among them, so the task never ended).
    Data that is no mapping became an event whose `data` had no `.get`."""
    plugins = plugin_dir({"probe.py": PROBE})
    async with harness(tmp_path, [plugins]) as daemon:
        assert await daemon.run("probe.data_in_task", {"kind": kind}) == [outcome, outcome]
        assert await daemon.run("probe.data_in_thread", {"kind": kind}) == [outcome, outcome]
        daemon.publish("probe.data_in_handler", {"kind": kind})
        assert (await daemon.events.wait_for("probe.data_outcome")).data["outcome"] == outcome
        assert await daemon.run("probe.noop") is None


def _keyword_options(fn: Callable[..., Any]) -> dict[str, tuple[Any, Any]]:
    hints = typing.get_type_hints(fn)
    return {name: (parameter.default, hints[name])
            for name, parameter in inspect.signature(fn).parameters.items()
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY}


def test_submit_takes_the_same_options_wherever_a_plugin_submits() -> None:
    """The contexts' `submit` (and the harness's) took only `idempotency_key`: a handler
    could no longer enqueue a delayed or prioritised task, as it did through `ctx.queue`
    and as `POST /v1/tasks` does. The options are enqueue's own, by name, default and type,
    less those the daemon sets (a child's parent and correlation, a key's window)."""
    from agentd.taskqueue import TaskQueue

    task_options = {"queue", "priority", "delay", "run_at", "idempotency_key", "max_attempts",
                    "timeout"}
    enqueue = _keyword_options(TaskQueue.enqueue)
    for submit in (agentd.Context.submit, agentd.PluginContext.submit, agentd.testing.Harness.submit):
        options = _keyword_options(submit)
        assert set(options) == task_options, submit.__qualname__
        assert options == {name: enqueue[name] for name in task_options}, submit.__qualname__
        assert all(f"{name}  " in (submit.__doc__ or "") for name in task_options
                   if submit is not agentd.testing.Harness.submit), submit.__qualname__


async def test_a_task_and_a_handler_submit_with_options(tmp_path: Path,
                                                        plugin_dir: Callable[..., Path]) -> None:
    plugins = plugin_dir({"probe.py": PROBE})
    async with harness(tmp_path, [plugins]) as daemon:
        expected = {"priority": 7, "delay": 3600, "max_attempts": 2, "timeout": 5.0,
                    "status": "queued"}
        assert await daemon.run("probe.submit_in_task") == expected
        daemon.publish("probe.submit_in_handler")
        assert (await daemon.events.wait_for("probe.submitted")).data == expected
        assert fields_of(await daemon.submit("probe.noop", priority=7, delay=3600,
                                             max_attempts=2, timeout=5.0)) == expected


def fields_of(record: agentd.TaskRecord) -> dict[str, Any]:
    return {"priority": record.priority, "delay": round(record.run_at - record.created_at),
            "max_attempts": record.max_attempts, "timeout": record.timeout,
            "status": record.status}


EMBEDDER = """
    from collections.abc import Mapping, Sequence
    from typing import Any

    from agentd import Embedder, Plugin

    plugin = Plugin("toy_embedder")


    class Toy:
        def __init__(self, dimension: int) -> None:
            self.id = f"toy-{dimension}"
            self.dimension = dimension

        async def embed(self, texts: Sequence[str]) -> list[list[float]]:
            return [[1.0] + [0.0] * (self.dimension - 1) for _ in texts]


    @plugin.embedder("toy")
    def make(config: Mapping[str, Any]) -> Embedder:
        return Toy(config["dimension"])
"""


async def test_an_embedder_plugin_is_given_its_own_table(tmp_path: Path,
                                                        plugin_dir: Callable[..., Path]) -> None:
    """An embedder factory was called with the daemon's whole internal `Config` (every
    section, the secrets read for mail, webhooks and hooks among them), and the `Embedder`
    type it returns was not exported. It gets its plugin's `[plugins.<name>]` table, as
    everything else of a plugin does."""
    plugins = plugin_dir({"toy_embedder.py": EMBEDDER})
    config = {"memory": {"embedder": "toy"}, "plugins": {"toy_embedder": {"dimension": 4}}}
    async with harness(tmp_path, [plugins], config) as daemon:
        assert daemon.plugin_states() == {"toy_embedder": "started"}
        memory, created = await daemon.memory.remember("embedded by a plugin")
        assert created
        assert [r.memory.id for r in await daemon.memory.recall("anything")] == [memory.id]
        async with aiohttp.ClientSession() as client, \
                client.get(f"{daemon.url}/v1/memory/stats") as response:
            stats = await response.json()
        assert (stats["embedder"], stats["dimension"]) == ("toy-4", 4)


# --------------------------------------------------------------------------- docs/plugins.md


def _documented_example() -> str:
    page = (REPO / "docs" / "plugins.md").read_text()
    section = page.split("\n## Testing your plugin\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "docs/plugins.md's Testing your plugin section has no python block"
    return match.group(1)


async def test_documented_testing_example_runs(tmp_path: Path) -> None:
    """The example as written, as if saved as tests/test_hello.py next to plugins/."""
    namespace: dict[str, Any] = {"__file__": str(REPO / "tests" / "test_hello.py"),
                                 "__name__": "test_hello"}
    exec(compile(_documented_example(), "docs/plugins.md (Testing your plugin)", "exec"), namespace)
    tests = [fn for name, fn in namespace.items() if name.startswith("test_") and callable(fn)]
    assert tests, "the example defines no test"
    for number, test in enumerate(tests):
        await test(tmp_path / str(number))


async def test_the_harness_keeps_agentds_own_periodic_tasks_away(tmp_path: Path) -> None:
    """At the defaults the event sweep fires at every minute's turn: a plugin's test that
    counted tasks across one saw a task it never made (agentd's own suite did, in CI)."""
    async with (harness(tmp_path) as daemon, aiohttp.ClientSession(daemon.url) as client,
                client.get("/v1/schedules") as response):
        schedules = (await response.json())["schedules"]
    own = {s["id"]: s["next_fire"] for s in schedules if s["source"] == "builtin"}
    assert "agentd.sweep_events" in own
    in_2065 = 3e9
    assert all(next_fire >= in_2065 for next_fire in own.values()), own


# --------------------------------------------------------------------------- typing


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module's mypy runs: each would check all of agentd again."""
    return tmp_path_factory.mktemp("mypy_cache")


def _mypy_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path,
                 source: str) -> dict[int, str]:
    """mypy's errors (by line) on `source`, a plugin checked as agentd's own code is (strict);
    the tests are not type-checked, so this is how one shows what mypy says of a plugin."""
    mypy_api = pytest.importorskip("mypy.api")
    snippet = tmp_path / "typed_plugin.py"
    snippet.write_text(textwrap.dedent(source), encoding="utf-8")
    monkeypatch.chdir(REPO)  # the config's mypy_path is relative to it
    out, err, _ = mypy_api.run(["--config-file", str(REPO / "pyproject.toml"),
                                "--cache-dir", str(cache), "--python-executable",
                                sys.executable, str(snippet)])
    assert "error:" in out or "Success" in out, out + err
    errors: dict[int, str] = {}
    for line in out.splitlines():
        if ": error:" in line:
            number = int(line.split(":")[1])
            errors[number] = f"{errors[number]}\n{line}" if number in errors else line
    return errors


def test_mypy_takes_handlers_annotated_with_the_context_they_get(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mypy_cache: Path) -> None:
    """A durable handler runs as a task and gets a `Context`, as docs/plugins.md says; `on` typed
    every handler as taking a `PluginContext`, so mypy refused one annotated as documented.
    Now each kind is checked against the context it is given."""
    errors = _mypy_errors(tmp_path, monkeypatch, mypy_cache, """\
        from agentd import Context, Event, Plugin, PluginContext

        plugin = Plugin("typed")

        @plugin.on("typed.a")
        async def fire_and_forget(ctx: PluginContext, event: Event) -> None: ...

        @plugin.on("typed.b", durable=True, max_attempts=3)
        async def durable(ctx: Context, event: Event) -> None:
            ctx.progress("reacting", {"event": event.id})

        @plugin.on("typed.c", durable=True)
        async def durable_given_the_wrong_context(ctx: PluginContext, event: Event) -> None: ...

        @plugin.on("typed.d")
        async def handler_given_a_task_context(ctx: Context, event: Event) -> None: ...

        @plugin.on("typed.e", durable=bool(plugin.config.get("durable")))
        async def either(ctx: Context | PluginContext, event: Event) -> None:
            ctx.publish("typed.seen")

        @plugin.on("typed.f", max_attempts=3)
        async def retried_though_run_at_most_once(ctx: PluginContext, event: Event) -> None: ...
        """)
    assert sorted(errors) == [12, 15, 22], errors
    assert "[type-var]" in errors[12] and "[type-var]" in errors[15], errors
    assert "[call-overload]" in errors[22], errors


def test_mypy_refuses_a_misspelt_state_of_a_plugins_task_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mypy_cache: Path) -> None:
    """The records `submit`, `send` and `post` return had `status: str` in their Protocol,
    and TaskStatus was not exported: a plugin's `record.status == "succeded"` passed mypy."""
    errors = _mypy_errors(tmp_path, monkeypatch, mypy_cache, """\
        from agentd import Context, Plugin, TaskStatus

        plugin = Plugin("typed")

        @plugin.task()
        async def parent(ctx: Context) -> bool:
            child = await ctx.submit("typed.child")
            wanted: TaskStatus = "succeeded"
            return child.status == wanted or child.status == "succeded"
        """)
    assert sorted(errors) == [9], errors
    assert "[comparison-overlap]" in errors[9], errors
