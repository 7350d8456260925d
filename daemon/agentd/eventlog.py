"""The event log: bus events kept in agentd.db so a stream client can resume where it left off.

Each topic has a persistence class, given by the first matching `[events] persistence`
rule: `ephemeral` events (LLM tokens) are never stored, `ring` events are kept while they
are among the last `ring_size` and younger than `ring_seconds`, `durable` events for
`retention` seconds. A rule with limits of its own (`news.new=ring ring_size=500`) keeps
its events in a bucket of their own, counted and aged apart from the rest (the `durable`
column holds the bucket: `config.PersistenceRule.bucket`); the events of a bucket whose
rule is gone are aged by their class's section limits. Events are appended in batches
through the store's grouped writes.
`horizon` is the newest id the sweeper has deleted: a client asking for events after an
older id may have missed some, and is told so with a gap.

A batch the storage refuses (`StoreWriteError`: a full disk...) is kept and written again,
after `_RETRY_FIRST` s doubling up to `_RETRY_MAX`, until it commits; meanwhile the events
stay in memory (replays see them), at most `_KEPT_WHILE_REFUSED` of them (the oldest beyond
are dropped and counted in `lost`). `append` stores an event before it is dispatched, for
publishers that must hear of a refusal.

Storage. `EventStore` is what the log needs of its engine; `SqliteEvents` (below) stores on
one SQLite file, where the bus's ids are the log's ids and one daemon is the whole world;
`agentd.postgres.events.PgEvents` stores on PostgreSQL, shared by several daemons, where the
log's ids are given at commit (see that module on the commit horizon). Who hears what:

- the daemon's own bus (`bus`): every event published on this daemon, at once, to every
  subscriber: plugin handlers, digests' counters, the scheduler, this log's recorder. It
  never carries another daemon's events (a handler on every daemon would act N times).
- `streams`, the bus that stream clients (SSE, WebSocket) subscribe to. On SQLite it is the
  daemon's bus itself. On PostgreSQL it is a bus of its own that carries the log in commit
  order, every daemon's events alike, with the log's ids (so a client may resume on any
  daemon), and the ephemeral events of every daemon as they come (this daemon's at once,
  the others' through NOTIFY), each with the id of the last stored event before it.
- the log (`replay`, `replay_pages`, `replay_correlation`): what committed, from every
  daemon; on SQLite also what this daemon has not yet committed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from agentd.bus import Bus, Subscription
from agentd.config import EventsConfig
from agentd.errors import StoreWriteError
from agentd.events import Event, TopicPattern
from agentd.jsontext import lenient_encoder
from agentd.log import get_logger
from agentd.store import Connection, Row, Store, execute_rows

# An event's row: id, topic, time, data (JSON text), correlation_id, causation_id, and its
# bucket in the `durable` column (0 ring, 1 durable, 2 or more a rule's own: odd durable).
EventRow = tuple[int, str, float, str, str | None, str | None, int]


class EventStore(Protocol):
    """The `events` table and meta 'events_horizon', as the event log uses them, on one
    engine, with the engine's grouped writes."""

    @property
    def assigns_ids(self) -> bool:
        """True when the log gives events their ids as they commit (the bus's ids are then
        the publishing daemon's own, and an event not yet committed is in no replay)."""

    @property
    def closed(self) -> bool:
        """Whether the engine is closed."""

    def add_rider(self, rider: Callable[[], None]) -> None:
        """Call `rider()` just before each write batch is taken."""

    def insert(self, rows: list[EventRow], *, alone: bool) -> asyncio.Future[Any]:
        """Store `rows`: in a batch of their own (`alone`) or joining the batch being
        taken (from a rider); resolves once committed."""

    def row_writer(self, row: EventRow) -> Callable[[Any], object]:
        """The engine's write op storing `row`, to commit with the writes of a caller."""

    async def newest_id(self) -> int:
        """The newest stored id (0 for none)."""

    async def horizon(self) -> int:
        """The newest id the sweeper deleted (0 for none)."""

    async def page(self, after: int, limit: int) -> list[Event]:
        """Up to `limit` stored events with id > `after`, in id order."""

    async def correlation(self, correlation_id: str, after: int) -> list[Event]:
        """The stored events of one correlation with id > `after`, in id order."""

    def sweep(self, plan: SweepPlan) -> Awaitable[tuple[int, int]]:
        """Delete what `plan` lets go; resolves to (how many, newest id deleted)."""

    async def counts(self) -> tuple[int, int]:
        """How many events are stored, and how many of them are durable."""

    def stream_id(self, event_id: int) -> int:
        """The id streams show for the event of bus id `event_id` that `row_writer` stored
        (it committed): the same on SQLite."""

    async def stored(self, events: list[Event]) -> list[Event]:
        """`events` (of this daemon's bus, committed) as the log and streams have them."""

    async def caught_up(self) -> None:
        """Return once the stream bus carries every event committed when called."""

    async def follow(self, bus: Bus, log: EventLog) -> Bus:
        """Start feeding the bus stream clients subscribe to, and return it (see the module
        docstring); `bus` is the daemon's own."""

    async def unfollow(self) -> None:
        """Stop what `follow` started."""


