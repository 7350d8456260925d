"""agentd.toml and `AGENTD_<SECTION>_<KEY>` overrides, read once into frozen dataclasses.

Configuration flows one way: `load_config()` → `Config` → each component gets its own
section. Every error names where the bad value came from (the file or the environment
variable), the key, what was expected and what was found.

Everything is parsed here, once: `[[schedules]]` become `ScheduleSpec`s, `[digests.<name>]`
`DigestSpec`s, `[hooks.<name>]` `HookSpec`s, and every secret (`*_file`, `*_env`) is read
into `Config.secrets` or its hook's spec, so an unreadable one stops the load, naming the
file and the key, and nothing reads the file system for them afterwards. A secret is given
one way only, never begins or ends with whitespace, and one given inline makes the file
holding it obey a secret file's mode.

This module is the bottom of agentd's layering: it imports only `agentd.errors` and the
value modules `agentd.events` (topics and patterns), `agentd.schedule` (`ScheduleSpec`) and
`agentd.specs` (`HookSpec`, `DigestSpec`), which import nothing of agentd above them
(tests/test_layers.py checks it).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import stat
import tomllib
import types
import typing
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agentd.errors import ConfigError
from agentd.events import TopicPattern
from agentd.schedule import ScheduleSpec
from agentd.specs import HOOK_SCHEMES, DigestSpec, HookSpec, signing_key

CONFIG_ENV = "AGENTD_CONFIG"
DEFAULT_CONFIG_NAME = "agentd.toml"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
MIN_STALL_WARNING = 0.1  # seconds: [daemon] stall_warning, when on
BUILTIN_SCHEDULE_PREFIX = "agentd."  # the ids of the daemon's own schedules (maintenance.py, digests.py)
_TOKEN = re.compile(r"[!-~]+")  # what an Authorization header can carry as one word
_HOST_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_HOOK_NAME = re.compile(r"[^{}/]+")  # what aiohttp's {name} in /hooks/{name} matches
# An origin as browsers send it in `Origin` (lower case, no path; a browser extension's
# scheme too, e.g. chrome-extension://<id>); a final "/" is tolerated.
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://(?:[a-z0-9_.-]+|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?/?")


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """[daemon]: where state lives, how long stopping may take, fire-and-forget bounds,
    when a crashing daemon starts in safe mode (agentd/safemode.py)."""

    data_dir: str = "data"
    stop_timeout: float = 10.0
    handler_concurrency: int = 100
    handler_backlog: int = 1000
    stall_warning: float = 1.0
    safe_mode_after: float = 30.0
    safe_mode_starts: int = 2


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """[server]: the HTTP listener."""

    host: str = "127.0.0.1"
    port: int = 8470
    token: str = field(default="", repr=False)  # like every secret, kept out of the repr
    token_file: str = ""
    max_body_bytes: int = 1_048_576
    max_loop_lag: float = 0.5
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    header_timeout: float = 20.0


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """[store]: where agentd.db's data lives: one SQLite file (`path`, the default), or a
    PostgreSQL database (`url`) that several daemons share. `pool_size` bounds the
    connections one daemon opens to PostgreSQL (plus one that listens for notifications)."""

    path: str = "agentd.db"
    synchronous: Literal["full", "normal"] = "normal"
    busy_timeout_ms: int = 5000
    maintenance_interval: float = 3600.0
    url: str = ""
    pool_size: int = 10


@dataclass(frozen=True, slots=True)
class BackupConfig:
    """[backup]: backups on a schedule (off while `dir` is empty): every `every` seconds a
    backup of agentd.db and memory.db into `dir`, the newest `keep` of them kept."""

    dir: str = ""
    every: float = 86400.0
    keep: int = 7


@dataclass(frozen=True, slots=True)
class TasksConfig:
    """[tasks]: the durable queue: queues and their workers, retries, leases, results."""

    # Slots are coroutines: an agent waiting on its LLM costs a few KB while it waits, so the
    # default queue runs 1,000 at once (bench/agent_bench.py); CPU-bound sync tasks are
    # bounded by `threads` instead, and a task by its `concurrency`.
    queues: Mapping[str, int] = field(default_factory=lambda: {"default": 1000})
    # Sync (`def`) tasks running at once, in threads, over all queues: past that many a
    # sync task waits for a thread to end (in its slot, its timeout running).
    threads: int = 8
    max_attempts: int = 3
    retry_base: float = 2.0
    retry_max: float = 600.0
    lease: float = 60.0
    # None: the store's own (`TaskStore.default_claim_ahead`): 3 on SQLite, more on PostgreSQL.
    claim_ahead: int | None = None
    result_ttl: float = 604800.0
    idempotency_window: float = 86400.0
    purge_interval: float = 300.0


# OpenAI's embeddings endpoint takes at most 2,048 inputs per request.
MAX_EMBED_BATCH = 2048

# `[memory] url` keeping memory in this daemon's memory.db though the store is on
# PostgreSQL (a server without pgvector; memory then is not shared between daemons).
LOCAL_MEMORY = "sqlite"

PERSISTENCE_CLASSES = ("ephemeral", "ring", "durable")
# The limits a rule may take as its own, by class: those of [events] for that class.
RULE_LIMITS: Mapping[str, tuple[str, ...]] = {
    "ephemeral": (), "ring": ("ring_size", "ring_seconds"), "durable": ("retention",)}
# Own buckets are 2 * k + (1 if durable) with 1 <= k <= _BUCKET_KEYS: under 2**31, an
# integer on both engines.
_BUCKET_KEYS = 2**29


class PersistenceRule(typing.NamedTuple):
    """One `[events] persistence` rule: `pattern=class`, optionally followed by limits of
    its own (`news.new=ring ring_size=500 ring_seconds=2592000`, `audit.**=durable
    retention=7776000`). A rule with limits of its own keeps its events apart: a busy topic
    of the default ring cannot push them out, nor they it.

    `bucket` is what the event log stores with each event (the `durable` column): 0 the
    default ring, 1 the default durable class, and for a rule with limits of its own a
    number derived from its pattern (even: ring, odd: durable), the same across restarts
    and daemons while the pattern stays."""

    pattern: str
    kind: str
    ring_size: int | None = None
    ring_seconds: float | None = None
    retention: float | None = None

    @property
    def own_limits(self) -> bool:
        return (self.ring_size, self.ring_seconds, self.retention) != (None, None, None)

    @property
    def bucket(self) -> int:
        durable = int(self.kind == "durable")
        if not self.own_limits:
            return durable
        return 2 * (zlib.crc32(self.pattern.encode()) % _BUCKET_KEYS + 1) + durable

    @classmethod
    def parse(cls, rule: str) -> PersistenceRule:
        """The rule `rule` spells. Raises ValueError naming what is wrong."""
        head, *options = rule.split()
        pattern, equals, kind = head.partition("=")
        if not equals or kind not in PERSISTENCE_CLASSES:
            raise ValueError("expected 'pattern=class' with class one of "
                             f"{', '.join(PERSISTENCE_CLASSES)}, then optional limits of its own")
        TopicPattern.parse(pattern)
        limits: dict[str, float] = {}
        for option in options:
            key, equals, text = option.partition("=")
            if key not in RULE_LIMITS[kind] or not equals:
                allowed = ", ".join(f"{k}=N" for k in RULE_LIMITS[kind]) or "none"
                raise ValueError(f"{option!r}: a {kind} rule's own limits are {allowed}")
            if key in limits:
                raise ValueError(f"{key} is given twice")
            try:
                value = int(text) if key == "ring_size" else float(text)
            except ValueError:
                what = "a whole number" if key == "ring_size" else "a number"
                raise ValueError(f"{key}: expected {what}, got {text!r}") from None
            if not value > 0 or value == float("inf"):
                raise ValueError(f"{key}: expected a positive finite number, got {text!r}")
            limits[key] = value
        return cls(pattern, kind, ring_size=int(limits["ring_size"]) if "ring_size" in limits else None,
                   ring_seconds=limits.get("ring_seconds"), retention=limits.get("retention"))


@dataclass(frozen=True, slots=True)
class EventsConfig:
    """[events]: which events the event log keeps (first matching rule wins) and how long."""

    # task.queued and task.started repeat what the task's row records (created_at,
    # started_at, attempts); logging them was two of the three event rows every task wrote.
    persistence: tuple[str, ...] = (
        "*.token=ephemeral", "task.queued=ephemeral", "task.started=ephemeral",
        "task.progress=ring", "task.**=durable", "**=ring",
    )
    ring_size: int = 10_000
    ring_seconds: float = 3600.0
    retention: float = 604800.0
    sweep_interval: float = 60.0

    def rules(self) -> list[PersistenceRule]:
        """The rules in order; validated when the configuration is loaded."""
        return [PersistenceRule.parse(rule) for rule in self.persistence]


@dataclass(frozen=True, slots=True)
class StreamsConfig:
    """[streams]: SSE and WebSocket clients."""

    keepalive: float = 15.0
    retry_ms: int = 3000
    client_buffer: int = 1000
    send_timeout: float = 10.0
    send_buffer: int = 262_144
    token_ttl: float = 300.0
    token_resume_ttl: float = 86400.0
    ws_max_requests: int = 256
    ws_max_subscriptions: int = 64


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    """[memory]: short-term sessions and long-term semantic memory (in a second file)."""

    path: str = "memory.db"
    session_ttl: float = 86400.0
    purge_interval: float = 3600.0
    embedder: str = "minilm"
    http_url: str = ""
    http_model: str = ""
    http_dimension: int = 0
    http_key_file: str = ""
    http_key_env: str = ""
    # At most this many texts per embedding call: concurrent remember() and recall() calls
    # share one (agentd.embed_batch); 1 embeds each text alone.
    embed_batch: int = 64
    dedupe_threshold: float = 0.95
    filter_fields: tuple[str, ...] = ("kind", "source", "agent")
    # SQLite: how recall searches memory.db's vectors. "binary": a Hamming-distance scan of
    # one bit per dimension, then the candidates re-ranked by exact cosine from the float32
    # vectors (a fraction of a float scan's time, nearly the same results); "none": a scan of
    # every float32 vector (exact).
    quantization: Literal["binary", "none"] = "binary"
    # SQLite, quantization "binary": from 10,000 memories (memory.RAM_INDEX_FROM) keep a copy
    # of the bits in RAM (48 MB a million memories at 384 dimensions, plus 8 bytes for the
    # id and 4 per filter field) and scan it with numpy; read from memory.db in a thread,
    # sqlite-vec scanning until it is loaded.
    ram_index: bool = True
    # PostgreSQL with pgvector: the store's database when [store] url is one, unless `url`
    # names another, or is LOCAL_MEMORY (memory.db beside this daemon whatever the store);
    # `pool_size` connections of its own; the HNSW index's parameters.
    url: str = ""
    pool_size: int = 4
    hnsw_m: int = 16
    hnsw_ef_construction: int = 64
    hnsw_ef_search: int = 100
    hnsw_build_memory_mb: int = 512


@dataclass(frozen=True, slots=True)
class HooksConfig:
    """[hooks]: how far a signed timestamp may be off and how long delivery ids are kept;
    [hooks.<name>]: one inbound webhook each, with its secret and the schemes it takes."""

    tolerance: float = 300.0
    replay_window: float = 604800.0
    settings: Mapping[str, HookSpec] = field(default_factory=dict)


_HOOK_KEYS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "secret": (str, "a string"), "secret_file": (str, "a string"), "secret_env": (str, "a string"),
    "schemes": (list, "a list"), "tolerance": ((int, float), "a number of seconds"),
}


@dataclass(frozen=True, slots=True)
class MailConfig:
    """[mail]: outgoing mail over SMTP; mail is off while `host` is empty."""

    host: str = ""
    port: int = 587
    security: Literal["starttls", "tls", "none"] = "starttls"
    user: str = ""
    password_file: str = ""
    password_env: str = ""
    sender: str = "agentd@localhost"
    timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class DigestsConfig:
    """[digests.<name>]: events matching a pattern, collected and mailed together."""

    settings: Mapping[str, DigestSpec] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LlmConfig:
    """[llm]: an OpenAI-compatible chat endpoint; the LLM is off while `base_url` is empty."""

    base_url: str = ""
    model: str = ""
    key_file: str = ""
    key_env: str = ""
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    token_budget: int = 0
    # Requests to the endpoint open at once; 0: no limit but the queues' slots. (aiohttp's
    # own default, 100, held the 101st streaming agent until another one's reply ended.)
    max_connections: int = 0


@dataclass(frozen=True, slots=True)
class WebhooksConfig:
    """[webhooks]: outgoing webhooks (`ctx.webhook.post`), signed with this secret, sent
    only to public addresses and those in `allow_networks`."""

    secret: str = field(default="", repr=False)
    secret_file: str = ""
    timeout: float = 10.0
    allow_networks: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PluginsConfig:
    """[plugins]: where plugins are found, which run, and their own tables."""

    paths: tuple[str, ...] = ("plugins",)
    enabled: tuple[str, ...] = ()
    disabled: tuple[str, ...] = ()
    entry_points: bool = True
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LogConfig:
    """[log]: level and format (auto = JSON off a TTY, console on one); `access`: a line per
    HTTP request (agentd/web/access.py)."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    access: bool = True


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """[metrics]: `GET /metrics` (agentd/web/metrics_api.py). `token` (or the first line of
    `token_file`): a bearer token that scrapes it, and nothing else, besides the API token."""

    token: str = field(default="", repr=False)
    token_file: str = ""


