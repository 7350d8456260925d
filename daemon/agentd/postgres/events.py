"""`EventStore` (agentd/eventlog.py) on PostgreSQL: one event log, and one stream bus, for
every daemon on the database.

The commit horizon. A reader that follows the log (a stream resuming, the feed below) goes
forward by id: it must never pass an id whose transaction has not committed yet, or it
skips that event when it commits. Of the two known ways (DESIGN.md, "Beyond one machine")
this takes the counter row: an event-writing transaction takes its events' ids from the
one row of `event_counter`, updated as its last event statement, so the row's lock orders
event-writing transactions by commit and ids commit in id order: what a reader sees of the
log is always every event up to some id, never one with a hole below it. The ids go on
from the larger of the counter and the server's clock in microseconds, as SQLite's ids do
from the daemon's clock (so the sweep reads an event's age from its id on both engines).
The cost: from that statement to its commit, a transaction holds the row, so event-writing
transactions of all daemons commit one at a time (each daemon groups its writes of a tick
into one transaction, so that is one commit per daemon per tick). The other way (store
`pg_current_xact_id()` with each event and deliver below the snapshot's xmin) writes in
parallel, but its order is the transactions' ids rather than the events' ids, so a
Last-Event-ID could no longer be a plain event id; and it holds a reader back while any
long transaction, event-writing or not, is open.

Across daemons. After a commit that stored events, `NOTIFY agentd_events, 's'` (the same
payload from every statement, so PostgreSQL sends it once per transaction) wakes every
daemon's feed (this one's too), which reads the rows past its cursor and dispatches them,
with the log's ids, on the daemon's stream bus. Ephemeral events are never stored: the
daemon sends them on its stream bus at once and to the others in notifications
(`e <origin> <seq> <part> <parts> <json>`: a batch split into parts of at most
`_PART_CHARS`, under PostgreSQL's 8,000-byte limit, sent in one transaction so they arrive
together); a feed skips its own. An ephemeral event bears the id of the last stored event
its daemon's stream bus carried before it: resuming after it misses nothing. A sweep that
deleted events notifies `h <id>`, the new horizon.

Losses, as on one daemon: when the listening connection is re-opened (`on_reconnect`) the
feed reads the stored events it missed from the table; ephemeral events sent meanwhile are
gone, as they are for a stream client that was disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from agentd.bus import Bus, Subscription
from agentd.config import EventsConfig
from agentd.errors import describe
from agentd.eventlog import EventLog, EventRow, sweep_cutoffs
from agentd.events import Event
from agentd.log import get_logger
from agentd.store.postgres import PgConnection, PgStore

CHANNEL = "agentd_events"
_NOTIFY_STORED = f"NOTIFY {CHANNEL}, 's'"
_NOTIFY = f"SELECT pg_notify('{CHANNEL}', $1)"
# Characters of JSON per notification part (ASCII JSON: one byte each), with room for the
# header under PostgreSQL's 8,000-byte payload limit.
_PART_CHARS = 7800
_PAGE = 1000

# The ids of a transaction's events: from the counter, or from the clock when it is ahead.
_INSERT = (
    "WITH c AS (UPDATE event_counter SET last_id = greatest(last_id + 1, "
    "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint) + $1 - 1 RETURNING last_id) "
    "INSERT INTO events (id, topic, time, data, correlation_id, causation_id, durable) "
    "SELECT c.last_id - $1 + r.n, r.topic, r.time, r.data, r.correlation_id, r.causation_id, r.durable "
    "FROM c, unnest($2::text[], $3::float8[], $4::text[], $5::text[], $6::text[], $7::int[]) "
    "WITH ORDINALITY AS r(topic, time, data, correlation_id, causation_id, durable, n)")
_NEWEST = "SELECT last_id FROM event_counter"
_CATCH_UP_COUNTER = ("UPDATE event_counter SET last_id = greatest(last_id, "
                     "(SELECT coalesce(max(id), 0) FROM events))")
_HORIZON = "SELECT value FROM meta WHERE key = 'events_horizon'"
_PAGE_SQL = "SELECT * FROM events WHERE id > $1 ORDER BY id LIMIT $2"
_CORRELATION_SQL = "SELECT * FROM events WHERE correlation_id = $1 AND id > $2 ORDER BY id"
_RING_OFFSET = "SELECT id FROM events WHERE durable = 0 ORDER BY id DESC LIMIT 1 OFFSET $1"
_SWEEP = ("WITH d AS (DELETE FROM events WHERE (durable = 0 AND id <= $1) OR (durable = 1 AND id <= $2) "
          "RETURNING id) SELECT count(*) AS n, coalesce(max(id), 0) AS newest FROM d")
_SET_HORIZON = ("INSERT INTO meta (key, value) VALUES ('events_horizon', $1) ON CONFLICT (key) "
                "DO UPDATE SET value = greatest(meta.value::bigint, excluded.value::bigint)::text")
_COUNTS = "SELECT count(*) AS n, coalesce(sum(durable), 0) AS durable FROM events"


def _event(row: Any) -> Event:
    return Event(id=row["id"], topic=row["topic"], time=row["time"], data=json.loads(row["data"]),
                 correlation_id=row["correlation_id"], causation_id=row["causation_id"])


async def insert_rows(conn: PgConnection, rows: list[EventRow]) -> None:
    """Store `rows` with ids from the counter (their own ids, the bus's, are not kept), and
    notify the feeds once the transaction commits."""
    await conn.execute(_INSERT, len(rows), [r[1] for r in rows], [r[2] for r in rows],
                       [r[3] for r in rows], [r[4] for r in rows], [r[5] for r in rows],
                       [r[6] for r in rows])
    await conn.execute(_NOTIFY_STORED)


def notification_parts(origin: str, seq: int, events: list[Event]) -> list[str]:
    """The payloads carrying `events` (ephemeral) to the other daemons."""
    body = json.dumps([[e.topic, e.data, e.time, e.correlation_id, e.causation_id] for e in events],
                      ensure_ascii=True, separators=(",", ":"), default=str)
    chunks = [body[i:i + _PART_CHARS] for i in range(0, len(body), _PART_CHARS)] or [""]
    return [f"e {origin} {seq} {n} {len(chunks)} {chunk}" for n, chunk in enumerate(chunks)]


class PgEvents:
    """`EventStore` on a `PgStore`, with the feed that makes one stream bus of all daemons."""

    assigns_ids = True

    def __init__(self, store: PgStore) -> None:
        self.store = store
        self.origin = uuid.uuid4().hex[:12]  # this daemon, in its notifications
        self.streams = Bus()
        self.cursor = 0  # the newest stored id the stream bus carried
        self.sent_parts = 0
        self._log_ref: EventLog | None = None
        self._forwarder: Subscription | None = None
        self._outgoing: list[Event] = []
        self._seq = itertools.count()
        self._parts: dict[tuple[str, str], list[str]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._dirty = False
        self._behind_read: list[Event] = []  # remote ephemeral events waiting for a read
        self._following = False
        self._log = get_logger("eventlog")

    @property
    def closed(self) -> bool:
        return self.store.closed

    def add_rider(self, rider: Callable[[], None]) -> None:
        self.store.add_rider(rider)

    def insert(self, rows: list[EventRow], *, alone: bool) -> asyncio.Future[Any]:
        async def op(conn: PgConnection) -> None:
            await insert_rows(conn, rows)

        return self.store.write(op) if alone else self.store.join_batch(op)

    def row_writer(self, row: EventRow) -> Callable[[Any], object]:
        async def op(conn: PgConnection) -> None:
            await insert_rows(conn, [row])

        return op

    async def newest_id(self) -> int:
        row = await self.store.read_one(_NEWEST)
        return int(row["last_id"]) if row is not None else 0

    async def horizon(self) -> int:
        row = await self.store.read_one(_HORIZON)
        return int(row["value"]) if row is not None else 0

    async def page(self, after: int, limit: int) -> list[Event]:
        return [_event(row) for row in await self.store.read(_PAGE_SQL, (after, limit))]

    async def correlation(self, correlation_id: str, after: int) -> list[Event]:
        return [_event(row) for row in await self.store.read(_CORRELATION_SQL, (correlation_id, after))]

    def sweep(self, now: float, config: EventsConfig) -> Awaitable[tuple[int, int]]:
        ring_by_age, durable_cutoff = sweep_cutoffs(now, config)

        async def op(conn: PgConnection) -> tuple[int, int]:
            kept = await conn.fetchval(_RING_OFFSET, config.ring_size)
            row = await conn.fetchrow(_SWEEP, max(ring_by_age, kept or 0), durable_cutoff)
            count, newest = (int(row["n"]), int(row["newest"])) if row is not None else (0, 0)
            if newest:
                await conn.execute(_SET_HORIZON, str(newest))
                await conn.execute(_NOTIFY, f"h {newest}")
            return count, newest

        return self.store.write(op)

    async def counts(self) -> tuple[int, int]:
        row = await self.store.read_one(_COUNTS)
        return (int(row["n"]), int(row["durable"])) if row is not None else (0, 0)

    # -- the feed ----------------------------------------------------------------------------

    async def follow(self, bus: Bus, log: EventLog) -> Bus:
        """Feed `streams` from the log and the notifications, and send this daemon's
        ephemeral events to the others."""
        self._log_ref = log

        async def catch_up_counter(conn: PgConnection) -> None:
            await conn.execute(_CATCH_UP_COUNTER)  # after `store copy`, rows the counter missed

        await self.store.write(catch_up_counter)
        self.store.listen(CHANNEL, self._notified)
        self.store.on_reconnect(self._reconnected)
        self.cursor = await self.newest_id()
        self.streams.advance_to(self.cursor)
        self._forwarder = bus.subscribe("**", self._forward, name="event-feed",
                                        accepts=lambda topic: log.persistence(topic) == "ephemeral")
        self._following = True
        return self.streams

    async def unfollow(self) -> None:
        self._following = False
        if self._forwarder is not None:
            self._forwarder.unsubscribe()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        self.streams.close()

    def _forward(self, event: Event) -> None:
        """Main bus callback for ephemeral events: on the stream bus now, to the others soon."""
        self.streams.dispatch(Event(self.cursor, event.topic, event.data, event.time,
                                    event.correlation_id, event.causation_id))
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._send)
        self._outgoing.append(event)

    def _send(self) -> None:
        events, self._outgoing = self._outgoing, []
        if not events or self.store.closed:
            return
        parts = notification_parts(self.origin, next(self._seq), events)
        self.sent_parts += len(parts)

        async def op(conn: PgConnection) -> None:
            await conn.executemany(_NOTIFY, [(part,) for part in parts])

        self.store.write(op).add_done_callback(self._sent)

    def _sent(self, done: asyncio.Future[None]) -> None:
        if not done.cancelled() and (exc := done.exception()) is not None:
            # Ephemeral: the other daemons' clients miss them, as a disconnected client would.
            self._log.warning("eventlog.ephemeral_not_sent", error=describe(exc))

    def _notified(self, payload: str) -> None:
        if not self._following:
            return
        if payload == "s":
            self._wake()
        elif payload.startswith("h "):
            if self._log_ref is not None:
                self._log_ref.horizon = max(self._log_ref.horizon, int(payload[2:]))
        elif payload.startswith("e "):
            self._take_part(payload)

    def _take_part(self, payload: str) -> None:
        _, origin, seq, part, parts, chunk = payload.split(" ", 5)
        if origin == self.origin:
            return  # already on this daemon's stream bus
        if parts != "1":
            chunks = self._parts.setdefault((origin, seq), [])
            chunks.append(chunk)
            if int(part) + 1 < int(parts):
                return
            del self._parts[(origin, seq)]
            chunk = "".join(chunks)
        events = [Event(0, topic, data, time, correlation_id, causation_id)
                  for topic, data, time, correlation_id, causation_id in json.loads(chunk)]
        if self._reader is not None:
            # Stored events of a notification before this one are being read: these go after.
            self._behind_read += events
        else:
            self._dispatch_ephemeral(events)

    def _dispatch_ephemeral(self, events: list[Event]) -> None:
        for e in events:
            self.streams.dispatch(Event(self.cursor, e.topic, e.data, e.time, e.correlation_id,
                                        e.causation_id))

    def _reconnected(self) -> None:
        """Notifications were lost while the listener was away: catch up from the table."""
        if self._following:
            self._parts.clear()
            self._wake()

    def _wake(self) -> None:
        self._dirty = True
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read(), name="agentd-event-feed")

    async def _read(self) -> None:
        """Dispatch the stored events past `cursor`, in id order, until none is left."""
        try:
            while self._dirty:
                self._dirty = False
                while True:
                    try:
                        events = await self.page(self.cursor, _PAGE)
                    except Exception as exc:
                        # The next notification, or the listener's reconnection, tries again.
                        self._log.warning("eventlog.feed_read_failed", error=describe(exc))
                        return
                    for event in events:
                        if event.id > self.cursor:
                            self.cursor = event.id
                            self.streams.advance_to(event.id)
                            self.streams.dispatch(event)
                    if len(events) < _PAGE:
                        break
        finally:
            self._reader = None
            behind, self._behind_read = self._behind_read, []
            self._dispatch_ephemeral(behind)
