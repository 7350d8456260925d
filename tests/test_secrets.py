"""Secrets are read once, when the configuration loads: an unreadable one stops the load,
naming the file and the key, and no request reads a secret's file again."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agentd.config import SECRET_FILE_LIMIT, load_client_config, load_config
from agentd.errors import ConfigError

TOKEN = "t0ken-for-secrets"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agentd.toml"
    path.write_text(text)
    path.chmod(0o600)  # as a file giving a secret inline must be
    return path


# Every key naming a secret's file: its table, and the key as the error names it.
SECRET_FILES = [
    ("[server]\ntoken_file = {file!r}\n", "[server] token_file"),
    ("[mail]\npassword_file = {file!r}\n", "[mail] password_file"),
    ("[llm]\nkey_file = {file!r}\n", "[llm] key_file"),
    ("[webhooks]\nsecret_file = {file!r}\n", "[webhooks] secret_file"),
    ("[memory]\nhttp_key_file = {file!r}\n", "[memory] http_key_file"),
    ("[hooks.ci]\nsecret_file = {file!r}\n", "[hooks.ci] secret_file"),
]


@pytest.mark.parametrize(("table", "key"), SECRET_FILES)
def test_a_missing_secret_file_fails_the_load_naming_the_file_and_the_key(
    tmp_path: Path, table: str, key: str
) -> None:
    path = write(tmp_path, table.format(file="secrets/missing"))
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    message = str(caught.value)
    assert message.startswith(f"{path}: {key}: cannot read {tmp_path / 'secrets' / 'missing'}: ")
    assert "No such file or directory" in message


@pytest.mark.parametrize(("table", "key"), SECRET_FILES)
def test_a_secret_file_that_is_no_text_file_fails_the_load(tmp_path: Path, table: str, key: str) -> None:
    (tmp_path / "a-directory").mkdir()
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00secret\n")
    (tmp_path / "binary").chmod(0o600)
    for name, why in (("a-directory", "not a regular file (a directory)"), ("binary", "not text")):
        with pytest.raises(ConfigError) as caught:
            load_config(write(tmp_path, table.format(file=name)), env={})
        assert f"{key}: cannot read {tmp_path / name}: " in str(caught.value)
        assert why in str(caught.value)


@pytest.mark.parametrize(("table", "key"), SECRET_FILES)
def test_a_secret_file_that_is_a_fifo_fails_the_load_without_waiting_for_a_writer(
    tmp_path: Path, table: str, key: str
) -> None:
    """Found by review: the file was read with read_text(), which for a FIFO waits for a
    writer, so `agentd check-config` (and the start) hung for good on a secret path that
    named one. A secret file must be a regular file; the open does not wait."""
    fifo = tmp_path / "secret-fifo"
    os.mkfifo(fifo, 0o600)
    path = write(tmp_path, table.format(file=fifo.name))
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            load_config(path, env={})
            outcome.append(None)
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    loader.join(10)
    if loader.is_alive():  # let the blocked open go (with a writer), then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("load_config waited on the FIFO for a writer")
    assert isinstance(outcome[0], ConfigError)
    assert f"{key}: cannot read {fifo}: not a regular file (a FIFO)" in str(outcome[0])


@pytest.mark.parametrize(("table", "key"), SECRET_FILES)
def test_a_device_or_an_oversized_file_is_refused_without_reading_it_into_memory(
    tmp_path: Path, table: str, key: str
) -> None:
    """Found by review: the whole file was read to take its first line, so /dev/zero (or a
    large file named by mistake) was read into memory without end. Files are read up to
    a bound, and only regular ones."""
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: cannot read /dev/zero: not a regular "
                       r"file \(a character device\)"):
        load_config(write(tmp_path, table.format(file="/dev/zero")), env={})
    big = tmp_path / "big"
    with big.open("wb") as file:
        file.write(b"secret\n")
        file.truncate(SECRET_FILE_LIMIT + 1)  # sparse: no disk is spent on it
    big.chmod(0o600)
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: {big} is larger than {SECRET_FILE_LIMIT}"):
        load_config(write(tmp_path, table.format(file=big.name)), env={})


@pytest.mark.parametrize(("table", "key"), SECRET_FILES)
def test_every_secret_file_that_is_empty_or_open_to_others_is_refused(
    tmp_path: Path, table: str, key: str
) -> None:
    """Found by review: only the token file was checked. An empty hook secret file gave
    the hook the secret '', a key anyone can sign with; a world-readable SMTP password
    file was taken as it was. Every secret file is now held to the token file's rules."""
    secret = tmp_path / "secret"
    path = write(tmp_path, table.format(file=secret.name))
    for text in ("", "\n", "  \r\nsecond line\n"):
        secret.write_text(text)
        secret.chmod(0o600)
        with pytest.raises(ConfigError, match=rf"{re.escape(key)}: the first line of {secret} is empty"):
            load_config(path, env={})
    secret.write_text("s3cret\n")
    for mode in (0o644, 0o640, 0o604, 0o660):
        secret.chmod(mode)
        with pytest.raises(ConfigError, match=rf"{re.escape(key)}: {secret} is open to other users "
                           rf"\(mode 0{mode:o}\); chmod 600"):
            load_config(path, env={})