@dataclass(frozen=True, slots=True)
class Secrets:
    """The secrets the sections name, read when the configuration was loaded: each given
    one way, inline, as the first line of its `*_file`, or in the environment variable its
    `*_env` names; '' where none is set. Not in the repr, so a logged configuration shows none."""

    api_token: str = field(default="", repr=False)  # [server] token / token_file
    mail_password: str = field(default="", repr=False)  # [mail] password_file / password_env
    llm_key: str = field(default="", repr=False)  # [llm] key_file / key_env
    webhooks_secret: str = field(default="", repr=False)  # [webhooks] secret / secret_file
    memory_http_key: str = field(default="", repr=False)  # [memory] http_key_file / http_key_env
    metrics_token: str = field(default="", repr=False)  # [metrics] token / token_file


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration, checked and parsed: `schedules`, `hooks.settings` and
    `digests.settings` hold specs, `secrets` what the secret keys name. Relative paths
    resolve against `base_dir`."""

    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    backup: BackupConfig = field(default_factory=BackupConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    streams: StreamsConfig = field(default_factory=StreamsConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    mail: MailConfig = field(default_factory=MailConfig)
    digests: DigestsConfig = field(default_factory=DigestsConfig)
    llm: LlmConfig = field(default_factory=LlmConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    schedules: tuple[ScheduleSpec, ...] = ()
    secrets: Secrets = field(default_factory=Secrets)
    source: str = "<defaults>"
    base_dir: Path = field(default_factory=Path.cwd)
    from_env: frozenset[tuple[str, str]] = frozenset()  # (section, key) set by AGENTD_* variables

    def origin(self, section: str, key: str) -> str:
        """Where `[section] key` came from, for error messages: its environment variable
        when one set it, else the file."""
        if (section, key) in self.from_env:
            return f"environment AGENTD_{section.upper()}_{key.upper()}"
        return self.source

    def resolve(self, path: str) -> Path:
        """Return `path` made absolute against the configuration's directory."""
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() else (self.base_dir / candidate)

    @property
    def data_dir(self) -> Path:
        return self.resolve(self.daemon.data_dir)

    @property
    def database_path(self) -> Path:
        candidate = Path(self.store.path).expanduser()
        return candidate if candidate.is_absolute() else self.data_dir / candidate

    @property
    def backup_dir(self) -> Path | None:
        """Where scheduled backups go (None: none are taken)."""
        return self.resolve(self.backup.dir) if self.backup.dir else None

    @property
    def memory_url(self) -> str:
        """The PostgreSQL database of memory: `[memory] url`, else the store's (empty: memory
        stays in memory.db, as `[memory] url = "sqlite"` asks whatever the store)."""
        if self.memory.url == LOCAL_MEMORY:
            return ""
        return self.memory.url or self.store.url

    @property
    def memory_path(self) -> Path:
        candidate = Path(self.memory.path).expanduser()
        return candidate if candidate.is_absolute() else self.data_dir / candidate

    @property
    def plugin_dirs(self) -> tuple[Path, ...]:
        return tuple(self.resolve(p) for p in self.plugins.paths)


