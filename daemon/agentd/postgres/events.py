"""`EventStore` (agentd/eventlog.py) on PostgreSQL: one event log, and one stream bus, for
every daemon on the database.

The commit horizon. A reader that follows the log (a stream resuming, the feed below) goes
forward by id: it must never pass an id whose transaction has not committed yet, or it
skips that event when it commits. Of the two known ways (DESIGN.md, "Beyond one machine")
this takes the counter row: an event-writing transaction takes its events' ids from the
one row of `event_counter`, updated at the end of the transaction (PgStore's `last` parts:
after every other write of the batch, acks and task inserts included, so the row is held
only until the commit and taken after every other row lock: no deadlock between two
daemons' transactions), so the row's lock orders event-writing transactions by commit and
ids commit in id order: what a reader sees of the
log is always every event up to some id, never one with a hole below it. The ids go on
from the larger of the counter and the server's clock in microseconds, as SQLite's ids do
from the daemon's clock (so the sweep reads an event's age from its id on both engines).
The cost: from that statement to its commit, a transaction holds the row, so event-writing
transactions of all daemons commit one at a time (each daemon groups its writes of a tick
into one transaction, so that is one commit per daemon per tick). Measured on the tests'
PostgreSQL 18 (2 shared cores, busy), transactions of 5 events each: one writer ~300/s
either way; three writers ~300/s with the counter against ~560/s without it (ids from the
identity: no horizon) or with `pg_current_xact_id()` computed per row. The other way (store
`pg_current_xact_id()` with each event and deliver below the snapshot's xmin) writes in
parallel, but its order is the transactions' ids rather than the events' ids, so a
Last-Event-ID could no longer be a plain event id; and it holds a reader back while any
long transaction, event-writing or not, is open.

Across daemons. After a commit that stored events, `NOTIFY agentd_events, 's'` (the same
payload from every statement, so PostgreSQL sends it once per transaction) wakes every
daemon's feed (this one's too), which reads the rows past its cursor and dispatches them,
with the log's ids, on the daemon's stream bus. Ephemeral events are never stored: while
anyone may hear them (a stream on this daemon, or another daemon), the daemon sends them on
its stream bus at once and to the others in notifications (`e <origin> <seq> <part> <parts>
<json>`: a batch split into parts of at most `_PART_CHARS`, under PostgreSQL's 8,000-byte
limit, sent in one transaction so they arrive together); a feed skips its own. An
ephemeral event bears the id of the last stored event its daemon's stream bus carried
before it: resuming after it misses nothing. A sweep that deleted events notifies
`h <id>`, the new horizon.

Order. Each row keeps its publishing daemon (`origin`) and the id its bus gave it
(`origin_id`), and each ephemeral event travels with the bus id of the newest stored event
its daemon published before it: every stream bus, the publishing daemon's too, sends an
ephemeral event only once that stored event is on it, so streams see each daemon's events
in the order it published them (as on one daemon), though a stored event reaches them only
once committed. Events of different daemons are ordered by the log (by commit).

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
from functools import partial
from typing import Any

from agentd.bus import Bus, Subscription
from agentd.errors import describe
from agentd.eventlog import EventLog, EventRow, SweepPlan
from agentd.events import Event
from agentd.log import get_logger
from agentd.store.postgres import PgConnection, PgStore, notify, notify_sql

CHANNEL = "agentd_events"
# Characters of JSON per notification part (ASCII JSON: one byte each), with room for the
# header under PostgreSQL's 8,000-byte payload limit.
_PART_CHARS = 7800
_PAGE = 1000
# Log ids of durably published events kept for `stream_id` at most.
_GIVEN_MOST = 4096
# This daemon's ephemeral events held behind its stored ones at most (see `_forward`).
_HOLD_MOST = 10_000

# The ids of a transaction's events: from the counter, or from the clock when it is ahead.
_INSERT = (
    "WITH c AS (UPDATE event_counter SET last_id = greatest(last_id + 1, "
    "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint) + $1 - 1 RETURNING last_id) "
    "INSERT INTO events (id, topic, time, data, correlation_id, causation_id, durable, origin, origin_id) "
    "SELECT c.last_id - $1 + r.n, r.topic, r.time, r.data, r.correlation_id, r.causation_id, r.durable, "
    "$8, r.origin_id FROM c, unnest($2::text[], $3::float8[], $4::text[], $5::text[], $6::text[], "
    "$7::int[], $9::bigint[]) WITH ORDINALITY AS r(topic, time, data, correlation_id, causation_id, "
    "durable, origin_id, n) RETURNING id")
_NEWEST = "SELECT last_id FROM event_counter"
_CATCH_UP_COUNTER = ("UPDATE event_counter SET last_id = greatest(last_id, "
                     "(SELECT coalesce(max(id), 0) FROM events))")
_HORIZON = "SELECT value FROM meta WHERE key = 'events_horizon'"
_PAGE_SQL = "SELECT * FROM events WHERE id > $1 ORDER BY id LIMIT $2"
_FEED_SQL = ("SELECT id, topic, time, data, correlation_id, causation_id, origin, origin_id "
             "FROM events WHERE id > $1 ORDER BY id LIMIT $2")
_CORRELATION_SQL = "SELECT * FROM events WHERE correlation_id = $1 AND id > $2 ORDER BY id"
_RING_OFFSET = "SELECT id FROM events WHERE durable = 0 ORDER BY id DESC LIMIT 1 OFFSET $1"
_SWEEP = ("WITH d AS (DELETE FROM events WHERE (durable = 0 AND id <= $1) OR (durable = 1 AND id <= $2) "
          "RETURNING id) SELECT count(*) AS n, coalesce(max(id), 0) AS newest FROM d")
# A rule's own bucket, and the buckets no rule has any more (see agentd.eventlog).
_BUCKET_OFFSET = "SELECT id FROM events WHERE durable = $1 ORDER BY id DESC LIMIT 1 OFFSET $2"
_SWEEP_BUCKET = ("WITH d AS (DELETE FROM events WHERE durable = $1 AND id <= $2 RETURNING id) "
                 "SELECT count(*) AS n, coalesce(max(id), 0) AS newest FROM d")
_SWEEP_LEFT = ("WITH d AS (DELETE FROM events WHERE durable >= 2 AND durable <> ALL($1::integer[]) "
               "AND id <= CASE durable % 2 WHEN 0 THEN $2::bigint ELSE $3::bigint END RETURNING id) "
               "SELECT count(*) AS n, coalesce(max(id), 0) AS newest FROM d")
_SET_HORIZON = ("INSERT INTO meta (key, value) VALUES ('events_horizon', $1) ON CONFLICT (key) "
                "DO UPDATE SET value = greatest(meta.value::bigint, excluded.value::bigint)::text")
_BY_ORIGIN = ("SELECT id, topic, time, data, correlation_id, causation_id, origin_id FROM events "
              "WHERE origin = $1 AND origin_id = ANY($2::bigint[])")
_COUNTS = "SELECT count(*) AS n, coalesce(sum(durable % 2), 0) AS durable FROM events"


def _event(row: Any) -> Event:
    return Event(id=row["id"], topic=row["topic"], time=row["time"], data=json.loads(row["data"]),
                 correlation_id=row["correlation_id"], causation_id=row["causation_id"])


async def insert_rows(conn: PgConnection, rows: list[EventRow], origin: str, *,
                      announce: bool = True) -> int:
    """Store `rows` with ids from the counter (their own ids, the bus's of daemon `origin`,
    kept as `origin_id`), and (if `announce`) notify the feeds once the transaction commits;
    return the id given to the first row (`row_writer` stores one)."""
    last: int = await conn.fetchval(_INSERT, len(rows), [r[1] for r in rows], [r[2] for r in rows],
                       [r[3] for r in rows], [r[4] for r in rows], [r[5] for r in rows],
                       [r[6] for r in rows], origin, [r[0] for r in rows])
    if announce:
        notify(CHANNEL, "s")
    return last


async def _nothing(_conn: PgConnection) -> None:
    """The op of a write that is all `last` part."""


def notification_parts(origin: str, seq: int, events: list[tuple[int, Event]]) -> list[str]:
    """The payloads carrying `events` (ephemeral, each after the id its daemon gave its
    stored predecessor) to the other daemons."""
    body = json.dumps([[after, e.topic, e.data, e.time, e.correlation_id, e.causation_id]
                       for after, e in events],
                      ensure_ascii=True, separators=(",", ":"), default=str)
    chunks = [body[i:i + _PART_CHARS] for i in range(0, len(body), _PART_CHARS)] or [""]
    return [f"e {origin} {seq} {n} {len(chunks)} {chunk}" for n, chunk in enumerate(chunks)]


class PgEvents:
    """`EventStore` on a `PgStore`, with the feed that makes one stream bus of all daemons."""

    assigns_ids = True

    def __init__(self, store: PgStore, peers_alive: Callable[[], bool],
                 on_peers_changed: Callable[[Callable[[], None]], None] | None = None) -> None:
        """`peers_alive`: whether another daemon may share the database (alone, a daemon
        announces nothing: its own feed is woken directly; and it sends its ephemeral
        events to no one); `on_peers_changed` registers a callback for when that answer
        changes (None: it never does)."""
        self.store = store
        self._peers_alive = peers_alive
        self.origin = uuid.uuid4().hex[:12]  # this daemon, in its notifications
        self.streams = Bus(on_subscriptions_changed=self._reconsider)
        self._bus: Bus | None = None  # the daemon's bus, once followed
        if on_peers_changed is not None:
            on_peers_changed(self._reconsider)
        self.cursor = 0  # the newest stored id the stream bus carried
        self.sent_parts = 0
        self._log_ref: EventLog | None = None
        self._forwarder: Subscription | None = None
        self._outgoing: list[tuple[int, Event]] = []
        # This daemon's ephemeral events for the others, by where their stored predecessor
        # is: pending (they ride with its insert), in flight (sent once it committed).
        self._riding: list[tuple[int, Event]] = []
        self._after_flight: list[tuple[int, Event]] = []
        self._inserting_upto = 0
        self._committed_upto = 0
        self._stored_ahead: set[int] = set()
        self._pass = 0  # read passes begun
        self._given: dict[int, int] = {}  # bus id -> log id, of rows `row_writer` stored
        self._moved = asyncio.Event()  # set as a read pass ends
        self._seq = itertools.count()
        self._parts: dict[tuple[str, str], list[str]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._dirty = False
        # Per daemon (origin), the newest of its own ids among the rows the feed carried.
        self._seen: dict[str, int] = {}
        # This daemon's newest stored event published, and its ephemeral events waiting for
        # their stored predecessor (its bus id) to be on the stream bus.
        self._own_published = 0
        self._held: list[tuple[int, Event]] = []
        # The other daemons' ephemeral events waiting likewise: (origin, predecessor, event).
        self._waiting: list[tuple[str, int, int, Event]] = []
        self._following = False
        self._log = get_logger("eventlog")

    @property
    def closed(self) -> bool:
        return self.store.closed

    def add_rider(self, rider: Callable[[], None]) -> None:
        self.store.add_rider(rider)

    def insert(self, rows: list[EventRow], *, alone: bool) -> asyncio.Future[Any]:
        upto = max(row[0] for row in rows)
        self._inserting_upto = max(self._inserting_upto, upto)
        # This daemon's ephemeral events published after these rows go to the others in
        # the same transaction: a feed reading the rows has them, and puts each in place.
        riding, self._riding = self._riding, []
        parts = notification_parts(self.origin, next(self._seq), riding) if riding else []

        async def op(conn: PgConnection) -> None:
            await insert_rows(conn, rows, self.origin, announce=self._peers_alive())
            if parts:
                notify(CHANNEL, *parts)

        # The counter's UPDATE ends its transaction (`last`): see the module docstring.
        written = self.store.write(_nothing, last=op) if alone else self.store.join_batch(_nothing, last=op)
        written.add_done_callback(partial(self._insert_done, upto))
        return written

    def _insert_done(self, upto: int, _done: asyncio.Future[Any]) -> None:
        self._committed_upto = max(self._committed_upto, upto)
        after_flight = [entry for entry in self._after_flight if entry[0] <= upto]
        if after_flight:
            self._after_flight = self._after_flight[len(after_flight):]
            self._queue_out(after_flight)
        if self._following:
            self._wake()  # sooner than our own notification

    def row_writer(self, row: EventRow) -> Callable[[Any], object]:
        # The caller runs it as the last part of its write (PgTasks.insert's `alongside`).
        async def op(conn: PgConnection) -> None:
            self._given[row[0]] = await insert_rows(conn, [row], self.origin,
                                                    announce=self._peers_alive())
            if len(self._given) > _GIVEN_MOST:  # stored ahead, never asked for
                del self._given[next(iter(self._given))]

        # Dispatched on the bus only once committed (a durable publish): see `_forward`.
        self._stored_ahead.add(row[0])
        return op

    def stream_id(self, event_id: int) -> int:
        return self._given.pop(event_id, event_id)

    async def stored(self, events: list[Event]) -> list[Event]:
        rows = await self.store.read(_BY_ORIGIN, (self.origin, [e.id for e in events]))
        by_origin_id = {row["origin_id"]: _event(row) for row in rows}
        return [by_origin_id.get(e.id, e) for e in events]

    async def caught_up(self) -> None:
        newest = await self.newest_id()
        while self.cursor < newest:
            self._wake()
            self._moved.clear()
            await self._moved.wait()

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

    def sweep(self, plan: SweepPlan) -> Awaitable[tuple[int, int]]:
        async def op(conn: PgConnection) -> tuple[int, int]:
            kept = await conn.fetchval(_RING_OFFSET, plan.ring_size)
            swept = [await conn.fetchrow(_SWEEP, max(plan.ring_by_age, kept or 0), plan.durable)]
            for bucket, size, by_age in plan.own:
                cutoff = by_age
                if size is not None:
                    cutoff = max(cutoff, await conn.fetchval(_BUCKET_OFFSET, bucket, size) or 0)
                swept.append(await conn.fetchrow(_SWEEP_BUCKET, bucket, cutoff))
            swept.append(await conn.fetchrow(_SWEEP_LEFT, plan.own_buckets, plan.ring_by_age,
                                             plan.durable))
            count = sum(int(row["n"]) for row in swept if row is not None)
            newest = max((int(row["newest"]) for row in swept if row is not None), default=0)
            if newest:
                await conn.execute(_SET_HORIZON, str(newest))
                notify(CHANNEL, f"h {newest}")
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

        await self.store.write(_nothing, last=catch_up_counter)
        self.store.listen(CHANNEL, self._notified)
        self.store.on_reconnect(self._reconnected)
        self.cursor = await self.newest_id()
        self.streams.advance_to(self.cursor)
        self._bus = bus
        self._forwarder = bus.subscribe("**", self._forward, name="event-feed", accepts=self._carries)
        self._following = True
        return self.streams

    def _carries(self, topic: str) -> bool:
        """The forwarder's `accepts`: every stored topic (this daemon's ephemeral events wait
        for the stored ones published before them), and an ephemeral one only while it may
        be heard: by a stream on this daemon, or by another daemon's. Unheard, an ephemeral
        event is then not even built (`TaskQueue.publish`), as on SQLite when nobody streams:
        a daemon alone and unwatched built, held and released a `task.started` per task."""
        log = self._log_ref
        return (log is None or log.persistence(topic) != "ephemeral" or self._peers_alive()
                or self.streams.has_subscribers(topic))

    def _reconsider(self) -> None:
        """A stream came or went, or the peers did: `_carries` may answer otherwise now."""
        if self._bus is not None:
            self._bus.reconsider_accepts()

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

    # This daemon's ephemeral events: each waits for the stored events this daemon published
    # before it to be on the stream bus (their rows commit a tick or more later), so every
    # stream sees a daemon's events in the order it published them.

    def _forward(self, event: Event) -> None:
        """Main bus callback: remember the newest stored event; send an ephemeral one on the
        stream bus and to the others, after that one."""
        log = self._log_ref
        if log is None or log.persistence(event.topic) != "ephemeral":
            self._own_published = event.id
            if self._stored_ahead and event.id in self._stored_ahead:
                # Stored by `row_writer` and committed: dispatched only now.
                self._stored_ahead.discard(event.id)
                self._committed_upto = max(self._committed_upto, event.id)
                self._wake()  # sooner than the notification, which a daemon alone skips
            return
        after = self._own_published
        if self._peers_alive():
            self._send_to_peers(after, event)
        if self._held or after > self._seen.get(self.origin, 0):
            self._held.append((after, event))
            if len(self._held) > _HOLD_MOST:  # the store refuses writes: order gives way
                self._release_held(everything=True)
            return
        self._dispatch_here(event)

    def _send_to_peers(self, after: int, event: Event) -> None:
        """Send an ephemeral event to the other daemons once the stored event it follows
        (`after`) is committed: with that event's insert if it is still to be written."""
        if after <= self._committed_upto:
            self._queue_out([(after, event)])
        elif after <= self._inserting_upto:
            self._after_flight.append((after, event))
        else:
            self._riding.append((after, event))

    def _dispatch_here(self, event: Event) -> None:
        self.streams.dispatch(Event(self.cursor, event.topic, event.data, event.time,
                                    event.correlation_id, event.causation_id))

    def _queue_out(self, events: list[tuple[int, Event]]) -> None:
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._send)
        self._outgoing += events

    def _release_held(self, *, everything: bool = False) -> None:
        """Send the held events whose stored predecessor is on the stream bus; `everything`
        when none can be waited for any longer."""
        seen = self._seen.get(self.origin, 0)
        n = 0
        while n < len(self._held) and (everything or self._held[n][0] <= seen):
            self._dispatch_here(self._held[n][1])
            n += 1
        del self._held[:n]

    def _send(self) -> None:
        events, self._outgoing = self._outgoing, []
        if not events or self.store.closed:
            return
        parts = notification_parts(self.origin, next(self._seq), events)
        self.sent_parts += len(parts)

        async def op(_conn: PgConnection) -> None:
            notify(CHANNEL, *parts)

        async def lone(conn: PgConnection) -> None:
            await conn.execute(notify_sql([(CHANNEL, part) for part in parts]))

        self.store.write(op, lone=lone).add_done_callback(self._sent)

    def _sent(self, done: asyncio.Future[None]) -> None:
        if not done.cancelled() and (exc := done.exception()) is not None:
            # Ephemeral: the other daemons' clients miss them, as a disconnected client would.
            self._log.warning("eventlog.ephemeral_not_sent", error=describe(exc))

    # The notifications, and the other daemons' events.

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
        for after, topic, data, time, correlation_id, causation_id in json.loads(chunk):
            self._waiting.append((origin, after, self._pass, Event(0, topic, data, time,
                                                                   correlation_id, causation_id)))
        self._release_waiting()
        if self._waiting:
            # Their stored predecessors committed at the latest with them: a read begun
            # from now sees them.
            self._wake()

    def _release_waiting(self, *, before_pass: int = 0) -> None:
        """Dispatch the other daemons' ephemeral events whose stored predecessor (the
        newest event their daemon stored before them) is on the stream bus, in the order
        each daemon sent them; and those that came before read pass `before_pass` began
        (that pass would have seen their predecessor: swept, or never stored)."""
        blocked: set[str] = set()
        kept: list[tuple[str, int, int, Event]] = []
        for origin, after, came, event in self._waiting:
            if origin not in blocked and (after <= self._seen.get(origin, 0) or came < before_pass):
                self._dispatch_here(event)
            else:
                blocked.add(origin)
                kept.append((origin, after, came, event))
        self._waiting = kept

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
        """Dispatch the stored events past `cursor`, in id order, until none is left; each
        daemon's ephemeral events waiting for one go out right after it."""
        caught_up = False
        try:
            while self._dirty:
                self._dirty = False
                self._pass += 1
                while True:
                    try:
                        rows = await self.store.read(_FEED_SQL, (self.cursor, _PAGE))
                    except Exception as exc:
                        # The next notification, or the listener's reconnection, tries again.
                        self._log.warning("eventlog.feed_read_failed", error=describe(exc))
                        return
                    for row in rows:
                        if row["id"] <= self.cursor:
                            continue
                        self.cursor = row["id"]
                        self.streams.advance_to(self.cursor)
                        self.streams.dispatch(_event(row))
                        origin = row["origin"]
                        if origin is not None:
                            self._seen[origin] = max(self._seen.get(origin, 0), row["origin_id"])
                            if origin == self.origin:
                                self._release_held()
                            elif self._waiting:
                                self._release_waiting()
                    if len(rows) < _PAGE:
                        break
            caught_up = True
        finally:
            self._reader = None
            self._moved.set()
            if caught_up:
                # What still waits, waits for a row this read, begun after it was sent, would
                # have seen: swept, or never stored (a write that failed).
                self._release_waiting(before_pass=self._pass)
                log = self._log_ref
                if self._held and log is not None and not log.unwritten:
                    self._release_held(everything=True)