@pytest.mark.parametrize(("table", "key"), SECRET_FILES)
def test_a_secret_file_may_end_in_crlf_and_be_a_symlink(tmp_path: Path, table: str, key: str) -> None:
    """Its first line without the line end is the secret; a symlink (as Kubernetes mounts
    secrets) is followed, and the file it names is checked."""
    target = tmp_path / "real-secret"
    target.write_bytes(b"s3cret\r\n# rotated by ops\r\n")
    target.chmod(0o600)
    (tmp_path / "link").symlink_to(target)
    config = load_config(write(tmp_path, table.format(file="link")), env={})
    read = {config.secrets.api_token, config.secrets.mail_password, config.secrets.llm_key,
            config.secrets.webhooks_secret, config.secrets.memory_http_key}
    if "ci" in config.hooks.settings:
        read.add(config.hooks.settings["ci"].secret)
    assert read == {"", "s3cret"}


def test_a_secret_file_named_in_the_environment_is_blamed_on_its_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^environment AGENTD_MAIL_PASSWORD_FILE: \[mail\] "
                       r"password_file: cannot read .*nope"):
        load_config(write(tmp_path, ""), env={"AGENTD_MAIL_PASSWORD_FILE": "nope"})


def test_secrets_are_read_into_the_configuration_and_kept_out_of_its_repr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, text in (("token", f"{TOKEN}\n"), ("mail", "mail-pw\n# a comment\n"), ("hook", "hook-s\n")):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o600)
    monkeypatch.setenv("SECRETS_TEST_LLM_KEY", "llm-key")
    config = load_config(write(tmp_path, (
        '[server]\ntoken_file = "token"\n[mail]\npassword_file = "mail"\n'
        '[llm]\nkey_env = "SECRETS_TEST_LLM_KEY"\n[webhooks]\nsecret = "out-s"\n'
        '[memory]\nhttp_key_env = "SECRETS_TEST_LLM_KEY"\n[hooks.ci]\nsecret_file = "hook"\n')), env={})
    # Gone after the load: nothing reads them again.
    for name in ("token", "mail", "hook"):
        (tmp_path / name).unlink()
    monkeypatch.delenv("SECRETS_TEST_LLM_KEY")
    secrets = config.secrets
    assert (secrets.api_token, secrets.mail_password, secrets.llm_key, secrets.webhooks_secret,
            secrets.memory_http_key) == (TOKEN, "mail-pw", "llm-key", "out-s", "llm-key")
    assert config.hooks.settings["ci"].secret == "hook-s"
    shown = repr(config)
    assert not any(secret in shown for secret in (TOKEN, "mail-pw", "llm-key", "out-s", "hook-s"))