_SECTIONS: dict[str, type[Any]] = {
    f.name: typing.get_type_hints(Config)[f.name]
    for f in dataclasses.fields(Config)
    if f.name not in ("source", "base_dir", "schedules", "secrets", "from_env")
}


def find_config_path(explicit: str | None) -> Path | None:
    """The file to read: `--config`, else `$AGENTD_CONFIG`, else ./agentd.toml if present."""
    if explicit:
        return Path(explicit)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    local = Path.cwd() / DEFAULT_CONFIG_NAME
    return local if local.is_file() else None


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Read the file at `path` (or the defaults when None), then apply environment overrides,
    check every value, parse the schedules, digests and hooks, and read the secrets.

    Args:
        path: the TOML file; None means built-in defaults with paths relative to the cwd.
        env: the environment to read `AGENTD_*` overrides from (default `os.environ`); a
            secret's `*_env` variable is always read from `os.environ`.
        overrides: extra tables merged over the file, as if written in it (for tests).

    Raises:
        ConfigError: the file is missing or unparsable, a key is unknown or ill-typed, or
            a secret's file cannot be read or its variable is not set (naming the file or
            variable and the key).
    """
    config, schedules, named = _load_sections(path, env, overrides)
    # The named tables are parsed once [hooks] and [digests] have their final values.
    return dataclasses.replace(
        config,
        schedules=_parse_schedules(config, schedules),
        hooks=dataclasses.replace(config.hooks, settings=_parse_hooks(config, named.get("hooks", {}))),
        digests=DigestsConfig(_parse_digests(config, named.get("digests", {}))),
        secrets=_read_secrets(config),
    )


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """What a client of the running daemon (`agentd status`, `agentd tasks`, ...) needs of
    the configuration: where the daemon listens and the API token."""

    host: str
    port: int
    token: str = field(repr=False)
    source: str


def load_client_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> ClientConfig:
    """The configuration as `load_config` reads and checks its sections, but of the secrets
    only the API token: a client needs no other, and a user allowed to list tasks need not
    be able to read the SMTP password or a hook's secret. The daemon's own tables
    (`[[schedules]]`, `[hooks.<name>]`, `[digests.<name>]`) are left to `load_config`.

    Raises:
        ConfigError: as `load_config`, for the sections and the API token.
    """
    config, _, _ = _load_sections(path, env, None)
    return ClientConfig(host=config.server.host, port=config.server.port, token=_api_token(config),
                        source=config.source)


def _load_sections(
    path: str | Path | None, env: Mapping[str, str] | None, overrides: Mapping[str, Mapping[str, Any]] | None,
) -> tuple[Config, list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The sections of the file with the environment's overrides, checked; with the
    `[[schedules]]` tables and each section's named tables, still to be parsed."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path).resolve()
        source = str(path)
        try:
            with path.open("rb") as file:
                raw = tomllib.load(file)
                info: os.stat_result | None = os.fstat(file.fileno())
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: configuration file not found") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        base_dir = path.parent
    else:
        source, base_dir, info = "<defaults>", Path.cwd(), None
    inline = _inline_secrets(raw)  # of the file itself: overrides are not written in it
    for section, table in (overrides or {}).items():
        raw.setdefault(section, {}).update(table)

    sections: dict[str, Any] = {}
    named: dict[str, dict[str, Any]] = {}  # the [<section>.<name>] tables of each section
    schedules = raw.pop("schedules", [])
    if not isinstance(schedules, list) or not all(isinstance(t, dict) for t in schedules):
        raise ConfigError(f"{source}: schedules must be written as [[schedules]] tables")
    for name, value in raw.items():
        if name not in _SECTIONS:
            raise ConfigError(f"{source}: unknown section [{name}]; known: {', '.join(_SECTIONS)}")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        sections[name], named[name] = _build_section(name, _SECTIONS[name], value, source)
    if inline and info is not None and (mode := _open_mode(info)) is not None:
        raise ConfigError(f"{source}: {' and '.join(inline)} given in a file open to other users (mode "
                          f"{mode:04o}); chmod 600 {source} (or 640, owned by root, group of the daemon's "
                          f"user), or give the secret by its *_file or *_env key instead"
                          + _url_password_advice(inline))
    if named.get("plugins"):  # a plugin's own table, kept as written: the plugin reads it
        sections["plugins"] = dataclasses.replace(sections["plugins"], settings=named["plugins"])
    config = _apply_env(Config(source=source, base_dir=base_dir, **sections),
                        os.environ if env is None else env)
    _check_rules(config)
    return config, schedules, named


def _url_password_advice(inline: list[str]) -> str:
    """How to give the PostgreSQL passwords among the inline secrets `inline` without the file."""
    sections = [name.split("]")[0].removeprefix("[") for name in inline if name.endswith("url's password")]
    if not sections:
        return ""
    return ("; a PostgreSQL password by PGPASSWORD or ~/.pgpass, or the whole URL by "
            + " and ".join(f"AGENTD_{section.upper()}_URL" for section in sections))


def _read_secret(config: Config, section: str, values: Mapping[str, Any], key: str) -> str:
    """The secret `key` of a section: given inline (`<key>`), as the first line of the
    file `<key>_file` (without its line end), or in the environment variable named by
    `<key>_env` (as it is); '' when none is set.

    Raises:
        ConfigError: naming the section and the keys, when more than one of them is set
            (which one was meant cannot be told, and the others would go unchecked); or
            naming the key and the file or variable, when the file cannot be read (see
            `_secret_file_line`), the variable is not set or empty, or the secret begins
            or ends with whitespace (see `_unpadded`).
    """
    given = [way for way in (key, f"{key}_file", f"{key}_env") if values.get(way)]
    if len(given) > 1:
        origins = " and ".join(dict.fromkeys(config.origin(section, way) for way in given))
        raise ConfigError(f"{origins}: [{section}] {' and '.join(given)} are "
                          f"{'both' if len(given) == 2 else 'all'} set; give one of them")
    if not given:
        return ""
    way = given[0]
    where = f"{config.origin(section, way)}: [{section}] {way}"
    if way == key:
        return _unpadded(str(values[key]), where, "its value")
    if way.endswith("_file"):
        path = config.resolve(str(values[way]))
        try:
            line = _secret_file_line(path)
        except _UnusableSecretError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return _unpadded(line, where, f"the first line of {path}")
    name = str(values[way])
    if not os.environ.get(name):
        state = "is empty" if name in os.environ else "is not set"
        raise ConfigError(f"{where}: the environment variable {name} {state}")
    return _unpadded(os.environ[name], where, f"the environment variable {name}")


def _unpadded(secret: str, where: str, what: str) -> str:
    """`secret`, refused when it begins or ends with whitespace. Such a secret is almost
    always a slip (a pasted space, the newline `kubectl create secret --from-file` keeps in
    a variable), and the other side of it (an HTTP client, GitHub, the SMTP server) most
    likely has none, so keeping it fails later as a mysterious 401 and stripping it fails
    the few who meant it: refused, the slip is found at the start, naming where it is.
    A file's line end is no part of its first line (`_secret_file_line`) and is not seen here.

    Raises:
        ConfigError: naming `where` the secret was given and `what` held it; the secret
            itself is not shown.
    """
    if secret != secret.strip():
        raise ConfigError(f"{where}: expected a secret without whitespace at either end, but {what} "
                          "begins or ends with a space, tab or line break; remove it")
    return secret


def _read_signing_secret(config: Config, section: str, values: Mapping[str, Any]) -> str:
    """The webhook secret `secret` of a section (see `_read_secret`), checked to stand for
    a signing key.

    Raises:
        ConfigError: as `_read_secret`; or a `whsec_` secret is not base64, naming the key
            it was given by (and its file or variable).
    """
    secret = _read_secret(config, section, values, "secret")
    try:
        signing_key(secret)
    except ValueError as exc:
        key = next(k for k in ("secret", "secret_file", "secret_env") if values.get(k))
        given = (f" (the first line of {config.resolve(str(values[key]))})" if key == "secret_file"
                 else f" (the environment variable {values[key]})" if key == "secret_env" else "")
        raise ConfigError(f"{config.origin(section, key)}: [{section}] {key}{given}: {exc}") from None
    return secret


class _UnusableSecretError(Exception):
    """Why a secret's file cannot be used, for the message naming its key."""