_ROW = "(?,?,?,?,?,?,?)"
INSERT_EVENTS = (
    "INSERT OR IGNORE INTO events (id, topic, time, data, correlation_id, causation_id, durable) "
    "VALUES {rows}"
)
_PAGE = 1000
# Pending events wait at most this long for another write to ride along with.
_ALONE_AFTER = 0.02
# Seconds before a batch the storage refused is written again: the first wait, doubled
# after each refusal up to the last.
_RETRY_FIRST = 0.05
_RETRY_MAX = 1.0
# Events kept in memory while the storage refuses them (a few MB).
_KEPT_WHILE_REFUSED = 10_000
_ENCODE = lenient_encoder()


def event_from_row(row: Row) -> Event:
    return Event(id=row["id"], topic=row["topic"], time=row["time"], data=json.loads(row["data"]),
                 correlation_id=row["correlation_id"], causation_id=row["causation_id"])


@dataclass(frozen=True, slots=True)
class ReplayGap:
    """In a replay: the sweeper deleted events after `after`, up to `kept_after`, while the
    replay was under way (a slow client's replay spans sweeps)."""

    after: int
    kept_after: int


class EventLog:
    """Appends matching bus events to the `events` table; replays them; sweeps old ones."""

    def __init__(self, storage: EventStore, bus: Bus, config: EventsConfig) -> None:
        self.storage = storage
        self.bus = bus
        self.streams = bus  # what stream clients subscribe to; see the module docstring
        self.config = config
        self.horizon = 0
        self.lost = 0
        self._rules = [(TopicPattern.parse(rule.pattern), rule.kind, rule.bucket)
                       for rule in config.rules()]
        self._rule_of: dict[str, tuple[str, int]] = {}  # topic -> (class, bucket)
        self._pending: list[Event] = []
        self._in_flight: list[Event] = []
        self._writing = False
        self._timer: asyncio.TimerHandle | None = None
        # While set, the storage refused the last batch: nothing rides along with other
        # writes (each would fail its batch) until this wait is over.
        self._refused_wait: float | None = None
        self._drained = asyncio.Event()
        self._drained.set()
        self._subscription: Subscription | None = None
        # Ids of events `row_writer` stored ahead of their dispatch: not recorded again.
        self._stored_ahead: set[int] = set()
        self._log = get_logger("eventlog")

    async def start(self) -> None:
        """Continue the id sequence after the newest stored event, then start recording."""
        self.bus.advance_to(await self.storage.newest_id())
        self.horizon = await self.storage.horizon()
        self._subscription = self.bus.subscribe(
            "**", self._record, name="event-log",
            accepts=lambda topic: self.persistence(topic) != "ephemeral")
        self.storage.add_rider(self._ride)
        self.streams = await self.storage.follow(self.bus, self)

    async def stop(self) -> None:
        """Stop recording and wait until everything recorded is committed."""
        if self._subscription is not None:
            self._subscription.unsubscribe()
        await self.flush()
        await self.storage.unfollow()

    async def flush(self) -> None:
        """Return once every event recorded so far is committed."""
        if self._pending and not self._writing:
            self._submit(alone=True)
        await self._drained.wait()

    def row_writer(self, event: Event) -> Callable[[Any], object] | None:
        """The write that stores `event` ahead of its dispatch (None for an ephemeral topic),
        for a caller that commits it with writes of its own (a durable publish, with the
        tasks of the handlers it triggers). Its row written again when it is dispatched
        changes nothing: the recorder skips it (and on SQLite an event's id is its key:
        INSERT OR IGNORE). A reserved event whose commit failed is never dispatched: its id
        stays in `_stored_ahead`, a few bytes per refused publish."""
        if self.persistence(event.topic) == "ephemeral":
            return None
        writer = self.storage.row_writer(self._row(event))
        self._stored_ahead.add(event.id)
        return writer

    def stream_id(self, event: Event) -> int:
        """The id streams show for `event`, published durably (`row_writer`) and committed:
        what POST /v1/events answers. Its bus id on SQLite; on PostgreSQL the log's."""
        return self.storage.stream_id(event.id)

    async def stored(self, events: list[Event]) -> list[Event]:
        """`events`, published on this daemon's bus, as the log and streams have them (on
        PostgreSQL with the log's ids), once committed; ephemeral ones as they are."""
        await self.flush()
        return await self.storage.stored(events)

    async def ahead_of_durable(self) -> None:
        """Before a durable publish, which commits its row at once: where the log gives ids
        at commit, commit the events recorded so far first, so that the log (and every
        stream) has them before it, in the order they were published, as on SQLite."""
        if self.storage.assigns_ids and self.unwritten:
            await self.flush()

    async def settle(self) -> None:
        """Return once everything recorded so far is committed and on the stream bus."""
        await self.flush()
        await self.storage.caught_up()

    def persistence(self, topic: str) -> str:
        """The class of `topic`: ephemeral, ring or durable (ring when no rule matches)."""
        return self._rule(topic)[0]

    def _rule(self, topic: str) -> tuple[str, int]:
        """(class, bucket) of `topic`'s first matching rule; the default ring's if none."""
        found = self._rule_of.get(topic)
        if found is None:
            found = next(((kind, bucket) for pattern, kind, bucket in self._rules
                          if pattern.matches(topic)), ("ring", 0))
            self._rule_of[topic] = found
        return found

    def replayable(self, event: Event) -> bool:
        """Whether a replay may hold `event` (a stream skips a live event whose id its
        replay sent only if so: on PostgreSQL an ephemeral event bears the id of the stored
        event before it)."""
        return self.persistence(event.topic) != "ephemeral"

    @property
    def unwritten(self) -> bool:
        """Whether events recorded are still to be committed."""
        return bool(self._pending or self._in_flight)

    async def current_horizon(self) -> int:
        """`horizon` as the storage has it now (another daemon may have swept since)."""
        self.horizon = max(self.horizon, await self.storage.horizon())
        return self.horizon

    async def newest_id(self) -> int:
        """Where a reader starting now begins: the newest id handed out (SQLite) or
        committed to the log (PostgreSQL)."""
        return await self.storage.newest_id() if self.storage.assigns_ids else self.bus.last_id

    def _record(self, event: Event) -> None:
        """Bus callback, for topics that are not ephemeral (see `start`)."""
        if self._stored_ahead and event.id in self._stored_ahead:
            self._stored_ahead.discard(event.id)
            return
        self._pending.append(event)
        if not self._writing and self._timer is None and self._refused_wait is None:
            self._drained.clear()
            # Events ride along with the next batch of other writes (see `_ride`); this timer
            # writes them on their own only when no other write comes in time.
            self._timer = asyncio.get_running_loop().call_later(_ALONE_AFTER, self._submit_alone)

    def _ride(self) -> None:
        """Store rider: put the pending events into the batch about to be written."""
        if self._pending and not self._writing and self._refused_wait is None:
            self._submit(alone=False)

    def _submit_alone(self) -> None:
        self._timer = None
        if self._pending and not self._writing:
            if self.storage.closed:  # refused until the daemon stopped: never stored
                self.lost += len(self._pending)
                self._log.error("eventlog.write_failed", events=len(self._pending),
                                error="the store closed before they could be written")
                self._pending = []
                self._drained.set()
                return
            self._submit(alone=True)

    def _submit(self, *, alone: bool) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        self._in_flight = batch
        self._writing = True
        written = self.storage.insert([self._row(e) for e in batch], alone=alone)
        written.add_done_callback(self._written)

    def _row(self, e: Event) -> EventRow:
        return (e.id, e.topic, e.time, _ENCODE(e.data), e.correlation_id, e.causation_id,
                self._rule(e.topic)[1])

    def _written(self, future: asyncio.Future[Any]) -> None:
        error = None if future.cancelled() else future.exception()
        wait = _ALONE_AFTER
        if isinstance(error, StoreWriteError) and not self.storage.closed:
            wait = self._keep_refused(error)
        elif error is not None:
            self.lost += len(self._in_flight)
            self._log.error("eventlog.write_failed", events=len(self._in_flight), error=str(error))
        else:
            self._refused_wait = None
        self._in_flight = []
        self._writing = False
        if self._pending:
            self._timer = asyncio.get_running_loop().call_later(wait, self._submit_alone)
        else:
            self._drained.set()

    def _keep_refused(self, error: StoreWriteError) -> float:
        """Put a refused batch back in front of the pending events, to be written again
        after the wait this returns."""
        self._pending[:0] = self._in_flight
        dropped = len(self._pending) - _KEPT_WHILE_REFUSED
        if dropped > 0:
            del self._pending[:dropped]
            self.lost += dropped
        wait = self._refused_wait or _RETRY_FIRST
        self._refused_wait = min(wait * 2, _RETRY_MAX)
        self._log.error("eventlog.write_refused", events=len(self._pending), error=str(error),
                        dropped=max(0, dropped), retry_in=wait)
        return wait

    def _unflushed(self, keep: Callable[[Event], bool]) -> list[Event]:
        """The recorded events not yet committed that `keep` takes, when a replay holds them
        (not where the log gives ids at commit: they have none yet)."""
        if self.storage.assigns_ids:
            return []
        return [e for e in (*self._in_flight, *self._pending) if keep(e)]

    async def replay(self, after: int, accept: Callable[[Event], bool]) -> list[Event]:
        """Every kept event with id > `after` that `accept`s, in id order, the ones not yet
        committed included (on SQLite). Subscribe before calling it, then skip live events
        with an id the replay sent: together they miss nothing and repeat nothing."""
        return [event async for page in self.replay_pages(after, accept)
                if not isinstance(page, ReplayGap) for event in page]

    async def replay_pages(self, after: int, accept: Callable[[Event], bool],
                           ) -> AsyncIterator[list[Event] | ReplayGap]:
        """`replay`, a page (up to 1,000 events read) at a time: what a stream sends, so a
        client resuming from far back holds one page in memory, not the whole log (64
        WebSocket subscriptions from 0 held 600 MB of a 50,000-event log). A sweep between
        two pages is a `ReplayGap` before the next."""
        unflushed = sorted(self._unflushed(lambda e: e.id > after and accept(e)), key=lambda e: e.id)
        cursor = after
        while True:
            if cursor != after and self.horizon > cursor:
                yield ReplayGap(cursor, self.horizon)
                cursor = self.horizon
            events = await self.storage.page(cursor, _PAGE)
            last_page = len(events) < _PAGE
            # The events not yet committed when the replay began go out with the page whose
            # ids they fall among (one committed since is in both: the row wins, as one id).
            taken = len(unflushed) if last_page else \
                next((n for n, e in enumerate(unflushed) if e.id > events[-1].id), len(unflushed))
            found: dict[int, Event] = {e.id: e for e in unflushed[:taken]}
            del unflushed[:taken]
            for event in events:
                if accept(event):
                    found[event.id] = event
            if found:
                yield [found[i] for i in sorted(found)]
            if last_page:
                return
            cursor = events[-1].id

    async def replay_correlation(self, correlation_id: str, after: int = 0) -> list[Event]:
        """The kept events of one correlation (a root task and its descendants), in id order."""
        unflushed = self._unflushed(lambda e: e.id > after and e.correlation_id == correlation_id)
        found = {e.id: e for e in await self.storage.correlation(correlation_id, after)}
        found.update({e.id: e for e in unflushed})
        return [found[i] for i in sorted(found)]

    async def sweep(self) -> int:
        """Apply the retention rules; return how many events were deleted."""
        count, newest = await self.storage.sweep(SweepPlan.at(time.time(), self.config))
        self.horizon = max(self.horizon, newest)
        return count

    async def stats(self) -> dict[str, int]:
        total, durable = await self.storage.counts()
        return {"stored": total, "durable": durable, "ring": total - durable,
                "horizon": self.horizon, "lost": self.lost}


