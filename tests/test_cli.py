"""The `agentd` command as its users meet it: the top-level help, and output into a pipe
whose reader has gone away."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agentd.cli import EXIT_BROKEN_PIPE, EXIT_USAGE, main

TIMEOUT = 30.0


def test_the_top_level_help_speaks_to_users(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: agentd ")
    assert "agentd runs AI agents and their background work" in out
    assert "parse arguments" not in out  # the module docstring is for developers
    commands = {"run": "run the daemon in the foreground",
                "check-config": "build what `run` would",
                "status": "ask the running daemon how it is",
                "submit": "enqueue a task", "tasks": "inspect and manage tasks",
                "schedules": "inspect and manage schedules", "memory": "long-term memory"}
    for command, summary in commands.items():
        assert f"    {command}" in out and summary in out, command
    assert "examples:\n  agentd check-config" in out
    assert "agentd submit hello.greet --args '{\"name\": \"Ada\"}' --wait" in out
    assert "configuration: --config PATH, else $AGENTD_CONFIG, else ./agentd.toml" in out


def test_an_unknown_task_status_is_refused_before_asking_the_daemon(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--status` took any text: a misspelt state went to the daemon (and, none running,
    the command failed with exit 1 for not reaching it). It is one of TaskStatus's, or a
    usage error (exit 2) that lists them."""
    config = tmp_path / "agentd.toml"
    config.write_text(f'[server]\nport = {_closed_port()}\n[daemon]\ndata_dir = "{tmp_path}"\n')
    with pytest.raises(SystemExit) as exited:
        main(["tasks", "list", "--status", "succeded", "--config", str(config)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argument --status: invalid choice: 'succeded' (choose from 'queued', 'running', " \
           "'waiting', 'succeeded', 'failed', 'dead', 'cancelled')" in err, err
    with pytest.raises(SystemExit):
        main(["tasks", "list", "--help"])
    assert "{queued,running,waiting,succeeded,failed,dead,cancelled}" in capsys.readouterr().out


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _run_into_closed_pipe(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run `python -m agentd *args` with stdout a pipe whose read end is already closed, as
    after `| head` has read its lines and exited; return the exit code and stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentd", *args, stdin=asyncio.subprocess.DEVNULL,
            stdout=write_end, stderr=asyncio.subprocess.PIPE, env=env, cwd=cwd)
    finally:
        os.close(write_end)
    _, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_a_listing_into_a_closed_pipe_exits_quietly(
    start_daemon: Any, config_file: Callable[..., Path], process_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    """`agentd tasks list | head`: once head has gone, agentd stops without a traceback and
    exits 141, as a tool killed by SIGPIPE does."""
    daemon, _ = await start_daemon()
    await daemon.queue.enqueue("agentd.purge_tasks", {}, delay=3600)
    env = process_env(AGENTD_SERVER_PORT=str(daemon.port))
    code, err = await _run_into_closed_pipe("tasks", "list", "--config", str(config_file()),
                                            env=env, cwd=tmp_path)
    assert (code, err) == (EXIT_BROKEN_PIPE, "")


async def test_a_report_into_a_closed_pipe_exits_quietly(
    config_file: Callable[..., Path], process_env: Callable[..., dict[str, str]], tmp_path: Path,
) -> None:
    """Output that fits the buffer fails only when Python flushes it at exit: handled too."""
    code, err = await _run_into_closed_pipe("check-config", "--config", str(config_file()),
                                            env=process_env(), cwd=tmp_path)
    assert (code, err) == (EXIT_BROKEN_PIPE, "")


async def test_client_commands_read_the_api_token_and_no_other_secret(
    start_daemon: Any, config_file: Callable[..., Path], process_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    """Found by review: every command read every secret, so an operator who may ask the
    daemon (with the API token) but cannot read the SMTP password or a hook's secret (the
    daemon's files) could not even run `agentd status`. A client command reads the token
    alone; `check-config`, which builds the daemon, still reads and checks them all."""
    token = "t0ken-for-the-cli"
    daemon, _ = await start_daemon(overrides={"server": {"token": token}})
    token_file = tmp_path / "api-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    path = config_file(f"""
        [server]
        token_file = "{token_file}"
        [mail]
        host = "smtp.example.com"
        password_file = "not-readable-by-this-user"
        [hooks.ci]
        secret_file = "nor-this"
        """)
    env = process_env(AGENTD_SERVER_PORT=str(daemon.port))

    async def agentd(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentd", *args, "--config", str(path), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=tmp_path)
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, out, err = await agentd("status")
    assert (code, err) == (0, "")
    assert json.loads(out)["version"]
    code, out, err = await agentd("tasks", "list")
    assert (code, err) == (0, "")
    code, _, err = await agentd("check-config")
    assert code == EXIT_USAGE
    assert f"{path}: [hooks.ci] secret_file: cannot read {tmp_path / 'nor-this'}" in err