# A secret file holds one secret on its first line, perhaps with a comment after it:
# anything bigger is not one, and is not read into memory to find out.
SECRET_FILE_LIMIT = 65_536


def _secret_file_line(path: Path) -> str:
    """The first line of the secret file `path`, without its line end (LF or CRLF: `echo
    x > file` writes one, and Windows editors the other), and nothing else taken off.

    Raises:
        _UnusableSecretError: the file cannot be opened, is no regular file (a FIFO would
            block the load until a writer came, a device could be endless), is open to other
            users, is larger than SECRET_FILE_LIMIT, is not UTF-8 text, or its first line is
            empty.
    """
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise _UnusableSecretError(f"cannot read {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _UnusableSecretError(f"cannot read {path}: not a regular file ({_file_kind(info.st_mode)})")
        if (mode := _open_mode(info)) is not None:
            raise _UnusableSecretError(f"{path} is open to other users (mode {mode:04o}); chmod 600 "
                                       f"{path} (or 640, owned by root, group of the daemon's user)")
        data = b""
        while len(data) <= SECRET_FILE_LIMIT and (chunk := os.read(fd, SECRET_FILE_LIMIT + 1 - len(data))):
            data += chunk
    except OSError as exc:
        raise _UnusableSecretError(f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > SECRET_FILE_LIMIT:
        raise _UnusableSecretError(f"{path} is larger than {SECRET_FILE_LIMIT} bytes: not a secret "
                                   "file (it holds the secret on its first line)")
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise _UnusableSecretError(f"cannot read {path}: not text ({exc.reason})") from None
    line = next(iter(text.splitlines()), "")
    if not line.strip():
        raise _UnusableSecretError(f"the first line of {path} is empty; write the secret there")
    return line


def _open_mode(info: os.stat_result) -> int | None:
    """The permission bits of a file holding a secret (`info`), when they open it to
    users other than the daemon's; else None. A file of our own is ours alone; one another
    user (root) hands us through our group, as systemd/README.md installs secrets and
    agentd.toml (0640, group agentd), may be group-readable."""
    mode = stat.S_IMODE(info.st_mode)
    shared = info.st_uid != os.geteuid()
    return mode if mode & (0o027 if shared else 0o077) else None


def _inline_secrets(raw: Mapping[str, Any]) -> list[str]:
    """The secrets a configuration file's tables (`raw`) give inline, as '[section] key'."""
    tables: list[tuple[str, str, object]] = [("server", "token", raw.get("server")),
                                             ("metrics", "token", raw.get("metrics")),
                                             ("webhooks", "secret", raw.get("webhooks"))]
    hooks = raw.get("hooks")
    if isinstance(hooks, dict):
        tables += [(f"hooks.{name}", "secret", table) for name, table in hooks.items()]
    found = [f"[{name}] {key}" for name, key, table in tables
             if isinstance(table, dict) and isinstance(table.get(key), str) and table[key]]
    for section in ("store", "memory"):
        url = raw[section].get("url") if isinstance(raw.get(section), dict) else None
        if isinstance(url, str) and redact_url(url) != url:
            found.append(f"[{section}] url's password")
    return found


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "of another kind")


def _read_secrets(config: Config) -> Secrets:
    return Secrets(
        api_token=_api_token(config),
        mail_password=_read_secret(config, "mail", dataclasses.asdict(config.mail), "password"),
        llm_key=_read_secret(config, "llm", dataclasses.asdict(config.llm), "key"),
        webhooks_secret=_read_signing_secret(config, "webhooks", dataclasses.asdict(config.webhooks)),
        memory_http_key=_read_secret(config, "memory", dataclasses.asdict(config.memory), "http_key"),
        metrics_token=_bearer_token(config, "metrics", config.metrics.token, config.metrics.token_file),
    )


def _api_token(config: Config) -> str:
    """The bearer token in force: `token` or the first line of `token_file`, else ''.

    Raises:
        ConfigError: as `_bearer_token`.
    """
    return _bearer_token(config, "server", config.server.token, config.server.token_file)


def _bearer_token(config: Config, section: str, token: str, token_file: str) -> str:
    """A section's bearer token: its `token`, or the first line of its `token_file`, else ''.

    Raises:
        ConfigError: as `_read_secret`; or the token is blank or not one word of visible
            ASCII (it could not be sent, or would look set while protecting nothing).
    """
    found = _read_secret(config, section, {"token": token, "token_file": token_file}, "token")
    if found and not _TOKEN.fullmatch(found):
        key = "token" if token else "token_file"
        given = "" if token else f" in the first line of {config.resolve(token_file)}"
        raise ConfigError(f"{config.origin(section, key)}: [{section}] {key}: expected visible ASCII "
                          f"characters without spaces{given} (the token goes into an HTTP header)")
    return found


def _check_memory(config: Config) -> None:
    for name in config.memory.filter_fields:
        if not name.isidentifier() or not name.isascii():
            raise ConfigError(f"{config.origin('memory', 'filter_fields')}: [memory] filter_fields: "
                              f"{name!r} is not a plain name")
    if not 0 < config.memory.dedupe_threshold <= 1:
        raise ConfigError(f"{config.origin('memory', 'dedupe_threshold')}: [memory] dedupe_threshold: "
                          "expected 0 < x <= 1")
    if not 1 <= config.memory.embed_batch <= MAX_EMBED_BATCH:
        raise ConfigError(f"{config.origin('memory', 'embed_batch')}: [memory] embed_batch: expected "
                          f"1..{MAX_EMBED_BATCH} texts per embedding call, got {config.memory.embed_batch}")


def _parse_hooks(config: Config, tables: Mapping[str, dict[str, Any]]) -> dict[str, HookSpec]:
    hooks = {}
    for name, table in tables.items():
        where = f"{config.source}: [hooks.{name}]"
        if not _HOOK_NAME.fullmatch(name):  # the route's {name} takes no other
            raise ConfigError(f"{where} the name goes into the URL /hooks/<name>: expected at least "
                              "one character and no '/', '{' or '}'")
        for key, value in table.items():
            if key not in _HOOK_KEYS:
                raise ConfigError(f"{where} unknown key {key!r}; known: {', '.join(_HOOK_KEYS)}")
            kind, expected = _HOOK_KEYS[key]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ConfigError(f"{where} {key}: expected {expected}, got {_described(key, value)}")
        if not any(table.get(key) for key in ("secret", "secret_file", "secret_env")):
            raise ConfigError(f"{where} needs a secret, secret_file or secret_env")
        schemes = table.get("schemes", ["standard"])
        if not schemes or not all(scheme in HOOK_SCHEMES for scheme in schemes):
            raise ConfigError(f"{where} schemes: expected a list of {', '.join(HOOK_SCHEMES)}, "
                              f"got {schemes!r}")
        if table.get("tolerance", 1) <= 0:
            raise ConfigError(f"{where} tolerance: expected a positive number of seconds")
        hooks[name] = HookSpec(name=name, secret=_read_signing_secret(config, f"hooks.{name}", table),
                               schemes=tuple(schemes),
                               tolerance=float(table.get("tolerance", config.hooks.tolerance)))
    return hooks


def _parse_digests(config: Config, tables: Mapping[str, dict[str, Any]]) -> dict[str, DigestSpec]:
    digests = {}
    for name, table in tables.items():
        try:
            digests[name] = DigestSpec.from_mapping(name, table)
        except ValueError as exc:
            raise ConfigError(f"{config.source}: [digests.{name}] {exc}") from None
    if digests and not config.mail.host:
        first = next(iter(digests))
        raise ConfigError(f"{config.source}: [digests.{first}] mails its events: set [mail] host")
    return digests


def _parse_schedules(config: Config, tables: list[dict[str, Any]]) -> tuple[ScheduleSpec, ...]:
    specs: dict[str, ScheduleSpec] = {}
    numbers: dict[str, int] = {}
    for number, table in enumerate(tables, start=1):
        label = f" ({table['id']})" if isinstance(table.get("id"), str) else ""
        try:
            spec = ScheduleSpec.from_mapping(table)
        except ValueError as exc:
            raise ConfigError(f"{config.source}: [[schedules]] #{number}{label}: {exc}") from None
        if spec.id.startswith(BUILTIN_SCHEDULE_PREFIX):  # it would replace one of them unnoticed
            raise ConfigError(f"{config.source}: [[schedules]] #{number}{label}: id: ids starting "
                              f"{BUILTIN_SCHEDULE_PREFIX!r} are the daemon's own schedules (maintenance, "
                              "digests); choose another")
        if spec.id in specs:  # the scheduler keeps one schedule per id: the first would be lost
            raise ConfigError(f"{config.source}: [[schedules]] #{number}{label}: id {spec.id!r} is "
                              f"already schedule #{numbers[spec.id]}'s; give each its own")
        specs[spec.id], numbers[spec.id] = spec, number
    return tuple(specs.values())


def _check_store(config: Config) -> None:
    where = config.origin
    url = config.store.url
    if url and not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"{where('store', 'url')}: [store] url: expected a postgresql:// URL, "
                          f"got {redact_url(url)!r}")
    if not 2 <= config.store.pool_size <= 1000:
        raise ConfigError(f"{where('store', 'pool_size')}: [store] pool_size: expected 2..1000 "
                          f"connections, got {config.store.pool_size}")
    memory = config.memory
    if memory.url and memory.url != LOCAL_MEMORY and not memory.url.startswith(
            ("postgresql://", "postgres://")):
        raise ConfigError(f"{where('memory', 'url')}: [memory] url: expected a postgresql:// URL "
                          f"or {LOCAL_MEMORY!r} (memory.db beside this daemon), "
                          f"got {redact_url(memory.url)!r}")
    limits = (("pool_size", 2, 1000, "connections"), ("hnsw_m", 2, 100, ""),
              ("hnsw_ef_construction", 4, 1000, ""), ("hnsw_ef_search", 1, 1000, ""),
              ("hnsw_build_memory_mb", 64, 1_048_576, "MB"))
    for key, low, high, unit in limits:
        value = getattr(memory, key)
        if not low <= value <= high:
            raise ConfigError(f"{where('memory', key)}: [memory] {key}: expected {low}..{high}"
                              f"{' ' + unit if unit else ''}, got {value}")
    if memory.hnsw_ef_construction < 2 * memory.hnsw_m:
        raise ConfigError(f"{where('memory', 'hnsw_ef_construction')}: [memory] "
                          f"hnsw_ef_construction: pgvector needs at least twice hnsw_m "
                          f"({2 * memory.hnsw_m}), got {memory.hnsw_ef_construction}")