_PAGE_SQL = "SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?"
_CORRELATION_SQL = "SELECT * FROM events WHERE correlation_id = ? AND id > ? ORDER BY id"
_RING_OFFSET = "SELECT id FROM events WHERE durable = 0 ORDER BY id DESC LIMIT 1 OFFSET ?"
_SWEEP = ("DELETE FROM events WHERE (durable = 0 AND id <= ?) OR (durable = 1 AND id <= ?) "
          "RETURNING id")
# A rule's own bucket (events_kept indexes them); and the buckets no rule has any more,
# aged by their class's limits (even: ring, odd: durable).
_BUCKET_OFFSET = "SELECT id FROM events WHERE durable = ? ORDER BY id DESC LIMIT 1 OFFSET ?"
_SWEEP_BUCKET = "DELETE FROM events WHERE durable = ? AND id <= ? RETURNING id"
_SWEEP_LEFT = ("DELETE FROM events WHERE durable >= 2 AND durable NOT IN (SELECT value FROM json_each(?)) "
               "AND id <= CASE durable % 2 WHEN 0 THEN ? ELSE ? END RETURNING id")
_SET_HORIZON = ("INSERT INTO meta (key, value) VALUES ('events_horizon', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = max(CAST(value AS INTEGER), excluded.value)")


