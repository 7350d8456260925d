"""The `agentd` command: parse arguments, call into the daemon or its HTTP API, set the exit code.

Exit codes: 0 success, 1 the operation failed (daemon unreachable, start failed),
2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

import aiohttp

from agentd import __version__
from agentd.config import Config, check_serving_rules, find_config_path, load_config
from agentd.errors import AgentdError, ConfigError
from agentd.log import configure_logging

EXIT_FAILED = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentd", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"agentd {__version__}")
    config_help = "agentd.toml to use (default: $AGENTD_CONFIG, else ./agentd.toml)"
    parser.add_argument("--config", metavar="PATH", help=config_help)
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS keeps a --config given before the command when none is given after it.
    common.add_argument("--config", metavar="PATH", help=config_help, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", parents=[common], help="run the daemon in the foreground")
    sub.add_parser("check-config", parents=[common], help="validate the configuration and exit")
    sub.add_parser("status", parents=[common], help="ask the running daemon how it is")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(find_config_path(args.config))
        if args.command == "check-config":
            check_serving_rules(config)
            config.api_token()
            print(f"{config.source}: ok (database {config.database_path}, "
                  f"listening on {config.server.host}:{config.server.port})")
            return 0
        if args.command == "run":
            return _run(config)
        return asyncio.run(_status(config))
    except ConfigError as exc:
        print(f"agentd: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _run(config: Config) -> int:
    from agentd.app import serve

    configure_logging(config.log.level, config.log.format)
    try:
        asyncio.run(serve(config))
    except ConfigError:
        raise
    except (AgentdError, OSError) as exc:
        print(f"agentd: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


async def _api_get(config: Config, path: str) -> tuple[int, Any]:
    host = config.server.host if config.server.host not in ("0.0.0.0", "::") else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    token = config.api_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(
        f"http://{host}:{config.server.port}{path}", headers=headers
    ) as response:
        return response.status, await response.json()


async def _status(config: Config) -> int:
    try:
        status, body = await _api_get(config, "/v1/status")
    except (aiohttp.ClientError, TimeoutError) as exc:
        print(f"agentd: no daemon answers on {config.server.host}:{config.server.port}: {exc}",
              file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(body, indent=2))
    return 0 if status == 200 else EXIT_FAILED
