"""Secrets are read once, when the configuration loads: an unreadable one stops the load,
naming the file and the key, and no request reads a secret's file again."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from pathlib import Path
from typing import Any

import pytest

from agentd.config import load_config
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
    for name, why in (("a-directory", "Is a directory"), ("binary", "not text")):
        with pytest.raises(ConfigError) as caught:
            load_config(write(tmp_path, table.format(file=name)), env={})
        assert f"{key}: cannot read {tmp_path / name}: " in str(caught.value)
        assert why in str(caught.value)


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
