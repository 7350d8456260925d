"""agentd.toml, AGENTD_* overrides, error messages, and the check-config / run exit codes."""

from __future__ import annotations

import dataclasses
import textwrap
import tomllib
from pathlib import Path

import pytest

from agentd.cli import main
from agentd.config import Config, check_serving_rules, load_config
from agentd.errors import ConfigError
from agentd.events import TopicFilter
from agentd.schedule import ScheduleSpec
from agentd.specs import DigestSpec, HookSpec

REPO = Path(__file__).resolve().parent.parent
# [[schedules]] is a list of tables, not a section with keys: tests of its own cover it;
# `secrets` holds what the sections' secret keys name, read at load.
SECTIONS = [f.name for f in dataclasses.fields(Config)
            if f.name not in ("source", "base_dir", "schedules", "secrets", "from_env")]


def write(tmp_path: Path, text: str, name: str = "agentd.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    path.chmod(0o600)  # as a file giving a secret inline must be (test_secrets.py)
    return path


# --------------------------------------------------------------------------- the shipped file


def test_repo_agentd_toml_equals_the_dataclass_defaults() -> None:
    config = load_config(REPO / "agentd.toml", env={})
    defaults = Config()
    assert config.source == str((REPO / "agentd.toml").resolve())
    assert config.base_dir == REPO
    for section in SECTIONS:
        assert getattr(config, section) == getattr(defaults, section), f"[{section}] differs"


def test_repo_agentd_toml_shows_every_key() -> None:
    """The file promises 'every key is shown with its default value'. A key unset by
    default (None, which TOML cannot write) is shown commented out in its section."""
    text = (REPO / "agentd.toml").read_text()
    raw = tomllib.loads(text)
    for section in SECTIONS:
        defaults = getattr(Config(), section)
        keys = {f.name for f in dataclasses.fields(defaults)} - {"settings"}
        unset = {key for key in keys if getattr(defaults, key) is None}
        assert section in raw, f"[{section}] is missing from agentd.toml"
        missing = keys - unset - set(raw[section])
        assert not missing, f"[{section}] keys missing from agentd.toml: {sorted(missing)}"
        body = text.split(f"\n[{section}]\n", 1)[1].split("\n[", 1)[0]
        for key in unset:
            assert f"\n# {key} = " in body, f"[{section}] {key} (unset) is not shown commented out"


def test_defaults_without_a_file_resolve_paths_against_cwd() -> None:
    config = load_config(None, env={})
    assert config.source == "<defaults>"
    assert config.data_dir == Path.cwd() / "data"
    assert config.database_path == Path.cwd() / "data" / "agentd.db"


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [daemon]
        data_dir = "state"
        [store]
        path = "x.db"
        [plugins]
        paths = ["p1", "/abs/p2"]
    """)
    config = load_config(path, env={})
    assert config.data_dir == tmp_path / "state"
    assert config.database_path == tmp_path / "state" / "x.db"
    assert config.plugin_dirs == (tmp_path / "p1", Path("/abs/p2"))


# --------------------------------------------------------------------------- environment


def test_env_overrides_each_type(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [server]
        port = 1234
    """)
    config = load_config(path, env={
        "AGENTD_SERVER_PORT": "9000",                 # int, over the file's value
        "AGENTD_SERVER_HOST": "::1",                  # str
        "AGENTD_DAEMON_STOP_TIMEOUT": "2.5",          # float
        "AGENTD_PLUGINS_ENTRY_POINTS": "false",       # bool
        "AGENTD_PLUGINS_DISABLED": "news, chat,",     # list, comma-separated
        "AGENTD_STORE_SYNCHRONOUS": "full",           # Literal
        "AGENTD_LOG_LEVEL": "debug",                  # Literal
        "AGENTD_SERVER_TOKEN": "123",                 # a str that looks like an int stays a str
        "AGENTD_CONFIG": "ignored: names the file, not a key",
        "OTHER": "ignored",
    })
    assert config.server.port == 9000
    assert config.server.host == "::1"
    assert config.daemon.stop_timeout == 2.5
    assert config.plugins.entry_points is False
    assert config.plugins.disabled == ("news", "chat")
    assert config.store.synchronous == "full"
    assert config.log.level == "debug"
    assert config.server.token == "123"