class SweepPlan(NamedTuple):
    """What a sweep deletes, as id cutoffs: ids are at least the wall clock in microseconds
    (on both engines), so an id below a time's microseconds is an older event's."""

    ring_by_age: int  # the default ring: ids at or below go
    ring_size: int  # the default ring: the newest this many stay however young
    durable: int  # the default durable class: ids at or below go
    # Each rule with limits of its own: (bucket, how many newest stay or None, age cutoff id).
    own: list[tuple[int, int | None, int]]

    @classmethod
    def at(cls, now: float, config: EventsConfig) -> SweepPlan:
        own: list[tuple[int, int | None, int]] = []
        for rule in config.rules():
            if rule.own_limits:
                if rule.kind == "ring":
                    seconds = config.ring_seconds if rule.ring_seconds is None else rule.ring_seconds
                    own.append((rule.bucket, rule.ring_size or config.ring_size, _id_at(now - seconds)))
                else:
                    seconds = config.retention if rule.retention is None else rule.retention
                    own.append((rule.bucket, None, _id_at(now - seconds)))
        return cls(_id_at(now - config.ring_seconds), config.ring_size,
                   _id_at(now - config.retention), own)

    @property
    def own_buckets(self) -> list[int]:
        return [bucket for bucket, _, _ in self.own]