def signed(body: bytes, secret: str) -> dict[str, str]:
    """Standard Webhooks headers for `body`, computed here from the specification."""
    webhook_id, timestamp = f"msg_{time.monotonic_ns()}", int(time.time())
    mac = hmac.new(secret.encode(), f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return {"webhook-id": webhook_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": "v1," + base64.b64encode(mac.digest()).decode()}


async def test_requests_are_checked_against_the_secrets_read_at_start_not_the_files(
    start_daemon: Any, http: Any, tmp_path: Path
) -> None:
    """A secret's file is read when the configuration loads, never per request (a read in a
    handler blocks the loop, and made a file gone since the start a 500): requests are
    checked as before once the files are deleted."""
    token_file, hook_file = tmp_path / "token", tmp_path / "hook-secret"
    token_file.write_text(f"{TOKEN}\n")
    token_file.chmod(0o600)
    hook_file.write_text("hook-secret\n")
    hook_file.chmod(0o600)
    daemon, events = await start_daemon(overrides={
        "server": {"token_file": str(token_file)}, "hooks": {"ci": {"secret_file": str(hook_file)}}})
    token_file.unlink()
    hook_file.unlink()
    async with http(daemon, token=TOKEN).get("/v1/status") as response:
        assert response.status == 200
    async with http(daemon, token="not-the-token").get("/v1/status") as response:
        assert response.status == 401
    async with http(daemon).get("/v1/openapi.json") as response:
        assert response.status == 200
    raw = b'{"build": 7}'
    async with http(daemon).post("/hooks/ci", data=raw, headers=signed(raw, "hook-secret")) as response:
        assert response.status == 202
    assert (await events.wait_for("hook.ci")).data["body"] == {"build": 7}
    async with http(daemon).post("/hooks/ci", data=raw, headers=signed(raw, "other")) as response:
        assert response.status == 401


@pytest.mark.parametrize("table", ["[server]\ntoken = {value}\n", "[webhooks]\nsecret = {value}\n",
                                   "[hooks.ci]\nsecret = {value}\n"])
def test_an_inline_secret_of_the_wrong_type_is_refused_without_showing_it(tmp_path: Path, table: str) -> None:
    """Found by review: `secret = 98765432` (a number, without quotes) was refused with
    "expected a string, got 98765432", printing the secret to the terminal and the log."""
    for value in ("98765432", '["98765432"]', "98765432.5"):
        with pytest.raises(ConfigError, match="expected a string") as caught:
            load_config(write(tmp_path, table.format(value=value)), env={})
        assert "98765432" not in str(caught.value)
        assert "not shown: it is a secret" in str(caught.value)


@pytest.mark.parametrize(("table", "key"), [
    ('[hooks.ci]\nsecret_file = "s"\n', "[hooks.ci] secret_file (the first line of {file})"),
    ('[webhooks]\nsecret_file = "s"\n', "[webhooks] secret_file (the first line of {file})"),
    ('[hooks.ci]\nsecret_env = "SECRETS_TEST_WHSEC"\n',
     "[hooks.ci] secret_env (the environment variable SECRETS_TEST_WHSEC)"),
])
def test_a_whsec_secret_that_is_not_base64_fails_the_load_naming_where_it_was_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, table: str, key: str
) -> None:
    """Found by review: a `whsec_` secret that is no key was refused only when the daemon
    was built, as "[hooks.ci] secret", though it came from a file or a variable; load_config
    returned it as checked."""
    (tmp_path / "s").write_text("whsec_not-base64!\n")
    (tmp_path / "s").chmod(0o600)
    monkeypatch.setenv("SECRETS_TEST_WHSEC", "whsec_not-base64!")
    path = write(tmp_path, table)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value) == (f"{path}: {key.format(file=tmp_path / 's')}: "
                                 "a secret starting whsec_ must go on with its key in base64")