def test_env_overrides_keep_plugin_tables(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [plugins.hello]
        greeting = "hi"
    """)
    config = load_config(path, env={"AGENTD_PLUGINS_ENABLED": "hello"})
    assert config.plugins.enabled == ("hello",)
    assert config.plugins.settings == {"hello": {"greeting": "hi"}}


@pytest.mark.parametrize(
    ("var", "value", "fragments"),
    [
        ("AGENTD_SERVER_PORT", "eighty", ["AGENTD_SERVER_PORT", "expected an integer", "'eighty'"]),
        ("AGENTD_SERVER_PORT", "-1", ["AGENTD_SERVER_PORT", "non-negative"]),
        ("AGENTD_PLUGINS_ENTRY_POINTS", "yes", ["AGENTD_PLUGINS_ENTRY_POINTS", "expected a boolean"]),
        ("AGENTD_STORE_SYNCHRONOUS", "off", ["AGENTD_STORE_SYNCHRONOUS", "'full'", "'normal'", "'off'"]),
        ("AGENTD_NOPE_KEY", "1", ["AGENTD_NOPE_KEY", "no section 'nope'"]),
        ("AGENTD_SERVER_NOPE", "1", ["AGENTD_SERVER_NOPE", "[server]", "'nope'"]),
        ("AGENTD_PLUGINS_SETTINGS", "x", ["AGENTD_PLUGINS_SETTINGS", "'settings'"]),
    ],
)
def test_env_errors_name_the_variable(var: str, value: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, env={var: value})
    message = str(caught.value)
    assert message.startswith(f"environment {var}:")
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"AGENTD_SERVER_PORT": "99999"}, "[server] port: expected 0..65535, got 99999"),
        ({"AGENTD_SERVER_HOST": "0.0.0.0"}, "[server] host = '0.0.0.0' is not a loopback address"),
        ({"AGENTD_MAIL_SENDER": "agentd"}, "[mail] sender: expected a mail address"),
        ({"AGENTD_MAIL_TIMEOUT": "0"}, "[mail] timeout: expected a positive number"),
        ({"AGENTD_TASKS_LEASE": "0"}, "[tasks] lease: expected a positive number of seconds"),
        # The URL's password is not shown.
        ({"AGENTD_STORE_URL": "mysql://root:hunter2@db/agentd"},
         "[store] url: expected a postgresql:// URL, got 'mysql://root:***@db/agentd'"),
        ({"AGENTD_STORE_POOL_SIZE": "1"}, "[store] pool_size: expected 2..1000 connections, got 1"),
        ({"AGENTD_MEMORY_URL": "sqlite:///memory.db"},
         "[memory] url: expected a postgresql:// URL or 'sqlite' (memory.db beside this daemon), "
         "got 'sqlite:///memory.db'"),
        ({"AGENTD_MEMORY_HNSW_M": "1"}, "[memory] hnsw_m: expected 2..100, got 1"),
        ({"AGENTD_MEMORY_HNSW_EF_SEARCH": "0"}, "[memory] hnsw_ef_search: expected 1..1000, got 0"),
        ({"AGENTD_MEMORY_HNSW_EF_CONSTRUCTION": "20"},
         "[memory] hnsw_ef_construction: pgvector needs at least twice hnsw_m (32), got 20"),
        ({"AGENTD_MEMORY_HNSW_BUILD_MEMORY_MB": "16"},
         "[memory] hnsw_build_memory_mb: expected 64..1048576 MB, got 16"),
    ],
)
def test_a_bad_value_from_the_environment_names_the_variable_not_the_file(
    tmp_path: Path, env: dict[str, str], fragment: str
) -> None:
    """Range and policy checks run after the overrides: they too name where the value came from."""
    path = write(tmp_path, "[server]\nport = 8470\n")
    with pytest.raises(ConfigError) as caught:
        check_serving_rules(load_config(path, env=env))
    (var,) = env
    assert str(caught.value).startswith(f"environment {var}: "), caught.value
    assert fragment in str(caught.value)


# --------------------------------------------------------------------------- file errors


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("[nope]\nx = 1\n", ["unknown section [nope]"]),
        ("[server]\nprot = 80\n", ["[server] unknown key 'prot'", "port"]),
        ('[server]\nport = "80"\n', ["[server] port", "expected an integer", "'80'"]),
        ("[server]\nport = true\n", ["[server] port", "expected an integer"]),
        ("[daemon]\nstop_timeout = -1.5\n", ["[daemon] stop_timeout", "non-negative"]),
        # An int given for a float key must be range-checked like a float.
        ("[daemon]\nstop_timeout = -1\n", ["[daemon] stop_timeout", "non-negative"]),
        ('[daemon]\nstop_timeout = "soon"\n', ["[daemon] stop_timeout", "expected a number"]),
        # Found by review: a tiny stall_warning started, its watch thread busy and crying wolf.
        ("[daemon]\nstall_warning = 0.0001\n", ["[daemon] stall_warning", "0 (off) or at least 0.1"]),
        # Found by review: a hook no URL could reach started silently.
        ('[hooks."a/b"]\nsecret = "s"\n', ["[hooks.a/b]", "URL /hooks/<name>", "no '/'"]),
        ('[plugins]\nentry_points = "no"\n', ["[plugins] entry_points", "expected a boolean"]),
        ('[plugins]\npaths = "plugins"\n', ["[plugins] paths", "expected a list of strings"]),
        ('[plugins]\npaths = [1]\n', ["[plugins] paths", "expected a list of strings"]),
        ('[store]\nsynchronous = "off"\n', ["[store] synchronous", "'full'", "'normal'", "'off'"]),
        ('[log]\nformat = "xml"\n', ["[log] format", "'json'", "'xml'"]),
        ("daemon = 3\n", ["[daemon] must be a table"]),
        ("[server\n", ["not valid TOML"]),
    ],
)
def test_file_errors_name_the_file_and_the_key(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    message = str(caught.value)
    assert message.startswith(f"{path}:")
    for fragment in fragments:
        assert fragment in message


def test_the_store_url_and_its_override_choose_postgresql(tmp_path: Path) -> None:
    path = write(tmp_path, '[store]\nurl = "postgresql://agentd@db1/agentd"\npool_size = 4\n')
    assert load_config(path, env={}).store.url == "postgresql://agentd@db1/agentd"
    overridden = load_config(path, env={"AGENTD_STORE_URL": "postgres://agentd@db2/agentd"})
    assert (overridden.store.url, overridden.store.pool_size) == ("postgres://agentd@db2/agentd", 4)
    assert load_config(None, env={}).store.url == ""  # the default: SQLite


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration file not found") as caught:
        load_config(tmp_path / "absent.toml", env={})
    assert str(tmp_path / "absent.toml") in str(caught.value)


def test_int_is_accepted_for_a_float_key(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[daemon]\nstop_timeout = 3\n"), env={})
    assert config.daemon.stop_timeout == 3.0
    assert isinstance(config.daemon.stop_timeout, float)


def test_plugin_tables_land_in_settings(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [plugins]
        disabled = ["chat"]

        [plugins.hello]
        greeting = "hi"
        times = 3

        [plugins.news.feeds]
        hn = "https://news.ycombinator.com/rss"
    """)
    config = load_config(path, env={})
    assert config.plugins.disabled == ("chat",)
    assert dict(config.plugins.settings) == {
        "hello": {"greeting": "hi", "times": 3},
        "news": {"feeds": {"hn": "https://news.ycombinator.com/rss"}},
    }


