"""The event log: bus events kept in SQLite so a stream client can resume where it left off.

Each topic has a persistence class, given by the first matching `[events] persistence`
rule: `ephemeral` events (LLM tokens) are never stored, `ring` events are kept while they
are among the last `ring_size` and younger than `ring_seconds`, `durable` events for
`retention` seconds. Events are appended in batches through the store's grouped writes.
`horizon` is the newest id the sweeper has deleted: a client asking for events after an
older id may have missed some, and is told so with a gap.

A batch the storage refuses (`StoreWriteError`: a full disk...) is kept and written again,
after `_RETRY_FIRST` s doubling up to `_RETRY_MAX`, until it commits; meanwhile the events
stay in memory (replays see them), at most `_KEPT_WHILE_REFUSED` of them (the oldest beyond
are dropped and counted in `lost`). `append` stores an event before it is dispatched, for
publishers that must hear of a refusal.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from agentd.bus import Bus, Subscription
from agentd.config import EventsConfig
from agentd.errors import StoreWriteError
from agentd.events import Event, TopicPattern
from agentd.jsontext import lenient_encoder
from agentd.log import get_logger
from agentd.store import Connection, Row, Store, WriteOp, execute_rows

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

    def __init__(self, store: Store, bus: Bus, config: EventsConfig) -> None:
        self.store = store
        self.bus = bus
        self.config = config
        self.horizon = 0
        self.lost = 0
        self._rules = [(TopicPattern.parse(pattern), kind) for pattern, kind in config.rules()]
        self._class_of: dict[str, str] = {}
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
        self._log = get_logger("eventlog")

    async def start(self) -> None:
        """Continue the id sequence after the newest stored event, then start recording."""
        row = await self.store.read_one("SELECT max(id) AS id FROM events")
        if row is not None and row["id"] is not None:
            self.bus.advance_to(row["id"])
        horizon = await self.store.read_one("SELECT value FROM meta WHERE key = 'events_horizon'")
        self.horizon = int(horizon["value"]) if horizon is not None else 0
        self._subscription = self.bus.subscribe(
            "**", self._record, name="event-log",
            accepts=lambda topic: self.persistence(topic) != "ephemeral")
        self.store.add_rider(self._ride)

    async def stop(self) -> None:
        """Stop recording and wait until everything recorded is committed."""
        if self._subscription is not None:
            self._subscription.unsubscribe()
        await self.flush()

    async def flush(self) -> None:
        """Return once every event recorded so far is committed."""
        if self._pending and not self._writing:
            self._submit(self.store.write)
        await self._drained.wait()

    def row_writer(self, event: Event) -> Callable[[Connection], None] | None:
        """The write that stores `event` ahead of its dispatch (None for an ephemeral topic),
        for a caller that commits it with writes of its own (a durable publish, with the
        tasks of the handlers it triggers). Its row written again when it is dispatched
        changes nothing (an event's id is its key: INSERT OR IGNORE)."""
        if self.persistence(event.topic) == "ephemeral":
            return None
        row = self._row(event)
        return lambda conn: execute_rows(conn, INSERT_EVENTS, _ROW, [row])

    def persistence(self, topic: str) -> str:
        """The class of `topic`: ephemeral, ring or durable (ring when no rule matches)."""
        kind = self._class_of.get(topic)
        if kind is None:
            kind = next((k for pattern, k in self._rules if pattern.matches(topic)), "ring")
            self._class_of[topic] = kind
        return kind

    def _record(self, event: Event) -> None:
        """Bus callback, for topics that are not ephemeral (see `start`)."""
        self._pending.append(event)
        if not self._writing and self._timer is None and self._refused_wait is None:
            self._drained.clear()
            # Events ride along with the next batch of other writes (see `_ride`); this timer
            # writes them on their own only when no other write comes in time.
            self._timer = asyncio.get_running_loop().call_later(_ALONE_AFTER, self._submit_alone)

    def _ride(self) -> None:
        """Store rider: put the pending events into the batch about to be written."""
        if self._pending and not self._writing and self._refused_wait is None:
            self._submit(self.store.join_batch)

    def _submit_alone(self) -> None:
        self._timer = None
        if self._pending and not self._writing:
            if self.store.closed:  # refused until the daemon stopped: never stored
                self.lost += len(self._pending)
                self._log.error("eventlog.write_failed", events=len(self._pending),
                                error="the store closed before they could be written")
                self._pending = []
                self._drained.set()
                return
            self._submit(self.store.write)

    def _submit(self, write: Callable[[WriteOp[Any]], asyncio.Future[Any]]) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        self._in_flight = batch
        self._writing = True
        rows = [self._row(e) for e in batch]
        written = write(lambda conn: execute_rows(conn, INSERT_EVENTS, _ROW, rows))
        written.add_done_callback(self._written)

    def _row(self, e: Event) -> tuple[Any, ...]:
        return (e.id, e.topic, e.time, _ENCODE(e.data), e.correlation_id, e.causation_id,
                int(self.persistence(e.topic) == "durable"))

    def _written(self, future: asyncio.Future[Any]) -> None:
        error = None if future.cancelled() else future.exception()
        wait = _ALONE_AFTER
        if isinstance(error, StoreWriteError) and not self.store.closed:
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

    async def replay(self, after: int, accept: Callable[[Event], bool]) -> list[Event]:
        """Every kept event with id > `after` that `accept`s, in id order, the ones not yet
        committed included. Subscribe before calling it, then skip live events with an id
        at or below the last replayed one: together they miss nothing and repeat nothing."""
        return [event async for page in self.replay_pages(after, accept)
                if not isinstance(page, ReplayGap) for event in page]

    async def replay_pages(self, after: int, accept: Callable[[Event], bool],
                           ) -> AsyncIterator[list[Event] | ReplayGap]:
        """`replay`, a page (up to 1,000 events read) at a time: what a stream sends, so a
        client resuming from far back holds one page in memory, not the whole log (64
        WebSocket subscriptions from 0 held 600 MB of a 50,000-event log). A sweep between
        two pages is a `ReplayGap` before the next."""
        unflushed = sorted((e for e in (*self._in_flight, *self._pending) if e.id > after and accept(e)),
                           key=lambda e: e.id)
        cursor = after
        while True:
            if cursor != after and self.horizon > cursor:
                yield ReplayGap(cursor, self.horizon)
                cursor = self.horizon
            rows = await self.store.read(
                "SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", (cursor, _PAGE))
            last_page = len(rows) < _PAGE
            # The events not yet committed when the replay began go out with the page whose
            # ids they fall among (one committed since is in both: the row wins, as one id).
            taken = len(unflushed) if last_page else \
                next((n for n, e in enumerate(unflushed) if e.id > rows[-1]["id"]), len(unflushed))
            found: dict[int, Event] = {e.id: e for e in unflushed[:taken]}
            del unflushed[:taken]
            for row in rows:
                event = event_from_row(row)
                if accept(event):
                    found[event.id] = event
            if found:
                yield [found[i] for i in sorted(found)]
            if last_page:
                return
            cursor = rows[-1]["id"]

    async def replay_correlation(self, correlation_id: str, after: int = 0) -> list[Event]:
        """The kept events of one correlation (a root task and its descendants), in id order."""
        unflushed = [e for e in (*self._in_flight, *self._pending)
                     if e.id > after and e.correlation_id == correlation_id]
        rows = await self.store.read(
            "SELECT * FROM events WHERE correlation_id = ? AND id > ? ORDER BY id",
            (correlation_id, after))
        found = {e.id: e for e in map(event_from_row, rows)}
        found.update({e.id: e for e in unflushed})
        return [found[i] for i in sorted(found)]

    async def sweep(self) -> int:
        """Apply the retention rules; return how many events were deleted."""
        now = time.time()
        config = self.config

        def op(conn: Connection) -> tuple[int, int]:
            # Ids are at least the wall clock in microseconds, so an id below a time's
            # microseconds belongs to an event older than that time.
            ring_by_age = int((now - config.ring_seconds) * 1_000_000)
            row = conn.execute(
                "SELECT id FROM events WHERE durable = 0 ORDER BY id DESC LIMIT 1 OFFSET ?",
                (config.ring_size,)).fetchone()
            ring_cutoff = max(ring_by_age, row[0] if row is not None else 0)
            durable_cutoff = int((now - config.retention) * 1_000_000)
            deleted = conn.execute(
                "DELETE FROM events WHERE (durable = 0 AND id <= ?) OR (durable = 1 AND id <= ?) "
                "RETURNING id", (ring_cutoff, durable_cutoff)).fetchall()
            newest = max((r[0] for r in deleted), default=0)
            if newest:
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('events_horizon', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = max(CAST(value AS INTEGER), excluded.value)",
                    (str(newest),))
            return len(deleted), newest

        count, newest = await self.store.write(op)
        self.horizon = max(self.horizon, newest)
        return count

    async def stats(self) -> dict[str, int]:
        row = await self.store.read_one(
            "SELECT count(*) AS n, coalesce(sum(durable), 0) AS durable FROM events")
        total, durable = (row["n"], row["durable"]) if row is not None else (0, 0)
        return {"stored": total, "durable": durable, "ring": total - durable,
                "horizon": self.horizon, "lost": self.lost}
