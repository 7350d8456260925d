"""`ScheduleStore` (agentd/scheduler.py) on PostgreSQL, where several daemons share the
`schedules` table: its statements, the change notifications, and the lead.

Changes. Every write notifies `agentd_schedules` (payload `<node>:<schedule id>`, sent at
commit) and every daemon re-reads a schedule another daemon changed, so a schedule made,
changed, paused or deleted through any daemon's API acts on the leader and shows on every
daemon. Notifications lost while the listening connection was away are made up for by
re-reading every schedule when it re-opens. Writes made from a copy another daemon has
changed meanwhile undo nothing of that change: a fire's record (`save_record`) never writes
the definition nor `paused`, nor its timing over a resume or retime it has not heard of yet
(which would fire again the times passed while paused); a daemon that does not lead writes
the definition and its timing, never the leader's record of fires.

The lead. One daemon fires: the one holding the session-level advisory lock
`_LEAD_LOCK`, taken with `pg_try_advisory_lock` on a connection of its own, outside the
pool (a pooled connection is recycled, and a lock on it would outlive its user or go with
the recycling). The others try again every `_LEAD_RETRY` seconds. PostgreSQL releases the
lock when the leader's connection ends: at once when the leader stops or its process dies
(the socket closes), so another daemon leads within `_LEAD_RETRY` (1 s) plus a round trip;
when the leader's host vanishes without closing, the server's TCP keepalives (set on that
connection to `KEEPALIVE` = idle 5 s, then 5 probes 1 s apart) end the session within
about 10 s, so another leads within about 11 s. The leader checks its connection every
`_LEAD_CHECK` seconds and stops firing as soon as it finds it broken. In the moments when two
daemons might both believe they lead, the fire time's idempotency key (the queue's unique
`idempotency_key`) still enqueues each fire once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable
from functools import partial

import asyncpg

from agentd.log import get_logger
from agentd.scheduler import ScheduleState, row_values
from agentd.store.postgres import KEEPALIVE, PgConnection, PgStore, notify, unavailable

CHANNEL = "agentd_schedules"
# The scheduler's session-level advisory lock key: "agentds" in ASCII (the migrations take
# "agentd", 0x6167656E7464, at transaction level).
_LEAD_LOCK = 0x6167656E746473
_LEAD_RETRY = 1.0
_LEAD_CHECK = 1.0
_CONNECT_TIMEOUT = 5.0
_COMMAND_TIMEOUT = 5.0

_SCHEDULES = "SELECT * FROM schedules"
_ONE = "SELECT * FROM schedules WHERE id = $1"
# A schedule's columns have two kinds of writers. Any daemon's API writes its definition and
# the timing that a pause, resume or retime sets (`_DEFINITION`); only the leader writes the
# record of its fires (`_RECORD_COLUMNS`), so another daemon's write from its copy, which may
# predate the leader's last fire, never undoes that record. The one exception: a schedule of
# another source under the same id (a declared one replacing one made over the API) is a new
# schedule, with a record of its own.
_DEFINITION = ("source = excluded.source, spec = excluded.spec, paused = excluded.paused, "
               "next_fire = excluded.next_fire, failures_in_row = excluded.failures_in_row, "
               "updated_at = excluded.updated_at")
_RECORD_COLUMNS = ("last_fire", "last_task_id", "last_outcome", "fires", "misses", "owed_fire")
_RECORD = ", ".join(f"{c} = excluded.{c}" for c in _RECORD_COLUMNS)
_RECORD_IF_REPLACED = ", ".join(
    f"{c} = CASE WHEN schedules.source = excluded.source THEN schedules.{c} ELSE excluded.{c} END"
    for c in _RECORD_COLUMNS)
_INSERT_ROW = (
    "INSERT INTO schedules (id, source, spec, paused, next_fire, last_fire, last_task_id, "
    "last_outcome, fires, misses, failures_in_row, owed_fire, created_at, updated_at) "
    "VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14)")
_SAVE = f"{_INSERT_ROW} ON CONFLICT (id) DO UPDATE SET {_DEFINITION}, {_RECORD}"
_SAVE_DEFINITION = f"{_INSERT_ROW} ON CONFLICT (id) DO UPDATE SET {_DEFINITION}, {_RECORD_IF_REPLACED}"
_INSERT = f"{_INSERT_ROW} ON CONFLICT (id) DO NOTHING RETURNING id"
# The leader's timing ($2, $8) is written unless the row was resumed or retimed since the
# leader's copy ($11 paused, $12 spec): that change set the timing from its own moment, and
# the leader takes it when the change's notification comes.
_UNCHANGED_SINCE_COPY = "spec = $12 AND (paused = $11 OR paused = 1)"
_SAVE_RECORD = (
    f"UPDATE schedules SET next_fire = CASE WHEN {_UNCHANGED_SINCE_COPY} THEN $2 ELSE next_fire END, "
    "last_fire = $3, last_task_id = $4, last_outcome = $5, fires = $6, misses = $7, "
    f"failures_in_row = CASE WHEN {_UNCHANGED_SINCE_COPY} THEN $8 ELSE failures_in_row END, "
    "owed_fire = $9, updated_at = $10 WHERE id = $1")
_DELETE = "DELETE FROM schedules WHERE id = $1"
_TRY_LEAD = "SELECT pg_try_advisory_lock($1)"


class PgSchedules:
    """`ScheduleStore` on a `PgStore`; see the module docstring."""

    def __init__(self, store: PgStore) -> None:
        self.store = store
        self.node = uuid.uuid4().hex  # tells this daemon's notifications from the others'
        self._lead: PgConnection | None = None
        self._watching: asyncio.Task[None] | None = None
        self._log = get_logger("scheduler")

    async def load(self) -> list[ScheduleState]:
        return [ScheduleState.from_row(dict(row)) for row in await self.store.read(_SCHEDULES)]

    async def load_one(self, schedule_id: str) -> ScheduleState | None:
        row = await self.store.read_one(_ONE, (schedule_id,))
        return None if row is None else ScheduleState.from_row(dict(row))

    def save(self, state: ScheduleState, now: float) -> Awaitable[object]:
        """The whole row from the leader (its copy of the record is the record); from any
        other daemon, the definition and its timing, and the record only of a schedule that
        replaces one of another source."""
        values = row_values(state, now)
        statement = _SAVE if self.leading else _SAVE_DEFINITION
        return self._write(state.spec.id, lambda conn: conn.execute(statement, *values))

    def insert(self, state: ScheduleState, now: float) -> Awaitable[bool]:
        values = row_values(state, now)

        async def op(conn: PgConnection) -> bool:
            if await conn.fetchval(_INSERT, *values) is None:
                return False
            notify(CHANNEL, f"{self.node}:{state.spec.id}")
            return True

        return self.store.write(op)

    def save_record(self, state: ScheduleState, now: float) -> Awaitable[object]:
        values = (state.spec.id, state.next_fire, state.last_fire, state.last_task_id,
                  state.last_outcome, state.fires, state.misses, state.failures_in_row,
                  state.owed_fire, now, int(state.paused), json.dumps(state.spec.to_dict()))
        return self._write(state.spec.id, lambda conn: conn.execute(_SAVE_RECORD, *values))

    def delete(self, schedule_id: str) -> Awaitable[object]:
        return self._write(schedule_id, lambda conn: conn.execute(_DELETE, schedule_id))

    def _write(self, schedule_id: str, statement: Callable[[PgConnection], Awaitable[object]]
               ) -> Awaitable[object]:
        async def op(conn: PgConnection) -> None:
            await statement(conn)
            notify(CHANNEL, f"{self.node}:{schedule_id}")

        return self.store.write(op)

    def watch(self, changed: Callable[[str | None], None]) -> None:
        def notified(payload: str) -> None:
            node, _, schedule_id = payload.partition(":")
            if node != self.node:
                changed(schedule_id)

        self.store.listen(CHANNEL, notified)
        self.store.on_reconnect(partial(changed, None))

    # -- the lead ----------------------------------------------------------------------------

    @property
    def leading(self) -> bool:
        return self._lead is not None

    async def lead(self, lost: Callable[[], None]) -> bool:
        """Try the lock every `_LEAD_RETRY` s until it is this daemon's; then watch its
        connection, calling `lost()` once it breaks. Always True: the other daemons (the
        last leader, their API) changed the table meanwhile."""
        while True:
            conn = await self._try_lock()
            if conn is not None:
                break
            await asyncio.sleep(_LEAD_RETRY)
        self._lead = conn
        self._watching = asyncio.get_running_loop().create_task(
            self._watch_lead(conn, lost), name="schedule-lead")
        return True

    async def _try_lock(self) -> PgConnection | None:
        """A connection holding the lock, or None (another daemon holds it, or the server
        is away: tried again later either way)."""
        try:
            conn = await asyncpg.connect(self.store.config.url, timeout=_CONNECT_TIMEOUT,
                                         command_timeout=_COMMAND_TIMEOUT,
                                         server_settings=KEEPALIVE)
        except Exception as exc:
            if unavailable(self.store.location, exc) is None and not isinstance(exc, asyncpg.PostgresError):
                raise
            return None
        try:
            if await conn.fetchval(_TRY_LEAD, _LEAD_LOCK):
                return conn
        except BaseException as exc:
            conn.terminate()  # cancelled or failed: a lock it may hold goes with it
            if isinstance(exc, asyncpg.PostgresError) or (
                    isinstance(exc, Exception) and unavailable(self.store.location, exc) is not None):
                return None
            raise
        conn.terminate()
        return None

    async def _watch_lead(self, conn: PgConnection, lost: Callable[[], None]) -> None:
        broken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        conn.add_termination_listener(
            lambda _conn: None if broken.done() else broken.set_result(None))
        try:
            while not broken.done():
                await asyncio.wait([broken], timeout=_LEAD_CHECK)
                if not broken.done():
                    await conn.fetchval("SELECT 1", timeout=_COMMAND_TIMEOUT)
        except Exception as exc:
            self._log.warning("scheduler.lead_connection_lost", error=f"{type(exc).__name__}: {exc}")
        finally:
            conn.terminate()
            if self._lead is not None and self._lead is conn:
                self._lead = None
                lost()

    def resign(self) -> None:
        conn, self._lead = self._lead, None
        watching, self._watching = self._watching, None
        if watching is not None:
            watching.cancel()
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.terminate()  # the server ends the session, releasing the lock