def test_plugins_settings_key_cannot_be_set_directly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[plugins\] unknown key 'settings'"):
        load_config(write(tmp_path, "[plugins]\nsettings = 1\n"), env={})


# --------------------------------------------------------------------------- parsed once


PARSED = """
[mail]
host = "127.0.0.1"
[hooks]
tolerance = 60
[hooks.ci]
secret = "s"
schemes = ["github", "standard"]
[hooks.deploy]
secret = "d"
tolerance = 5
[digests.news]
pattern = "news.*"
to = "me@example.com"
every = "1h"
[[schedules]]
id = "tick"
every = "30m"
event = "clock.tick"
"""


def test_schedules_digests_and_hooks_are_loaded_as_their_specs(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, PARSED), env={"AGENTD_HOOKS_TOLERANCE": "90"})
    assert config.schedules == (ScheduleSpec(id="tick", every=1800.0, event="clock.tick"),)
    assert config.digests.settings == {"news": DigestSpec(
        name="news", topics=TopicFilter.parse("news.*"), to=("me@example.com",),
        subject="agentd digest: news", every=3600.0, count=None)}
    # A hook without a tolerance of its own takes [hooks] tolerance as overridden.
    assert config.hooks.settings == {
        "ci": HookSpec(name="ci", secret="s", schemes=("github", "standard"), tolerance=90.0),
        "deploy": HookSpec(name="deploy", secret="d", schemes=("standard",), tolerance=5.0)}