def test_a_secret_variable_set_but_empty_is_called_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: an empty variable was reported as "not set", sending the operator
    looking for a variable that is there."""
    monkeypatch.setenv("SECRETS_TEST_EMPTY", "")
    with pytest.raises(ConfigError, match=r"\[hooks\.ci\] secret_env: the environment variable "
                       r"SECRETS_TEST_EMPTY is empty$"):
        load_config(write(tmp_path, '[hooks.ci]\nsecret_env = "SECRETS_TEST_EMPTY"\n'), env={})
    monkeypatch.delenv("SECRETS_TEST_EMPTY")
    with pytest.raises(ConfigError, match=r"SECRETS_TEST_EMPTY is not set$"):
        load_config(write(tmp_path, '[hooks.ci]\nsecret_env = "SECRETS_TEST_EMPTY"\n'), env={})


# Every secret given two ways (or three): its table, and the keys as the error names them.
TWO_WAYS = [
    ('[server]\ntoken = "inline-token"\ntoken_file = "s"\n', "[server] token and token_file are both set"),
    ('[mail]\npassword_file = "s"\npassword_env = "SECRETS_TEST_SET"\n',
     "[mail] password_file and password_env are both set"),
    ('[llm]\nkey_file = "s"\nkey_env = "SECRETS_TEST_SET"\n', "[llm] key_file and key_env are both set"),
    ('[webhooks]\nsecret = "inline"\nsecret_file = "s"\n', "[webhooks] secret and secret_file are both set"),
    ('[memory]\nhttp_key_file = "s"\nhttp_key_env = "SECRETS_TEST_SET"\n',
     "[memory] http_key_file and http_key_env are both set"),
    ('[hooks.ci]\nsecret = "inline"\nsecret_file = "s"\n', "[hooks.ci] secret and secret_file are both set"),
    ('[hooks.ci]\nsecret = "inline"\nsecret_env = "SECRETS_TEST_SET"\n',
     "[hooks.ci] secret and secret_env are both set"),
    ('[hooks.ci]\nsecret_file = "s"\nsecret_env = "SECRETS_TEST_SET"\n',
     "[hooks.ci] secret_file and secret_env are both set"),
    ('[hooks.ci]\nsecret = "inline"\nsecret_file = "s"\nsecret_env = "SECRETS_TEST_SET"\n',
     "[hooks.ci] secret and secret_file and secret_env are all set"),
]


@pytest.mark.parametrize(("table", "keys"), TWO_WAYS)
def test_a_secret_given_two_ways_is_refused_naming_the_file_and_the_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, table: str, keys: str
) -> None:
    """Found by review: the inline secret won (then the file, then the variable) without a
    word, and the others were not even checked, so an operator who moved a token into a
    file kept the old one in force. Which one was meant cannot be told: refused."""
    (tmp_path / "s").write_text("from-the-file\n")
    (tmp_path / "s").chmod(0o600)
    monkeypatch.setenv("SECRETS_TEST_SET", "from-the-variable")
    path = write(tmp_path, table)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value) == f"{path}: {keys}; give one of them"


def test_a_secret_given_by_an_override_and_in_the_file_names_both_origins(tmp_path: Path) -> None:
    """An AGENTD_* variable giving the inline token next to the file's token_file is refused
    too, blaming both; the client commands, which read only the token, refuse it alike."""
    (tmp_path / "s").write_text("from-the-file\n")
    (tmp_path / "s").chmod(0o600)
    path = write(tmp_path, '[server]\ntoken_file = "s"\n')
    expected = (f"environment AGENTD_SERVER_TOKEN and {path}: [server] token and token_file are both set; "
                "give one of them")
    for load in (load_config, load_client_config):
        with pytest.raises(ConfigError) as caught:
            load(path, env={"AGENTD_SERVER_TOKEN": "from-the-environment"})
        assert str(caught.value) == expected
    # Emptied by a variable, the file's key is no longer given: the override is the token.
    config = load_config(path, env={"AGENTD_SERVER_TOKEN": "from-env", "AGENTD_SERVER_TOKEN_FILE": ""})
    assert config.secrets.api_token == "from-env"


# Every key naming a secret's environment variable: its table, and the key as the error names it.
SECRET_ENVS = [
    ('[mail]\npassword_env = "SECRETS_TEST_PADDED"\n', "[mail] password_env"),
    ('[llm]\nkey_env = "SECRETS_TEST_PADDED"\n', "[llm] key_env"),
    ('[memory]\nhttp_key_env = "SECRETS_TEST_PADDED"\n', "[memory] http_key_env"),
    ('[hooks.ci]\nsecret_env = "SECRETS_TEST_PADDED"\n', "[hooks.ci] secret_env"),
]
PADDED = " s3cret", "s3cret ", "s3cret\n", "\ts3cret", "s3cret\r\n"
REFUSED = ("expected a secret without whitespace at either end, but {what} begins or ends with a space, "
           "tab or line break")


@pytest.mark.parametrize(("table", "key"), SECRET_ENVS)
def test_a_secret_variable_with_whitespace_at_either_end_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, table: str, key: str
) -> None:
    """Found by review: a variable's secret kept its whitespace (a file's was stripped), so
    the newline `kubectl create secret --from-file` leaves in a variable became part of the
    secret, and every signature then failed as a 401 nobody could explain."""
    path = write(tmp_path, table)
    for value in PADDED:
        monkeypatch.setenv("SECRETS_TEST_PADDED", value)
        with pytest.raises(ConfigError) as caught:
            load_config(path, env={})
        assert str(caught.value) == (f"{path}: {key}: "
                                     + REFUSED.format(what="the environment variable SECRETS_TEST_PADDED")
                                     + "; remove it")
    monkeypatch.setenv("SECRETS_TEST_PADDED", "s3 cr\tet")  # inside a secret, whitespace is kept
    config = load_config(path, env={})
    read = {config.secrets.mail_password, config.secrets.llm_key, config.secrets.memory_http_key,
            *(hook.secret for hook in config.hooks.settings.values())}
    assert "s3 cr\tet" in read


@pytest.mark.parametrize(("table", "key"), SECRET_FILES)
def test_a_secret_file_whose_first_line_has_whitespace_at_either_end_is_refused(
    tmp_path: Path, table: str, key: str
) -> None:
    """Found by review: the first line was stripped of all whitespace, where the variable's
    secret kept it. Its line end (LF or CRLF) is still no part of it; any other whitespace
    at the ends is refused, as in a variable."""
    secret = tmp_path / "secret"
    path = write(tmp_path, table.format(file=secret.name))
    for text in ("  s3cret\n", "s3cret \n", "s3cret\t\r\nsecond line\n"):
        secret.write_text(text)
        secret.chmod(0o600)
        with pytest.raises(ConfigError) as caught:
            load_config(path, env={})
        assert str(caught.value) == (f"{path}: {key}: " + REFUSED.format(what=f"the first line of {secret}")
                                     + "; remove it")


@pytest.mark.parametrize(("table", "key"), [('[server]\ntoken = "{value}"\n', "[server] token"),
                                            ('[webhooks]\nsecret = "{value}"\n', "[webhooks] secret"),
                                            ('[hooks.ci]\nsecret = "{value}"\n', "[hooks.ci] secret")])
def test_an_inline_secret_with_whitespace_at_either_end_is_refused_without_showing_it(
    tmp_path: Path, table: str, key: str
) -> None:
    for value in (" s3cret", "s3cret\\n", "s3cret\\t"):
        path = write(tmp_path, table.format(value=value))
        with pytest.raises(ConfigError) as caught:
            load_config(path, env={})
        assert str(caught.value) == f"{path}: {key}: " + REFUSED.format(what="its value") + "; remove it"


INLINE = [('[server]\ntoken = "inline-token"\n', "[server] token"),
          ('[webhooks]\nsecret = "inline"\n', "[webhooks] secret"),
          ('[hooks.ci]\nsecret = "inline"\n', "[hooks.ci] secret"),
          ('[store]\nurl = "postgresql://agentd:pw@db.internal/agentd"\n', "[store] url's password"),
          ('[memory]\nurl = "postgresql://agentd:pw@db.internal/memory"\n', "[memory] url's password")]


@pytest.mark.parametrize(("table", "key"), INLINE)
def test_a_file_giving_a_secret_inline_must_not_be_open_to_others(
    tmp_path: Path, table: str, key: str
) -> None:
    """Found by review: a secret file open to others was refused, but the same secret
    written inline in an agentd.toml anyone could read was taken. The file giving it is
    held to a secret file's rules: 0600, or 0640 when another user (root) hands it to the
    daemon's group, as systemd/README.md installs it."""
    path = write(tmp_path, table)
    for mode in (0o644, 0o640, 0o604, 0o620):
        path.chmod(mode)
        with pytest.raises(ConfigError) as caught:
            load_config(path, env={})
        assert str(caught.value) == (
            f"{path}: {key} given in a file open to other users (mode 0{mode:o}); chmod 600 {path} (or "
            "640, owned by root, group of the daemon's user), or give the secret by its *_file or *_env key "
            "instead" + ("; a PostgreSQL password by PGPASSWORD or ~/.pgpass, or the whole URL by "
                         f"AGENTD_{key[1:].split(']', maxsplit=1)[0].upper()}_URL"
                         if key.endswith("url's password") else ""))
        if key == "[server] token":  # a client reads the token from the same file
            with pytest.raises(ConfigError, match="given in a file open to other users"):
                load_client_config(path, env={})
    path.chmod(0o600)
    load_config(path, env={})
    if os.geteuid() == 0:
        os.chown(path, 65534, os.getegid())
        path.chmod(0o640)
        load_config(path, env={})
        path.chmod(0o644)
        with pytest.raises(ConfigError, match=r"\(mode 0644\)"):
            load_config(path, env={})