def unused_settings(config: Config) -> list[str]:
    """The settings `config` gives that this daemon will not use, each a sentence naming
    the key and where it was set: the SQLite file's settings of `[store]` once `url` puts
    the data on PostgreSQL (`synchronous` and `busy_timeout_ms` still serve memory.db when
    memory stays there). Warnings, not errors: the same file may serve daemons on either
    engine."""
    store, default = config.store, StoreConfig()
    if not store.url:
        return []
    unused = ["path"]
    if config.memory_url:
        unused += ["synchronous", "busy_timeout_ms"]
    return [f"{config.origin('store', key)}: [store] {key} is not used: [store] url puts the "
            "data on PostgreSQL" + ("" if key == "path" else " (memory too)")
            for key in unused if getattr(store, key) != getattr(default, key)]


def _check_backup(config: Config) -> None:
    backup, where = config.backup, config.origin
    if backup.dir and config.store.url:
        # Everything agentd stores is then in PostgreSQL (memory too, unless [memory] url
        # names another PostgreSQL database): nothing local is left for agentd to copy.
        raise ConfigError(f"{where('backup', 'dir')}: [backup] dir: the store is on PostgreSQL "
                          "([store] url), which agentd does not back up: use pg_dump or "
                          "pg_basebackup (docs/operations.md, Backups and restore), and remove "
                          "[backup] dir")
    if backup.every < 1:
        raise ConfigError(f"{where('backup', 'every')}: [backup] every: expected at least 1 "
                          f"second, got {backup.every:g}")
    if backup.keep < 1:
        raise ConfigError(f"{where('backup', 'keep')}: [backup] keep: expected at least 1 "
                          f"backup, got {backup.keep}")


