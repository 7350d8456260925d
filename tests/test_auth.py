"""The edge of a real daemon: the Host check, CORS, header bytes no client should send,
stream tokens that survive restarts but stay read-only and bounded, and private files."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agentd.config import check_serving_rules, load_config
from agentd.errors import ConfigError
from sse_client import Sse
from test_events_api import assert_error, post
from test_ws import Ws

TIMEOUT = 2.0
TOKEN = "t0ken-for-tests"
ALLOWED = "http://app.example"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


async def raw_request(port: int, request: bytes) -> tuple[int, dict[str, Any]]:
    """Send `request` as it is (bytes no client library would send) and read the answer:
    its status and JSON body."""

    async def exchange() -> tuple[int, dict[str, Any]]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            body = await reader.readexactly(length)
        finally:
            writer.close()
        return int(head.split(b" ")[1]), json.loads(body)

    return await asyncio.wait_for(exchange(), TIMEOUT)


def get(path: str, *headers: bytes) -> bytes:
    return b"\r\n".join([f"GET {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", *headers,
                         b"Connection: close", b"", b""])


# --------------------------------------------------------------------------- bad header bytes


async def test_header_bytes_that_do_not_decode_are_refused_not_a_500(start_daemon: Any) -> None:
    daemon, _ = await start_daemon(overrides={"server": {"token": TOKEN}})
    status, body = await raw_request(daemon.port, get("/v1/status", b"Authorization: Bearer \xff"))
    assert status == 401
    assert_error(body, "unauthorized")
    for token in ("%C3%A9.%C3%A9", "%FF.%FF", "%ED%B3%BF.x"):
        status, body = await raw_request(daemon.port, get(f"/v1/stream?token={token}"))
        assert status == 401, token
        assert_error(body, "unauthorized")
    for origin in (b"http://[::1", b"http://\xff"):
        status, body = await raw_request(daemon.port, get("/v1/status", b"Origin: " + origin))
        assert status == 403, origin
        assert_error(body, "origin_not_allowed")


async def test_the_auth_scheme_is_read_in_any_case_the_token_is_not(start_daemon: Any) -> None:
    """Found by review: `Authorization: bearer <token>` was a 401 (schemes are
    case-insensitive, RFC 9110 11.1)."""
    daemon, _ = await start_daemon(overrides={"server": {"token": TOKEN}})
    for scheme in (b"bearer", b"BEARER", b"Bearer"):
        header = b"Authorization: " + scheme + b" " + TOKEN.encode()
        status, _ = await raw_request(daemon.port, get("/v1/task-types", header))
        assert status == 200, scheme
    status, _ = await raw_request(daemon.port, get("/v1/task-types",
                                                   b"Authorization: Bearer " + TOKEN.upper().encode()))
    assert status == 401


# --------------------------------------------------------------------------- Host


async def test_a_host_that_is_not_ours_is_a_421_before_auth(start_daemon: Any, http: Any) -> None:
    """DNS rebinding: a page at http://rebound.example:<port> whose name now resolves to
    127.0.0.1 makes same-origin requests (no Origin header) that name it in Host."""
    daemon, _ = await start_daemon(overrides={"server": {"token": TOKEN}})
    client = http(daemon, token=TOKEN)
    for host in ("rebound.example", f"rebound.example:{daemon.port}", "127.0.0.1.nip.io",
                 "localhost.rebound.example", "[::1", "127.0.0.1:port", "a@127.0.0.1", ""):
        async with client.get("/v1/status", headers={"Host": host}) as response:
            assert response.status == 421, host
            message = assert_error(await response.json(), "host_not_allowed")
            assert repr(host) in message and "[server] allowed_hosts" in message
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/v1/ws", headers={"Host": "rebound.example"})
    assert refused.value.status == 421
    for host in ("localhost", f"localhost:{daemon.port}", "LocalHost.", "localhost.:1",
                 "127.0.0.1", "127.0.0.2:80", "[::1]", f"[::1]:{daemon.port}"):
        async with client.get("/v1/status", headers={"Host": host}) as response:
            assert response.status == 200, host


async def test_allowed_hosts_adds_names(start_daemon: Any, http: Any) -> None:
    daemon, _ = await start_daemon(overrides={"server": {"allowed_hosts": ["agentd.lan", "[fd00::7]"]}})
    client = http(daemon)
    for host in ("agentd.lan", "AGENTD.LAN.:8470", "[fd00::7]:80"):
        async with client.get("/v1/status", headers={"Host": host}) as response:
            assert response.status == 200, host
    async with client.get("/v1/status", headers={"Host": "other.lan"}) as response:
        assert response.status == 421


def test_allowed_hosts_entries_are_checked() -> None:
    for entry in ("http://agentd.lan", "agentd.lan:8470", "abc.de:80", "agentd.lan/x", "[::1]:80", ""):
        with pytest.raises(ConfigError, match=r"\[server\] allowed_hosts"):
            check_serving_rules(load_config(None, overrides={"server": {"allowed_hosts": [entry]}}, env={}))
    good = ["*", "::1", "[fd00::7]", "a.b", "agentd.lan."]
    check_serving_rules(load_config(None, overrides={"server": {"allowed_hosts": good, "token": TOKEN}},
                                    env={}))
    # Found by review: "*" without a token left nothing to keep a rebound page (DNS rebinding) out.
    with pytest.raises(ConfigError, match=r"allowed_hosts = \[\"\*\"\] lets a web page"):
        check_serving_rules(load_config(None, overrides={"server": {"allowed_hosts": ["*"]}}, env={}))


def test_allowed_origins_entries_are_origins_and_star_needs_a_token() -> None:
    """Found by review: entries that can never equal a browser's Origin started silently,
    and `"*"` without a token let every web page drive the API."""
    for entry in ("app.example.com", "https://App.example.com", "https://app.example.com/app",
                  "null", "//app.example.com", ""):
        with pytest.raises(ConfigError, match=r"\[server\] allowed_origins: expected origins"):
            check_serving_rules(load_config(None, overrides={"server": {"allowed_origins": [entry]}}, env={}))
    with pytest.raises(ConfigError, match=r"allowed_origins = \[\"\*\"\] lets every web page"):
        check_serving_rules(load_config(None, overrides={"server": {"allowed_origins": ["*"]}}, env={}))
    good = ["https://app.example.com", "http://localhost:3000/", "http://[::1]:8080", "http://10.0.0.7",
            "chrome-extension://abcdefghijklmnopabcdefghijklmnop"]
    check_serving_rules(load_config(None, overrides={"server": {"allowed_origins": good}}, env={}))
    check_serving_rules(load_config(None, overrides={"server": {"allowed_origins": ["*"], "token": TOKEN}},
                                    env={}))


# --------------------------------------------------------------------------- CORS


async def test_listed_origins_get_cors_and_their_preflights_need_no_token(
    start_daemon: Any, http: Any,
) -> None:
    daemon, _ = await start_daemon(overrides={"server": {"token": TOKEN, "allowed_origins": [ALLOWED]}})
    anonymous = http(daemon)
    preflight = {"Origin": ALLOWED, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    async with anonymous.options("/v1/events", headers=preflight) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert "Origin" in response.headers.getall("Vary")
        assert "POST" in response.headers["Access-Control-Allow-Methods"]
        allowed_headers = response.headers["Access-Control-Allow-Headers"]
        assert {"Authorization", "Content-Type", "Last-Event-ID"} <= set(allowed_headers.split(", "))
        assert int(response.headers["Access-Control-Max-Age"]) > 0
        assert "Access-Control-Allow-Credentials" not in response.headers
    # Answers, errors included, name the origin (never "*"), so the page can read them.
    status, _ = await post(http(daemon, token=TOKEN), "/v1/events", headers={"Origin": ALLOWED},
                           json={"topic": "from.page"})
    assert status == 202
    async with anonymous.get("/v1/status", headers={"Origin": ALLOWED}) as response:
        assert response.status == 401
        assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    async with anonymous.get("/v1/stream", headers={**BEARER, "Origin": ALLOWED}) as response:
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    # A loopback origin passes the Origin check but gets no CORS unless listed; a foreign
    # origin's preflight is refused.
    for origin, status in (("http://localhost:3000", 401), ("http://evil.example", 403)):
        async with anonymous.options("/v1/events", headers={**preflight, "Origin": origin}) as response:
            assert response.status == status, origin
            assert "Access-Control-Allow-Origin" not in response.headers


# --------------------------------------------------------------------------- stream tokens


async def issue(daemon: Any, http: Any, **scope: str) -> dict[str, Any]:
    status, issued = await post(http(daemon, token=TOKEN), "/v1/stream-tokens", json=scope or None)
    assert status == 201, issued
    return dict(issued)


async def stream_status(daemon: Any, http: Any, path: str, token: str, **headers: str) -> tuple[int, str]:
    async with http(daemon).get(path, params={"token": token}, headers=headers) as response:
        if response.status == 200:
            return 200, ""
        return response.status, assert_error(await response.json(), "unauthorized")


@pytest.mark.both_stores  # the key is in the store's meta table
async def test_a_stream_token_survives_a_restart_until_revoked(
    start_daemon: Any, http: Any, tmp_path: Path,
) -> None:
    overrides = {"server": {"token": TOKEN}}
    first, _ = await start_daemon(overrides=overrides)
    token = (await issue(first, http))["token"]
    await first.stop()
    second, _ = await start_daemon(overrides=overrides)
    assert (await stream_status(second, http, "/v1/stream", token))[0] == 200
    async with http(second, token=TOKEN).delete("/v1/stream-tokens") as response:
        assert response.status == 204
    status, message = await stream_status(second, http, "/v1/stream", token, **{"Last-Event-ID": "1"})
    assert status == 401 and "revoked" in message
    assert (await stream_status(second, http, "/v1/stream", (await issue(second, http))["token"]))[0] == 200


@pytest.mark.both_stores  # the key is in the store's meta table
async def test_past_token_ttl_a_token_only_resumes_until_token_resume_ttl(
    start_daemon: Any, http: Any,
) -> None:
    daemon, _ = await start_daemon(overrides={"server": {"token": TOKEN},
                                              "streams": {"token_ttl": 0, "token_resume_ttl": 3600}})
    issued = await issue(daemon, http)
    assert issued["open_until"] <= issued["expires_at"] - 3599
    status, message = await stream_status(daemon, http, "/v1/stream", issued["token"])
    assert status == 401 and "token_ttl" in message
    resuming = {"Last-Event-ID": "5"}
    assert (await stream_status(daemon, http, "/v1/stream", issued["token"], **resuming))[0] == 200
    await daemon.stop()
    ended, _ = await start_daemon(overrides={"server": {"token": TOKEN},
                                             "streams": {"token_ttl": 0, "token_resume_ttl": 0}})
    status, message = await stream_status(ended, http, "/v1/stream", issued["token"], **resuming)
    assert status == 401 and "token_resume_ttl" in message


async def test_a_quiet_stream_resumes_from_where_it_was_opened(start_daemon: Any, http: Any) -> None:
    """A browser's stream (it sends Fetch Metadata) opens with an id (of no event), so a
    stream that saw no event yet still reconnects with Last-Event-ID, and gets what was
    published while it was away."""
    daemon, _ = await start_daemon()
    client = http(daemon)
    browser = {"Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty"}
    async with client.get("/v1/stream", params={"topics": "away.*"}, headers=browser) as response:
        resume_from = (await Sse(response, browser=True).opened()).id
    published = await daemon.publish_durably("away.news", {})
    async with client.get("/v1/stream", params={"topics": "away.*"},
                          headers={**browser, "Last-Event-ID": str(resume_from)}) as response:
        sse = Sse(response, browser=True)
        assert (await sse.opened()).id == resume_from
        assert (await sse.next_event()).id == published.id


async def test_a_library_s_stream_opens_without_an_id_or_a_blank_line(
    start_daemon: Any, http: Any,
) -> None:
    """Without Fetch Metadata or a stream token the stream is an HTTP library's: no blank
    line that libraries such as httpx-sse would report as an empty event."""
    daemon, _ = await start_daemon()
    async with http(daemon).get("/v1/stream", params={"topics": "away.*"}) as response:
        sse = Sse(response)
        assert (await sse.opened()).id is None
        published = await daemon.publish_durably("away.news", {})
        assert (await sse.next_event()).id == published.id


@pytest.mark.both_stores  # the key is in the store's meta table
async def test_a_stream_token_is_bound_to_the_route_and_topics_it_was_issued_for(
    start_daemon: Any, http: Any,
) -> None:
    daemon, _ = await start_daemon(overrides={"server": {"token": TOKEN}})
    issued = await issue(daemon, http, path="/v1/stream", topics="task.*, order.**")
    assert (issued["path"], issued["topics"]) == ("/v1/stream", "task.*,order.**")
    token = issued["token"]
    assert (await stream_status(daemon, http, "/v1/stream?topics=task.*,order.**", token))[0] == 200
    for path in ("/v1/stream", "/v1/stream?topics=**", "/v1/ws", "/v1/tasks/1/stream"):
        status, message = await stream_status(daemon, http, path, token)
        assert status == 401 and "issued for" in message, path
    task_token = (await issue(daemon, http, path="/v1/tasks/7/stream"))["token"]
    status, message = await stream_status(daemon, http, "/v1/tasks/8/stream", task_token)
    assert status == 401 and "/v1/tasks/7/stream" in message
    client = http(daemon, token=TOKEN)
    for scope in ({"path": "/v1/status"}, {"path": "/v1/tasks/x/stream"}, {"topics": "a.*"},
                  {"path": "/v1/ws", "topics": "a.*"}, {"path": 7}, {"scope": "all"}):
        status, body = await post(client, "/v1/stream-tokens", json=scope)
        assert status == 400, scope
        assert_error(body, "bad_request")


@pytest.mark.both_stores  # the key is in the store's meta table
async def test_a_stream_token_on_the_websocket_only_reads(start_daemon: Any, http: Any) -> None:
    daemon, events = await start_daemon(overrides={"server": {"token": TOKEN}})
    token = (await issue(daemon, http, path="/v1/ws"))["token"]
    ws = Ws(await http(daemon).ws_connect("/v1/ws", params={"token": token}))
    assert (await ws.request(type="subscribe", patterns=["read.*"]))["ok"] is True
    for request in ({"type": "publish", "topic": "written.by.token"},
                    {"type": "submit", "name": "agentd.maintain_store"},
                    {"type": "cancel", "task_id": 1}):
        reply = await ws.request(**request)
        assert reply["ok"] is False, request
        assert reply["error"]["code"] == "read_only"
        assert "bearer token" in reply["error"]["message"]
    assert (await ws.request(type="ping"))["type"] == "pong"
    daemon.bus.publish("read.me", {})
    assert (await ws.event())["event"]["topic"] == "read.me"
    await ws.ws.close()
    assert "written.by.token" not in events.topics()
    # The bearer token's socket still writes.
    bearer = Ws(await http(daemon, token=TOKEN).ws_connect("/v1/ws"))
    assert (await bearer.request(type="publish", topic="written.by.bearer"))["ok"] is True
    await bearer.ws.close()


# --------------------------------------------------------------------------- files and tokens


@pytest.fixture
def open_umask() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.mark.usefixtures("open_umask")
async def test_the_data_directory_and_its_files_are_private(start_daemon: Any, tmp_path: Path) -> None:
    daemon, _ = await start_daemon()
    await daemon.publish_durably("some.event", {})
    await daemon.eventlog.flush()
    data = tmp_path / "data"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    files = sorted(data.iterdir())
    assert {f.name for f in files} >= {"agentd.db", "agentd.db-wal", "agentd.db-shm", "agentd.db.lock",
                                       "memory.db", "memory.db-wal"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_a_token_file_open_to_others_or_empty_is_refused(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")

    def token() -> str:  # the token file is read, and checked, when the configuration loads
        config = load_config(None, overrides={"server": {"token_file": str(token_file)}}, env={})
        return config.secrets.api_token

    for mode in (0o644, 0o640, 0o604):
        token_file.chmod(mode)
        with pytest.raises(ConfigError, match=rf"\[server\] token_file: .* \(mode 0{mode:o}\); chmod 600"):
            token()
    token_file.chmod(0o600)
    assert token() == TOKEN
    if os.geteuid() == 0:
        # Handed over by another user through the group, as systemd/README.md installs
        # secrets: group-readable is fine, world-readable is not.
        os.chown(token_file, 65534, os.getegid())
        token_file.chmod(0o640)
        assert token() == TOKEN
        token_file.chmod(0o644)
        with pytest.raises(ConfigError, match=r"\(mode 0644\)"):
            token()
        token_file.chmod(0o600)
    token_file.write_text("\n" + TOKEN)
    with pytest.raises(ConfigError, match=r"\[server\] token_file: the first line .* is empty"):
        token()
    # Found by review: a token file's unsendable token was blamed on [server] token.
    token_file.write_text("two words\n")
    with pytest.raises(ConfigError, match=r"\[server\] token_file: expected visible ASCII characters "
                       r"without spaces in the first line of .*token \("):
        token()


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
@pytest.mark.parametrize("token", [" ", "\t", "two words", "tökén"])
def test_a_blank_or_unsendable_token_is_refused(token: str, host: str) -> None:
    with pytest.raises(ConfigError, match=r"environment AGENTD_SERVER_TOKEN: \[server\] token: expected"):
        load_config(None, env={"AGENTD_SERVER_TOKEN": token, "AGENTD_SERVER_HOST": host})
