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

from agentd.config import SECRET_FILE_LIMIT, load_config
from agentd.errors import ConfigError

TOKEN = "t0ken-for-secrets"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agentd.toml"
    path.write_text(text)
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
