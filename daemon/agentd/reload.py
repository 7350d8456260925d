"""Reloading agentd.toml in place (SIGHUP, `systemctl reload`, `agentd reload`,
`POST /v1/reload`) and reloading one plugin from its file (`POST /v1/plugins/{name}/reload`).

A reload reads the file again, as `agentd run` read it (with the same `AGENTD_*`
environment), and compares it key by key with the configuration the daemon runs on. A file
that does not load, or that `agentd run` would refuse, is refused whole: nothing changes,
and the answer, the log (`daemon.reload_refused`) and the CLI's exit code say why. Else
what can change live is applied (`LIVE`), and the keys that changed but need a restart are
named (`restart_required`) and keep their running values until then, as PostgreSQL's
`pending_restart` does. Running tasks, handlers and open streams go on as they were: a
stream keeps the limits it opened with, a task the plugin code it started with.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agentd.config import Config, check_serving_rules, load_config
from agentd.errors import AgentdError, ConfigError, PluginError
from agentd.hooks import configured_hooks
from agentd.log import get_logger
from agentd.web.auth import ACCESS, STREAM_TOKENS

if TYPE_CHECKING:
    from agentd.app import Daemon

# Sections whose every key applies live.
LIVE_SECTIONS = frozenset({"llm", "mail", "webhooks", "hooks", "digests", "streams", "metrics"})
# Keys of the other sections that apply live; `plugins.<name>` (a plugin's table), the
# worker count of a running queue (`tasks.queues.<name>`) and `schedules.<id>` do too.
LIVE_KEYS = frozenset({"log.level", "server.token", "server.token_file", "server.allowed_origins",
                       "server.allowed_hosts"})
_PLUGIN_KEYS = frozenset({"paths", "enabled", "disabled", "entry_points"})  # not a plugin's table
# Where each secret is set, as a reload reports it (never its value).
_SECRET_KEYS = {"api_token": "server.token", "mail_password": "mail.password", "llm_key": "llm.key",
                "webhooks_secret": "webhooks.secret", "memory_http_key": "memory.http_key",
                "metrics_token": "metrics.token"}


@dataclass(slots=True)
class ReloadOutcome:
    """What one reload did (`GET /v1/reload` shows the last one)."""

    trigger: str  # "SIGHUP", "api", ...
    source: str
    at: float = field(default_factory=time.time)
    ok: bool = False
    error: str | None = None  # why the file was refused (then nothing changed)
    took: float = 0.0
    applied: list[str] = field(default_factory=list)  # changed keys now in effect
    restart_required: list[str] = field(default_factory=list)  # changed keys waiting for a restart
    plugins_reloaded: list[str] = field(default_factory=list)
    schedules_changed: list[str] = field(default_factory=list)
    # What failed once the file was accepted: "plugin <name>" (its reload), "digests"
    # (their cursors' write), "schedules" (their re-sync). The rest of the reload stands.
    errors: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def flatten(config: Config) -> dict[str, object]:
    """Every key of `config` as `section.key` → value, to compare two configurations: a
    named table as `section.<name>` (`plugins.<name>`, `hooks.<name>`, `digests.<name>`),
    a queue as `tasks.queues.<name>`, a schedule as `schedules.<id>`, and each secret under
    the key that sets it (`server.token` is the token, from `token` or `token_file`)."""
    flat: dict[str, object] = {}
    for section in dataclasses.fields(Config):
        value = getattr(config, section.name)
        if section.name == "secrets" or not dataclasses.is_dataclass(value):
            continue
        for key in dataclasses.fields(value):
            item = getattr(value, key.name)
            if key.name == "settings" and isinstance(item, Mapping):
                flat.update((f"{section.name}.{name}", table) for name, table in item.items())
            elif key.name == "queues" and isinstance(item, Mapping):
                flat.update((f"tasks.queues.{name}", count) for name, count in item.items())
            else:
                flat[f"{section.name}.{key.name}"] = item
    for spec in config.schedules:
        flat[f"schedules.{spec.id}"] = spec
    for secret, where in _SECRET_KEYS.items():
        flat[where] = getattr(config.secrets, secret)
    return flat


def is_live(key: str, running: Config) -> bool:
    """Whether a change of `key` applies without a restart, for a daemon on `running`."""
    section, _, rest = key.partition(".")
    if section in LIVE_SECTIONS or section == "schedules" or key in LIVE_KEYS:
        return True
    if section == "plugins":
        return rest not in _PLUGIN_KEYS
    if section == "tasks" and rest.startswith("queues."):
        return rest.removeprefix("queues.") in running.tasks.queues  # a new or removed queue: no
    return False


def changed_keys(running: Config, loaded: Config) -> list[str]:
    """The keys whose value differs (or that one side lacks), sorted."""
    before, after = flatten(running), flatten(loaded)
    return sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))


def effective(running: Config, loaded: Config) -> Config:
    """The configuration to run on after a reload: `loaded`'s live keys, `running`'s values
    for every other key (they wait for a restart)."""
    sections: dict[str, Any] = {}
    for name in ("daemon", "server", "store", "tasks", "events", "memory", "plugins", "log"):
        old, new = getattr(running, name), getattr(loaded, name)
        live = {key.name: getattr(new, key.name) for key in dataclasses.fields(old)
                if is_live(f"{name}.{key.name}", running)}
        sections[name] = dataclasses.replace(old, **live)
    # The worker counts of the running queues: a queue added or removed waits for a restart.
    sections["tasks"] = dataclasses.replace(sections["tasks"], queues={
        queue: loaded.tasks.queues.get(queue, count) for queue, count in running.tasks.queues.items()})
    for name in LIVE_SECTIONS:
        sections[name] = getattr(loaded, name)
    secrets = dataclasses.replace(loaded.secrets, memory_http_key=running.secrets.memory_http_key)
    return dataclasses.replace(running, **sections, schedules=loaded.schedules, secrets=secrets,
                               from_env=loaded.from_env)


class Reloader:
    """Reloads the daemon's configuration, or one plugin, one reload at a time."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._lock = asyncio.Lock()
        self.last: ReloadOutcome | None = None
        self._requested: set[asyncio.Task[None]] = set()
        self._log = get_logger("daemon")

    @property
    def busy(self) -> bool:
        """Whether a reload is under way."""
        return self._lock.locked()

    def request(self, trigger: str) -> None:
        """Reload in the background (what SIGHUP does): once the daemon serves, unless it
        is stopping by then."""
        task = asyncio.get_running_loop().create_task(self._when_serving(trigger),
                                                      name=f"reload:{trigger}")
        self._requested.add(task)
        task.add_done_callback(self._requested.discard)

    def cancel(self) -> None:
        """Drop the background reloads not yet done (the daemon is stopping)."""
        for task in self._requested:
            task.cancel()

    async def _when_serving(self, trigger: str) -> None:
        await self._daemon.serving.wait()
        if self._daemon.stopping:
            return
        try:
            await self.reload(trigger)
        except Exception:  # a bug: the daemon runs on
            self._log.exception("daemon.reload_failed", trigger=trigger)

    async def reload(self, trigger: str) -> ReloadOutcome:
        """Read agentd.toml again and apply what can change live (see the module
        docstring); the outcome, refused or not, is also kept as `last`."""
        daemon = self._daemon
        async with self._lock:
            outcome = ReloadOutcome(trigger, daemon.config.source)
            began = time.monotonic()
            daemon.notifier.reloading(f"reloading {outcome.source}")
            try:
                await self._reload(outcome)
            except (AgentdError, ValueError) as exc:
                outcome.error = str(exc)
            finally:
                outcome.took = round(time.monotonic() - began, 3)
                self.last = outcome
                self._ready(_status(outcome))
        if outcome.ok:
            self._log.info("daemon.reloaded", trigger=trigger, source=outcome.source,
                           applied=outcome.applied, restart_required=outcome.restart_required,
                           plugins_reloaded=outcome.plugins_reloaded, errors=outcome.errors,
                           schedules_changed=outcome.schedules_changed, took=outcome.took)
            daemon.bus.publish("daemon.reloaded", {
                "trigger": trigger, "applied": outcome.applied,
                "restart_required": outcome.restart_required,
                "plugins_reloaded": outcome.plugins_reloaded,
                "schedules_changed": outcome.schedules_changed, "errors": outcome.errors})
        else:
            self._log.error("daemon.reload_refused", trigger=trigger, source=outcome.source,
                            error=outcome.error)
        return outcome

    async def _reload(self, outcome: ReloadOutcome) -> None:
        """Check the file whole, then apply it.

        Raises:
            ConfigError: the file is refused (nothing changed).
        """
        daemon = self._daemon
        running = daemon.config
        if running.source == "<defaults>":
            raise ConfigError("agentd runs on its built-in defaults, not a file: there is nothing "
                              "to reload (start it with --config PATH)")
        loaded = load_config(running.source)
        target = effective(running, loaded)
        changed = changed_keys(running, loaded)
        outcome.applied = [key for key in changed if is_live(key, running)]
        outcome.restart_required = [key for key in changed if not is_live(key, running)]
        # What `agentd run` would refuse of the live part, checked before anything changes.
        check_serving_rules(target)
        hooks = configured_hooks(target)
        try:
            daemon.digests.check_persistence(target.digests.settings)
        except ValueError as exc:
            raise ConfigError(f"{running.source}: {exc}") from None
        daemon.check_config_schedules(target)
        self._apply(target, hooks)
        outcome.ok = True  # from here on the file is in effect, whatever fails
        if running.digests != target.digests:
            try:
                await daemon.digests.reconfigure(target.digests.settings)
            except AgentdError as exc:  # their cursors could not be written (a full disk)
                outcome.errors["digests"] = str(exc)
        for name in sorted(set(running.plugins.settings) | set(target.plugins.settings)):
            if (running.plugins.settings.get(name) != target.plugins.settings.get(name)
                    and name in daemon.plugins.plugins):
                await self._reload_plugin(name, outcome)
        try:
            outcome.schedules_changed = await daemon.redeclare_schedules()
        except (AgentdError, ValueError) as exc:
            outcome.errors["schedules"] = str(exc)

    def _apply(self, target: Config, hooks: Mapping[str, Any]) -> None:
        """Put `target`'s live keys in effect, all in one step (no await)."""
        daemon = self._daemon
        daemon.services.reconfigure(target)  # raises (before any change) for a bad secret
        logging.getLogger().setLevel(target.log.level.upper())
        daemon.config = target
        if daemon.web_app is not None:
            daemon.web_app[ACCESS].update(target)
            daemon.web_app[STREAM_TOKENS].config = target.streams
        daemon.hooks.replace(hooks)
        daemon.workers.reconfigure(target.tasks.queues, target.plugins.settings)
        daemon.plugins.reconfigure(target)

    def _ready(self, status: str) -> None:
        """Tell systemd the reload is over, unless a stop began meanwhile (it cancels a
        reload under way): STOPPING=1 was said then, and READY=1 must not follow it."""
        if not self._daemon.stopping:
            self._daemon.notifier.ready(status)

    async def reload_plugin(self, name: str) -> dict[str, Any]:
        """Reload plugin `name` from its file (see `PluginManager.reload`), then re-sync the
        schedules; returns its record (`state` started or failed, with `error`) and the
        schedules changed.

        A re-sync refused (an agentd.toml schedule names a task the new code dropped) is
        given as `schedules_error`; the schedules stay as they were.

        Raises:
            PluginNotFoundError: no plugin of that name.
            PluginError: its new code was refused (the old code runs on).
        """
        daemon = self._daemon
        answer: dict[str, Any] = {"schedules_changed": [], "schedules_error": None}
        async with self._lock:
            daemon.notifier.reloading(f"reloading plugin {name}")
            try:
                record = await daemon.plugins.reload(name, daemon.config.daemon.stop_timeout)
                try:
                    answer["schedules_changed"] = await daemon.redeclare_schedules()
                except (AgentdError, ValueError) as exc:
                    answer["schedules_error"] = str(exc)
            finally:
                self._ready(f"reloaded plugin {name}")
        daemon.bus.publish("plugin.reloaded", {"plugin": name, "state": record.state,
                                               "error": record.error})
        return {**record.to_dict(), **answer}

    async def _reload_plugin(self, name: str, outcome: ReloadOutcome) -> None:
        """Reload a plugin whose table changed; a failure is the plugin's, not the reload's."""
        try:
            record = await self._daemon.plugins.reload(name, self._daemon.config.daemon.stop_timeout)
        except PluginError as exc:
            outcome.errors[f"plugin {name}"] = str(exc)
            return
        outcome.plugins_reloaded.append(name)
        if record.error is not None:
            outcome.errors[f"plugin {name}"] = record.error
        self._daemon.bus.publish("plugin.reloaded", {"plugin": name, "state": record.state,
                                                     "error": record.error})


def _status(outcome: ReloadOutcome) -> str:
    """The one-off status line systemd shows after a reload (the watchdog's next tick
    replaces it)."""
    if not outcome.ok:
        return f"reload refused: {describe_error(outcome.error)}"
    waiting = ""
    if outcome.restart_required:
        waiting = f"; restart needed for {', '.join(outcome.restart_required)}"
    return f"reloaded {len(outcome.applied)} changed keys{waiting}"


def describe_error(error: str | None) -> str:
    """The error's first line (a TOML error spans several)."""
    return (error or "").splitlines()[0] if error else "unknown error"