async def test_the_daemon_runs_the_specs_the_configuration_holds(tmp_path: Path) -> None:
    """Parsed once: the daemon's digests and scheduler hold the very objects `load_config`
    made, not specs parsed again from the tables."""
    from agentd.app import Daemon

    config = load_config(write(tmp_path, PARSED + textwrap.dedent("""
        [daemon]
        data_dir = "data"
        [server]
        port = 0
        [plugins]
        paths = []
        entry_points = false
        """)), env={})
    async with Daemon(config) as daemon:
        assert daemon.digests.specs["news"] is config.digests.settings["news"]
        assert daemon.scheduler.schedules["tick"].spec is config.schedules[0]


# --------------------------------------------------------------------------- serving rules


def test_non_loopback_host_needs_a_token(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nhost = "0.0.0.0"\n')
    config = load_config(path, env={})
    with pytest.raises(ConfigError) as caught:
        check_serving_rules(config)
    assert str(path) in str(caught.value)
    assert "'0.0.0.0' is not a loopback address" in str(caught.value)
    check_serving_rules(load_config(path, env={"AGENTD_SERVER_TOKEN": "s3cret"}))


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_loopback_hosts_need_no_token(host: str) -> None:
    check_serving_rules(load_config(None, env={"AGENTD_SERVER_HOST": host}))


def test_port_out_of_range_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"\[server\] port: expected 0..65535, got 70000"):
        check_serving_rules(load_config(None, env={"AGENTD_SERVER_PORT": "70000"}))


def test_unreadable_token_file_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\ntoken_file = "missing-token"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(path) in str(caught.value)
    assert "[server] token_file" in str(caught.value)
    assert str(tmp_path / "missing-token") in str(caught.value)


# --------------------------------------------------------------------------- the CLI, in process


@pytest.mark.usefixtures("logging_restored")
def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "[server]\nport = 9123\n")
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: ok" in out
    assert "127.0.0.1:9123" in out
    assert str(tmp_path / "data" / "agentd.db") in out