def test_a_file_open_to_others_is_fine_without_inline_secrets(tmp_path: Path) -> None:
    """The shipped agentd.toml (0644 after a clone) gives no secret inline (its `token` and
    `secret` are empty) and loads as it is; so does a file whose secrets come from files,
    variables or AGENTD_* overrides, which are not written in it."""
    shipped = tmp_path / "agentd.toml"
    shipped.write_text((Path(__file__).parent.parent / "agentd.toml").read_text())
    shipped.chmod(0o644)
    load_config(shipped, env={})
    config = load_config(shipped, env={"AGENTD_SERVER_TOKEN": TOKEN})
    # A store URL without a password (PGPASSWORD, ~/.pgpass or peer authentication) is no secret.
    without = tmp_path / "url.toml"
    without.write_text('[store]\nurl = "postgresql://agentd@db.internal:5432/agentd"\n')
    without.chmod(0o644)
    assert load_config(without, env={}).store.url == "postgresql://agentd@db.internal:5432/agentd"
    assert config.secrets.api_token == TOKEN
    (tmp_path / "s").write_text("from-the-file\n")
    (tmp_path / "s").chmod(0o600)
    shipped.write_text('[server]\ntoken_file = "s"\n[hooks.ci]\nsecret_file = "s"\n')
    assert load_config(shipped, env={}).secrets.api_token == "from-the-file"