def redact_url(url: str) -> str:
    """`url` with the password of its user part replaced by `***`, for logs and errors."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"


def _check_outbound(config: Config) -> None:
    where = config.origin
    if config.mail.port > 65535:
        raise ConfigError(f"{where('mail', 'port')}: [mail] port: expected 0..65535, got {config.mail.port}")
    if "@" not in config.mail.sender:
        raise ConfigError(f"{where('mail', 'sender')}: [mail] sender: expected a mail address, "
                          f"got {config.mail.sender!r}")
    if config.mail.timeout <= 0:
        raise ConfigError(f"{where('mail', 'timeout')}: [mail] timeout: expected a positive number "
                          "of seconds")
    for network in config.webhooks.allow_networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(f"{where('webhooks', 'allow_networks')}: [webhooks] allow_networks: "
                              f"{network!r} is not an IP address or network (e.g. 10.0.0.0/8)") from None
    if config.llm.base_url and not config.llm.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"{where('llm', 'base_url')}: [llm] base_url: expected an http:// or https:// "
                          f"URL, got {config.llm.base_url!r}")
    if config.llm.base_url and not config.llm.model:
        raise ConfigError(f"{where('llm', 'model')}: [llm] model: name the model to ask (e.g. \"llama3.2\"); "
                          "[llm] base_url is set")


def _check_rules(config: Config) -> None:
    buckets: dict[int, str] = {}
    for text in config.events.persistence:
        where = f"{config.origin('events', 'persistence')}: [events] persistence: rule {text!r}"
        try:
            rule = PersistenceRule.parse(text)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        if rule.own_limits:
            other = buckets.setdefault(rule.bucket, rule.pattern)
            if other != rule.pattern:  # two patterns hashing alike: about 1 in 500 million
                raise ConfigError(f"{where}: its events would be kept with those of {other!r}; "
                                  "write its pattern another way (e.g. add a rule before it)")
    if config.hooks.tolerance <= 0:
        raise ConfigError(f"{config.origin('hooks', 'tolerance')}: [hooks] tolerance: expected a "
                          "positive number of seconds")
    _check_memory(config)
    _check_store(config)
    _check_backup(config)
    _check_outbound(config)
    if 0 < config.daemon.stall_warning < MIN_STALL_WARNING:
        # The watch thread wakes four times per stall_warning: far below the loop's own
        # timer jitter it takes a share of a core and reports stalls that are not.
        raise ConfigError(f"{config.origin('daemon', 'stall_warning')}: [daemon] stall_warning: "
                          f"expected 0 (off) or at least {MIN_STALL_WARNING} seconds, "
                          f"got {config.daemon.stall_warning}")
    if config.daemon.safe_mode_after <= 0:  # 0 would mark each start survived as it serves
        raise ConfigError(f"{config.origin('daemon', 'safe_mode_after')}: [daemon] safe_mode_after: "
                          "expected a positive number of seconds")
    if config.tasks.threads < 1:
        raise ConfigError(f"{config.origin('tasks', 'threads')}: [tasks] threads: expected at "
                          "least 1 (sync tasks would never run)")
    if config.tasks.lease <= 0:  # the heartbeat renews every lease / 3 seconds
        raise ConfigError(f"{config.origin('tasks', 'lease')}: [tasks] lease: expected a positive "
                          "number of seconds")
    _check_connection_limits(config)


def _check_connection_limits(config: Config) -> None:
    if config.streams.client_buffer < 2:
        raise ConfigError(f"{config.origin('streams', 'client_buffer')}: [streams] client_buffer: "
                          "expected at least 2")
    for key in ("ws_max_requests", "ws_max_subscriptions", "send_buffer"):
        if getattr(config.streams, key) < 1:
            raise ConfigError(f"{config.origin('streams', key)}: [streams] {key}: expected at least 1")
    if config.server.header_timeout <= 0:  # 0 would let a half-sent request hold its connection
        raise ConfigError(f"{config.origin('server', 'header_timeout')}: [server] header_timeout: "
                          "expected a positive number of seconds")


_NAMED_TABLES = (PluginsConfig, HooksConfig, DigestsConfig)


def _build_section(name: str, cls: type[Any], table: dict[str, Any],
                   source: str) -> tuple[Any, dict[str, Any]]:
    """The section `cls` of `table`'s keys, and its named tables (`[hooks.<name>]`, ...)
    apart, for the caller to parse."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    named: dict[str, Any] = {}
    for key, value in table.items():
        if cls in _NAMED_TABLES and key not in known and isinstance(value, dict):
            named[key] = value  # a [plugins.<name>], [hooks.<name>] or [digests.<name>] table
            continue
        if key not in known or key == "settings":
            keys = sorted(known - {"settings"})
            if cls in _NAMED_TABLES:
                keys.append(f"[{name}.<name>] tables")
            raise ConfigError(f"{source}: [{name}] unknown key {key!r}; known: {', '.join(keys)}")
        if key in _INLINE_SECRETS and not isinstance(value, str):
            raise ConfigError(f"{source}: [{name}] {key}: expected a string, got {_described(key, value)}")
        values[key] = _coerce(value, hints[key], f"{source}: [{name}] {key}")
    return cls(**values), named


