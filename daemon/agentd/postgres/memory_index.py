"""Each daemon's RAM copy of the binary codes of the memories on PostgreSQL
(`[memory] ram_index`), following every daemon's writes.

pgvector's HNSW index misses what a user would call obvious at a million memories: it
found 0.70 of the exact ten nearest over all memories and 0.86 within a namespace of
100,000 (docs/benchmarks.md). The codes (one bit per dimension, 48 bytes a memory at 384)
scanned in RAM as on SQLite (`agentd.bitindex`), then re-ranked by exact cosine in
PostgreSQL, find all of them in a few milliseconds. PostgreSQL stays the truth; the index
only proposes candidates.

Following the others. Every daemon writes, so each index must learn what the others wrote.
The rule that keeps recall right whatever the notifications do:

- The index holds the state of the rows as of a snapshot, its `horizon` (a `pg_snapshot`),
  or newer. Each row carries `changed_xid`, the transaction that last wrote it.
- A recall re-ranks the index's candidates *and* every row whose writer the horizon does
  not see (`changed_xid` past the horizon): a memory remembered through another daemon a
  moment ago is recalled here at once, before any notification arrives.
- Catching up reads those rows in one snapshot, applies them and makes that snapshot the
  horizon, so the rows re-ranked beside the candidates stay few.
- A deleted row leaves nothing to read: its id comes in a notification and leaves the index.
  Until then it only takes a candidate's place; the re-rank reads live rows only.

Channel `agentd_memory` (triggers of migration pg_memory 0002): 'c' when memories were
inserted or updated (catch up), 'd:<ids>' when deleted. Notifications sent while the
listening connection was away are lost, so each (re)connection loads the index anew, the
old one answering meanwhile (it stays right; only its deletions may lag).

Loaded once the database holds `start_from` memories (counted again as writes come, at
most once a second): below that pgvector's search is a few milliseconds and the index
would cost each daemon numpy for nothing. While it loads (or if it failed), recall uses
pgvector.
"""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import json
import math
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

import asyncpg

from agentd.errors import describe
from agentd.log import get_logger
from agentd.ramindex import search_bits
from agentd.store.postgres import PgStore

if TYPE_CHECKING:
    from agentd.bitindex import BitIndex

CHANNEL = "agentd_memory"
_LOAD_ROWS = 10_000  # rows per fetch of a load
_RECOUNT_SECONDS = 1.0  # while waiting for `start_from` memories, count at most this often
_CONNECT_TIMEOUT = 5.0
_RETRY_SECONDS = (1.0, 60.0)  # after a failed load or catch-up, the next load's wait, doubling
# The searchable memories: the ones the HNSW index holds too.
_INDEXED = "superseded_by IS NULL AND embedding IS NOT NULL"
# Rows past the horizon: written by a transaction that `$1` (a pg_snapshot's text) does not see.
PAST_HORIZON = ("(changed_xid >= pg_snapshot_xmin({0}::text::pg_snapshot) "
                "AND NOT pg_visible_in_snapshot(changed_xid, {0}::text::pg_snapshot))")