@pytest.mark.usefixtures("logging_restored")
def test_check_config_names_the_postgresql_store_without_connecting_or_its_password(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[server]\nport = 9125\n")
    # Nothing listens on port 1: check-config does not open the database.
    monkeypatch.setenv("AGENTD_STORE_URL", "postgresql://agentd:hunter2@127.0.0.1:1/agentd")
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ok (database postgresql://agentd:***@127.0.0.1:1/agentd, listening on 127.0.0.1:9125)" in out


@pytest.mark.usefixtures("logging_restored")
def test_check_config_warns_of_sqlite_settings_a_postgresql_store_leaves_unused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[store]\npath = "main.db"\nsynchronous = "full"\n')
    assert main(["check-config", "--config", str(path)]) == 0
    assert "not used" not in capsys.readouterr().err  # on SQLite both are used
    monkeypatch.setenv("AGENTD_STORE_URL", "postgresql://agentd@127.0.0.1:1/agentd")
    assert main(["check-config", "--config", str(path)]) == 0
    err = capsys.readouterr().err
    assert (f"agentd: warning: {path}: [store] path is not used: [store] url puts the data on "
            "PostgreSQL\n") in err
    assert f"{path}: [store] synchronous is not used" in err
    assert "busy_timeout_ms" not in err  # left at its default
    # With memory kept in memory.db, synchronous still serves it.
    monkeypatch.setenv("AGENTD_MEMORY_URL", "sqlite")
    assert main(["check-config", "--config", str(path)]) == 0
    err = capsys.readouterr().err
    assert "[store] path is not used" in err and "synchronous" not in err


@pytest.mark.usefixtures("logging_restored")
def test_check_config_accepts_config_before_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "[server]\nport = 9124\n")
    assert main(["--config", str(path), "check-config"]) == 0
    assert f"{path}: ok" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[server]\nprot = 80\n", "[server] unknown key 'prot'"),
        ("[daemon]\nstall_warning = -1\n", "[daemon] stall_warning: expected a non-negative number"),
        ('[server]\nhost = "0.0.0.0"\n', "is not a loopback address"),
        ('[server]\ntoken_file = "nope.txt"\n', "[server] token_file"),
        ('[llm]\nbase_url = "localhost:11434"\n', "[llm] base_url: expected an http:// or https:// URL"),
        ('[llm]\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "m"\nkey_env = "AGENTD_TEST_NO_SUCH_KEY"\n',
         "[llm] key_env: the environment variable AGENTD_TEST_NO_SUCH_KEY is not set"),
        ('[llm]\nbase_url = "http://127.0.0.1:9/v1"\n', "[llm] model: name the model to ask"),
        ("[llm]\nmax_connections = -1\n", "[llm] max_connections: expected a non-negative number"),
        ("[tasks]\nthreads = 0\n", "[tasks] threads: expected at least 1"),
        ('[mail]\nsender = "agentd"\n', "[mail] sender: expected a mail address, got 'agentd'"),
        ('[mail]\ntimeout = 0\n', "[mail] timeout: expected a positive number of seconds"),
        ('[digests.news]\npattern = "news.*"\nto = "me@example.com"\nevery = "1h"\n',
         "[digests.news] mails its events: set [mail] host"),
        ('[mail]\nhost = "127.0.0.1"\n[digests.news]\npattern = "news.*"\nto = "me@example.com"\n'
         'count = 500\nlimit = 200\n', "[digests.news] count: 500 is more than limit (200)"),
        ('[mail]\nsecurity = "ssl"\n', "[mail] security: expected one of 'starttls', 'tls', 'none'"),
        ('[mail]\npassword_file = "nope.txt"\n', "[mail] password_file: cannot read"),
        ('[memory]\nhttp_key_file = "nope.txt"\n', "[memory] http_key_file: cannot read"),
        ('[memory]\nquantization = "int8"\n', "[memory] quantization: expected one of 'binary', 'none'"),
        ('[llm]\nkey_file = "nope.txt"\n', "[llm] key_file: cannot read"),
        ('[webhooks]\nsecret_file = "nope.txt"\n', "[webhooks] secret_file: cannot read"),
        ('[webhooks]\nsecret = "whsec_not base64"\n', "[webhooks] secret: a secret starting whsec_"),
        ('[webhooks]\nallow_networks = ["intranet"]\n',
         "[webhooks] allow_networks: 'intranet' is not an IP address or network"),
        ('[hooks.ci]\nsecrte = "s"\n', "[hooks.ci] unknown key 'secrte'"),
        ('[hooks.ci]\nschemes = ["github"]\n', "[hooks.ci] needs a secret, secret_file or secret_env"),
        ('[hooks.ci]\nsecret = "s"\nschemes = ["gitlab"]\n',
         "[hooks.ci] schemes: expected a list of standard, github, agentd"),
        ('[hooks.ci]\nsecret = "s"\ntolerance = "5m"\n', "[hooks.ci] tolerance: expected a number"),
        ('[hooks.ci]\nsecret_file = "nope.txt"\n', "[hooks.ci] secret_file: cannot read"),
        ('[hooks.ci]\nsecret = "whsec_!!"\n', "[hooks.ci] secret: a secret starting whsec_"),
        ('[hooks]\ntolerance = 0\n', "[hooks] tolerance: expected a positive number"),
        # Found by review: the second schedule silently replaced the first.
        ('[[schedules]]\nid = "x"\nevery = "1h"\nevent = "a.b"\n'
         '[[schedules]]\nid = "x"\nevery = "2h"\nevent = "a.c"\n',
         "[[schedules]] #2 (x): id 'x' is already schedule #1's"),
        # Found by review: it replaced the built-in purge of finished tasks without a word.
        ('[[schedules]]\nid = "agentd.purge_tasks"\nevery = "1h"\nevent = "a.b"\n',
         "[[schedules]] #1 (agentd.purge_tasks): id: ids starting 'agentd.' are the daemon's own"),
        # Found by review: a `to` of the wrong type was "give at least one address".
        ('[mail]\nhost = "127.0.0.1"\n[digests.news]\npattern = "news.*"\nto = 5\nevery = "1h"\n',
         "[digests.news] to: expected an address or a list of them, got 5"),
        # Found by review: "known: " listed nothing.
        ('[digests]\nnews = "news.*"\n', "[digests] unknown key 'news'; known: [digests.<name>] tables"),
        ('[hooks]\nci = "s"\n',
         "[hooks] unknown key 'ci'; known: replay_window, tolerance, [hooks.<name>] tables"),
        ('[mail]\nhost = "127.0.0.1"\n[digests.news]\npattern = "news.*"\nto = "me@example.com"\n',
         "[digests.news] give every (a duration) or count"),
        ('[mail]\nhost = "127.0.0.1"\n[digests.tokens]\npattern = "chat.token"\nto = "me@example.com"\n'
         'count = 5\n', "[digests.tokens] pattern 'chat.token': its events are ephemeral"),
    ],
)
def test_check_config_bad(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, fragment: str
) -> None:
    path = write(tmp_path, text)
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("agentd: configuration error: ")
    assert str(path) in err
    assert fragment in err