# The keys whose value is itself a secret: an error about one does not show it (a number
# written without quotes is still the secret, and the message goes to logs and terminals).
_INLINE_SECRETS = frozenset({"token", "secret"})


def _described(key: str, value: object) -> str:
    """`value` as an error message shows it: its repr, or only its type for a secret."""
    if key in _INLINE_SECRETS:
        return f"a value of type {type(value).__name__} (not shown: it is a secret)"
    return repr(value)


def _apply_env(config: Config, env: Mapping[str, str]) -> Config:
    replaced: dict[str, Any] = {}
    overridden: set[tuple[str, str]] = set()
    for var in sorted(env):
        if not var.startswith("AGENTD_") or var == CONFIG_ENV:
            continue
        rest = var.removeprefix("AGENTD_").lower()
        section = next((s for s in _SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            raise ConfigError(f"environment {var}: no section {rest.split('_')[0]!r}")
        key = rest.removeprefix(section + "_")
        current = replaced.get(section, getattr(config, section))
        hints = typing.get_type_hints(type(current))
        if key not in hints or key == "settings":
            raise ConfigError(f"environment {var}: [{section}] has no key {key!r}")
        value = _coerce(_parse_env(env[var], hints[key]), hints[key], f"environment {var}")
        replaced[section] = dataclasses.replace(current, **{key: value})
        overridden.add((section, key))
    if not replaced:
        return config
    return dataclasses.replace(config, **replaced, from_env=frozenset(overridden))


def _parse_env(text: str, hint: Any) -> Any:
    if hint is str or typing.get_origin(hint) is Literal:
        return text
    if typing.get_origin(hint) is tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # _coerce reports the type mismatch with the original text


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is types.UnionType:  # `T | None`: None is only ever a default (TOML has no null)
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{where}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value)
    if origin is Mapping:  # name -> positive count, e.g. queues = { default = 1000 }
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1
            for k, v in value.items()
        ):
            raise ConfigError(f"{where}: expected a table of names to whole numbers >= 1, got {value!r}")
        return dict(value)
    expected = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}[hint]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {expected}, got {value!r}")
    if hint in (int, float) and value < 0:
        raise ConfigError(f"{where}: expected a non-negative number, got {value!r}")
    return value