class PgBitIndex:
    """The codes in RAM on one daemon: waiting (fewer than `start_from` memories), loading,
    ready and following every daemon's writes, or failed (logged; recall uses pgvector).
    See the module docstring."""

    def __init__(self, store: PgStore, dimension: int, fields: Sequence[str], *,
                 start_from: int) -> None:
        self.store = store
        self.dimension = dimension
        self.fields = tuple(fields)
        self.start_from = start_from
        self.index: BitIndex | None = None
        self.horizon: str | None = None  # set with `index`: see the module docstring
        self._count = 0
        self._counted_at = -math.inf
        self._removed: list[int] = []  # ids deleted, heard, not yet taken out
        self._changed = False  # rows inserted or updated since the last catch-up began
        self._reload = False  # the listener (re)connected: notifications may have been lost
        self._loading = False
        self._failed = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # nothing heard is left to apply
        self._tried = asyncio.Event()  # a load ended (or the index gave up)
        self._tasks: list[asyncio.Task[None]] = []
        self._conn: asyncpg.Connection | None = None  # the loads' and catch-ups' own
        self._log = get_logger("memory")

    async def open(self) -> None:
        """Start following the database: count its searchable memories (up to
        `start_from`), listen, and load once the listener is connected, if they are enough."""
        self._count = await self._count_indexed()
        self._counted_at = time.monotonic()
        self.store.listen(CHANNEL, self._heard)
        self.store.on_reconnect(self._reconnected)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._listen(), name="memory-listener"),
                       loop.create_task(self._follow(), name="memory-ram-index")]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()  # a load of a million rows takes seconds: stop it now
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.index = self.horizon = None

    def start(self) -> None:
        """Read the index anew now, however few memories the database holds (the bench
        times a daemon's load with it)."""
        self._count = max(self._count, self.start_from)
        self._tried.clear()
        self._reconnected()

    async def loaded(self) -> None:
        """Wait until a load ended (or the index gave up), then until everything heard since
        is applied (for tests and the bench: a write another daemon committed may not be
        heard yet, and recall does not need it to be)."""
        await self._tried.wait()
        await self._idle.wait()

    # -- what the listener hears --------------------------------------------------------------

    def _heard(self, payload: str) -> None:
        if payload.startswith("d:"):
            self._removed.extend(int(part) for part in payload[2:].split(","))
        else:
            self._changed = True
        self._idle.clear()
        self._wake.set()

    def _reconnected(self) -> None:
        self._reload = True
        self._idle.clear()
        self._wake.set()

    async def _listen(self) -> None:
        """The store's listening connection, kept open (memory's store is not the daemon's,
        so no one else runs it)."""
        try:
            await self.store.run_listener()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._log.error("memory.ram_index.not_following", url=self.store.location,
                            error=describe(exc))

    # -- following ----------------------------------------------------------------------------

    async def _follow(self) -> None:
        retry_in = _RETRY_SECONDS[0]
        while True:
            if not self._wake.is_set():
                self._idle.set()
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._drop_connection()
                # Load anew later: whatever went wrong, a load reads everything again. The
                # index, if any, answers meanwhile and stays right (see the module docstring).
                self._reload = True
                asyncio.get_running_loop().call_later(retry_in, self._wake.set)
                if self.index is None:
                    self._failed = True
                    self._tried.set()
                report = self._log.error if self.index is None else self._log.warning
                report("memory.ram_index.failed", url=self.store.location, error=describe(exc),
                       retry_in=retry_in,
                       answering="pgvector" if self.index is None else "the index as it was")
                retry_in = min(retry_in * 2, _RETRY_SECONDS[1])
            else:
                retry_in = _RETRY_SECONDS[0]

    async def _step(self) -> None:
        if self._reload:
            if self.index is None and self._count < self.start_from:
                self._reload = False
                self._changed = True  # count again before deciding
            else:
                self._reload = False
                await self._load()
                self._wake.set()  # what was heard meanwhile
                return
        if self.index is not None:
            removed, self._removed = self._removed, []
            self.index.remove(removed)
            if self._changed:
                self._changed = False
                await self._catch_up(self.index)
            return
        self._removed.clear()
        if self._changed:
            wait = self._counted_at + _RECOUNT_SECONDS - time.monotonic()
            if wait > 0:
                asyncio.get_running_loop().call_later(wait, self._wake.set)
                return
            self._changed = False
            self._count = await self._count_indexed()
            self._counted_at = time.monotonic()
            self._failed = False
            if self._count >= self.start_from:
                self._reload = True
                self._wake.set()

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.store.config.url, timeout=_CONNECT_TIMEOUT)
        return self._conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def _count_indexed(self) -> int:
        """The searchable memories, counted up to `start_from` only (the HNSW index's rows,
        not the whole table)."""
        row = await self.store.read_one(
            f"SELECT count(*) AS n FROM (SELECT 1 FROM memories WHERE {_INDEXED} LIMIT $1) AS held",
            (self.start_from,))
        return int(row["n"]) if row is not None else 0

    def _columns(self) -> str:
        """The columns an index row is made of: id, code (pgvector's bits, without
        `bit_send`'s length), namespace, and each filter field's JSON type and text."""
        fields = "".join(f", jsonb_typeof(metadata -> {_literal(name)}), metadata ->> {_literal(name)}"
                         for name in self.fields)
        return f"id, substr(bit_send(binary_quantize(embedding)), 5), namespace{fields}"

    async def _load(self) -> None:
        """Read the index anew in one snapshot; the old one (if any) answers until then."""
        from agentd.bitindex import BitIndex

        began = time.perf_counter()
        self._loading = True
        index = BitIndex(self.dimension, self.fields)
        try:
            horizon = await self._read_in_snapshot(
                f"SELECT {self._columns()} FROM memories WHERE {_INDEXED}", (),
                lambda rows: self._put(index, rows))
        finally:
            self._loading = False
        self.index, self.horizon, self._failed = index, horizon, False
        self._tried.set()
        self._changed = True  # what committed since the snapshot, heard or not
        self._log.info("memory.ram_index.loaded", url=self.store.location, vectors=len(index),
                       bytes=index.nbytes, seconds=round(time.perf_counter() - began, 2))

    async def _catch_up(self, index: BitIndex) -> None:
        """Apply the rows written past the horizon, and move the horizon to the snapshot
        they were read in."""
        assert self.horizon is not None

        def apply(rows: Sequence[Sequence[Any]]) -> None:
            index.remove([row[1] for row in rows if not row[0]])
            self._put(index, [row[1:] for row in rows if row[0]])

        # A few rows, or every one after a reembed: read as a load reads.
        self.horizon = await self._read_in_snapshot(
            f"SELECT {_INDEXED} AS indexed, {self._columns()} FROM memories "
            f"WHERE {PAST_HORIZON.format('$1')}", (self.horizon,), apply)

    async def _read_in_snapshot(self, sql: str, params: tuple[Any, ...],
                                apply: Callable[[Sequence[Sequence[Any]]], None]) -> str:
        """`apply` each batch of `sql`'s rows, all read in one snapshot, which it returns
        (as text) to become the horizon."""
        conn = await self._connection()
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            horizon: str = await conn.fetchval("SELECT pg_current_snapshot()::text")
            cursor = await conn.cursor(sql, *params)
            while rows := await cursor.fetch(_LOAD_ROWS):
                apply(rows)
        return horizon

    def _put(self, index: BitIndex, rows: Sequence[Sequence[Any]]) -> None:
        from agentd.bitindex import codes_of_bit_strings

        if not rows:
            return
        fields = range(3, 3 + 2 * len(self.fields), 2)
        index.put([row[0] for row in rows], [row[2] for row in rows],
                  [tuple(tag_of(row[at], row[at + 1]) for at in fields) for row in rows],
                  codes_of_bit_strings([row[1] for row in rows], index.words))

    # -- searching ----------------------------------------------------------------------------

    async def search(self, vector: Sequence[float], k: int, namespace: str | None,
                     where: dict[str, Any], *, margin: int, cap: int,
                     bits_within: int | None) -> tuple[list[int], str] | None:
        """The Hamming candidates for `vector` (see `agentd.bitindex.candidates`) and the
        horizon the caller re-ranks past; None when the index cannot answer: not loaded, or
        `where` names a key that is not a filter field, or a value it cannot hold (a JSON
        object or array)."""
        index, horizon = self.index, self.horizon
        if index is None or horizon is None:
            return None
        inside = []
        for name, value in where.items():
            wanted = matching_tags(index.values(name), value) if name in self.fields else None
            if wanted is None:
                return None
            inside.append((name, wanted))
        found = await search_bits(index, vector, k, namespace, inside, margin=margin, cap=cap,
                                  bits_within=bits_within)
        return found, horizon

    def describe(self) -> dict[str, Any]:
        """What memory's stats show of the index."""
        if self.index is not None:
            return {"engine": "ram", "state": "ready", "vectors": len(self.index),
                    "bytes": self.index.nbytes}
        if self._failed:
            return {"engine": "pgvector", "state": "failed"}
        if self._loading or self._count >= self.start_from:
            return {"engine": "pgvector", "state": "loading"}
        return {"engine": "pgvector", "state": "waiting", "vectors": self._count,
                "ram_from": self.start_from}