def _id_at(when: float) -> int:
    return int(when * 1_000_000)


class SqliteEvents:
    """`EventStore` on agentd.db's SQLite file: the bus's ids are the log's ids."""

    assigns_ids = False

    def __init__(self, store: Store) -> None:
        self.store = store

    @property
    def closed(self) -> bool:
        return self.store.closed

    def add_rider(self, rider: Callable[[], None]) -> None:
        self.store.add_rider(rider)

    def insert(self, rows: list[EventRow], *, alone: bool) -> asyncio.Future[Any]:
        write = self.store.write if alone else self.store.join_batch
        return write(lambda conn: execute_rows(conn, INSERT_EVENTS, _ROW, rows))

    def row_writer(self, row: EventRow) -> Callable[[Any], object]:
        return lambda conn: execute_rows(conn, INSERT_EVENTS, _ROW, [row])

    async def newest_id(self) -> int:
        row = await self.store.read_one("SELECT max(id) AS id FROM events")
        return int(row["id"]) if row is not None and row["id"] is not None else 0

    async def horizon(self) -> int:
        row = await self.store.read_one("SELECT value FROM meta WHERE key = 'events_horizon'")
        return int(row["value"]) if row is not None else 0

    async def page(self, after: int, limit: int) -> list[Event]:
        return [event_from_row(row) for row in await self.store.read(_PAGE_SQL, (after, limit))]

    async def correlation(self, correlation_id: str, after: int) -> list[Event]:
        return [event_from_row(row)
                for row in await self.store.read(_CORRELATION_SQL, (correlation_id, after))]

    def sweep(self, plan: SweepPlan) -> Awaitable[tuple[int, int]]:
        def op(conn: Connection) -> tuple[int, int]:
            row = conn.execute(_RING_OFFSET, (plan.ring_size,)).fetchone()
            ring_cutoff = max(plan.ring_by_age, row[0] if row is not None else 0)
            deleted = conn.execute(_SWEEP, (ring_cutoff, plan.durable)).fetchall()
            for bucket, size, by_age in plan.own:
                cutoff = by_age
                if size is not None:
                    row = conn.execute(_BUCKET_OFFSET, (bucket, size)).fetchone()
                    cutoff = max(cutoff, row[0] if row is not None else 0)
                deleted += conn.execute(_SWEEP_BUCKET, (bucket, cutoff)).fetchall()
            deleted += conn.execute(_SWEEP_LEFT, (json.dumps(plan.own_buckets), plan.ring_by_age,
                                                  plan.durable)).fetchall()
            newest = max((r[0] for r in deleted), default=0)
            if newest:
                conn.execute(_SET_HORIZON, (str(newest),))
            return len(deleted), newest

        return self.store.write(op)

    async def counts(self) -> tuple[int, int]:
        row = await self.store.read_one(
            "SELECT count(*) AS n, coalesce(sum(durable % 2), 0) AS durable FROM events")
        return (row["n"], row["durable"]) if row is not None else (0, 0)

    def stream_id(self, event_id: int) -> int:
        return event_id

    async def stored(self, events: list[Event]) -> list[Event]:
        return events

    async def caught_up(self) -> None:
        pass

    async def follow(self, bus: Bus, log: EventLog) -> Bus:
        return bus  # one daemon: its bus is the whole stream

    async def unfollow(self) -> None:
        pass