def _is_host_entry(entry: str) -> bool:
    """A host name, an address (IPv6 with or without brackets) or "*", without port."""
    if entry == "*" or _HOST_NAME.fullmatch(entry):
        return True
    try:
        ipaddress.IPv6Address(entry.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True


def check_serving_rules(config: Config) -> None:
    """Refuse a configuration that would expose the API beyond loopback without a token, a
    bad port, `allowed_hosts` or `allowed_origins` entry (a bad token is refused by
    `load_config`)."""
    token = config.secrets.api_token
    if config.server.host not in LOOPBACK_HOSTS and not token:
        raise ConfigError(
            f"{config.origin('server', 'host')}: [server] host = {config.server.host!r} is not a "
            "loopback address; set [server] token or token_file before listening beyond this machine"
        )
    for entry in config.server.allowed_hosts:
        if not _is_host_entry(entry):
            raise ConfigError(f"{config.origin('server', 'allowed_hosts')}: [server] allowed_hosts: "
                              f"expected host names or addresses without scheme or port (or \"*\"), "
                              f"got {entry!r}")
    for entry in config.server.allowed_origins:
        # An entry that is no origin would never match: its pages would get 403 unexplained.
        if entry != "*" and not _ORIGIN.fullmatch(entry):
            raise ConfigError(f"{config.origin('server', 'allowed_origins')}: [server] allowed_origins: "
                              "expected origins as browsers send them, scheme://host[:port] in "
                              f"lower case (e.g. \"https://app.example.com\"), or \"*\"; got {entry!r}")
    if "*" in config.server.allowed_origins and not token:
        # Without a token, CORS for every origin lets any web page a user visits drive the API.
        raise ConfigError(f"{config.origin('server', 'allowed_origins')}: [server] allowed_origins = "
                          "[\"*\"] lets every web page call the API; set [server] token or token_file "
                          "first, or list the origins")
    if "*" in config.server.allowed_hosts and not token:
        # Without a token the Host check is all that keeps a rebound page (DNS rebinding) out.
        raise ConfigError(f"{config.origin('server', 'allowed_hosts')}: [server] allowed_hosts = "
                          "[\"*\"] lets a web page whose name was rebound to this machine call the "
                          "API; set [server] token or token_file first, or list the names")
    if not 0 <= config.server.port <= 65535:
        raise ConfigError(f"{config.origin('server', 'port')}: [server] port: expected 0..65535, "
                          f"got {config.server.port}")