def tag_of(json_type: str | None, text: str | None) -> str:
    """A filter field's value in a row (`jsonb_typeof` and `->>` of it) as the index's tag:
    its JSON type and PostgreSQL's text of it; '' when null or absent."""
    return "" if json_type in (None, "null") else f"{json_type}:{text}"


def matching_tags(tags: Collection[str], value: Any) -> list[str] | None:
    """Those of `tags` (a field's values in the index) that the filter `{field: value}`
    matches as PostgreSQL's does (`_filters` in agentd.postgres.memory: equal as JSON, or
    a text equal to the value's `str`; None matches null and absent), or None for a value
    the index cannot answer for (a JSON object or array: pgvector's search answers)."""
    values = value if isinstance(value, list) else [value]
    if any(isinstance(one, (dict, list)) for one in values):
        return None
    return [tag for tag in tags if any(_matches(tag, one) for one in values)]


def _matches(tag: str, value: Any) -> bool:
    if not tag:
        return value is None
    if value is None:
        return False
    json_type, _, text = tag.partition(":")
    if text == str(value):
        return True
    if json_type == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
        with contextlib.suppress(decimal.InvalidOperation):
            return decimal.Decimal(text) == decimal.Decimal(json.dumps(value))
    if json_type == "boolean" and isinstance(value, bool):
        return text == ("true" if value else "false")
    return False


def _literal(text: str) -> str:
    """`text` as an SQL string literal (filter field names are checked at config load, but
    a name is data, not SQL)."""
    return "'" + text.replace("'", "''") + "'"
