"""Mail digests: the events of a topic pattern, collected and mailed together, on a
schedule (`every = "1h"`) or as soon as `count` have gathered, as configured in
`[digests.<name>]` tables (parsed into `DigestSpec`s by `load_config`).

A digest reads the event log, not a buffer of its own: what it mails survives restarts,
and its cursor (the last event id mailed) advances only after the mail went out. Its
pattern's events must therefore be kept by the event log (`ring` or `durable`, for at
least `every`); a pattern whose events are `ephemeral` is refused at start. A retried
digest mail carries the same Message-ID and the same events: the range is recorded before
the mail goes out, so a repeat after a crash can be dropped by the receiving mail system. Sends of one digest
never overlap (a lock per digest), so no event is mailed twice by two sends at once.

Several daemons on PostgreSQL share the cursors and the log: a digest mails every daemon's
events (its send task runs on whichever daemon claims it), while the counters of digests
sent by count hear only their own daemon's bus; each daemon's counter may enqueue a send,
which mails once there are `count` events in the log after the cursor.

`DigestStore` is the `digest_cursors` table; `SqliteDigests` below, and
`agentd.postgres.digests.PgDigests` on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from agentd.bus import Bus, Subscription
from agentd.errors import Fail
from agentd.eventlog import EventLog
from agentd.events import Event
from agentd.mail import SEND_MAIL_TASK, Mailer, message_args
from agentd.schedule import ScheduleSpec
from agentd.spawn import Spawner
from agentd.specs import DigestSpec
from agentd.store import Connection, Store
from agentd.taskdef import TaskDef, TaskRegistry
from agentd.taskqueue import TaskQueue

if TYPE_CHECKING:
    from agentd.context import Context

SEND_DIGEST_TASK = "agentd.send_digest"
SCHEDULE_PREFIX = "agentd.digest."  # + the digest's name: a timed digest's schedule id

# The statements on `digest_cursors`, all of them: per digest, the last event mailed and the
# last of a send under way (`pending_last_id`, set before the mail goes out).
_START_CURSOR = ("INSERT INTO digest_cursors (name, last_event_id, sent_at) VALUES (?, ?, ?) "
                 "ON CONFLICT (name) DO NOTHING")
_CURSOR = "SELECT last_event_id, pending_last_id FROM digest_cursors WHERE name = ?"
_MARK_PENDING = "UPDATE digest_cursors SET pending_last_id = ? WHERE name = ?"
_MARK_SENT = ("UPDATE digest_cursors SET last_event_id = ?, pending_last_id = NULL, sent_at = ? "
              "WHERE name = ?")


class DigestStore(Protocol):
    """The `digest_cursors` table, as digests use it."""

    def start(self, names: list[str], last_id: int, now: float) -> Awaitable[object]:
        """Give each digest of `names` without a cursor one at `last_id`; resolves once committed."""

    async def cursor(self, name: str) -> tuple[int, int | None]:
        """The digest's last event mailed (0 for none) and the last of a send under way."""

    def mark_pending(self, name: str, last_id: int) -> Awaitable[object]:
        """Record that a send of the events up to `last_id` is under way."""

    def mark_sent(self, name: str, last_id: int, now: float) -> Awaitable[object]:
        """Move the cursor to `last_id`: the send under way went out."""


class SqliteDigests:
    """`DigestStore` on agentd.db's SQLite file."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def start(self, names: list[str], last_id: int, now: float) -> Awaitable[object]:
        def op(conn: Connection) -> None:
            conn.executemany(_START_CURSOR, [(name, last_id, now) for name in names])

        return self.store.write(op)

    async def cursor(self, name: str) -> tuple[int, int | None]:
        row = await self.store.read_one(_CURSOR, (name,))
        return (row["last_event_id"], row["pending_last_id"]) if row is not None else (0, None)

    def mark_pending(self, name: str, last_id: int) -> Awaitable[object]:
        return self.store.write(lambda conn: conn.execute(_MARK_PENDING, (last_id, name)))

    def mark_sent(self, name: str, last_id: int, now: float) -> Awaitable[object]:
        return self.store.write(lambda conn: conn.execute(_MARK_SENT, (last_id, now, name)))


class Digests:
    """The configured digests: their task, their schedules and their counters."""

    def __init__(self, specs: Mapping[str, DigestSpec], *, store: DigestStore, bus: Bus, queue: TaskQueue,
                 eventlog: EventLog, mailer: Mailer, spawner: Spawner) -> None:
        self.specs = dict(specs)
        self._store = store
        self._bus = bus
        self._queue = queue
        self._eventlog = eventlog
        self._mailer = mailer
        self._spawner = spawner
        self._subscriptions: list[Subscription] = []
        self._gathered: dict[str, int] = {}
        self._queue_name = ""  # the queue of its task and schedules (`register`)
        # One send of a digest at a time: two would read the same cursor and mail twice.
        self._sending = {name: asyncio.Lock() for name in self.specs}

    def register(self, registry: TaskRegistry, queue: str) -> list[ScheduleSpec]:
        """Add the `agentd.send_digest` task; return the schedules of the timed digests."""
        registry.add(TaskDef(name=SEND_DIGEST_TASK, fn=self._send_task, queue=queue, max_attempts=5))
        self._queue_name = queue
        return self.schedules()

    def schedules(self) -> list[ScheduleSpec]:
        """The schedules of the timed digests (ids `agentd.digest.<name>`), once registered."""
        return [ScheduleSpec(id=f"{SCHEDULE_PREFIX}{spec.name}", every=spec.every,
                             task=SEND_DIGEST_TASK, args={"digest": spec.name}, catch_up="once",
                             overlap="skip", queue=self._queue_name)
                for spec in self.specs.values() if spec.every is not None]

    async def reconfigure(self, specs: Mapping[str, DigestSpec]) -> None:
        """Serve `specs` from now on (a reload): the counts start again, a new digest's
        cursor starts at the present, a kept one's stays where it is. The caller re-syncs
        the schedules (`schedules()`)."""
        self.stop()
        self.specs = dict(specs)
        self._gathered = {name: n for name, n in self._gathered.items() if name in self.specs}
        self._sending = {name: self._sending.get(name) or asyncio.Lock() for name in self.specs}
        await self.start()

    def check_persistence(self, specs: Mapping[str, DigestSpec] | None = None) -> None:
        """Raise ValueError for a digest (of `specs`, by default the running ones) whose
        events the event log would not keep."""
        for spec in (self.specs if specs is None else specs).values():
            for part in spec.topics.patterns:
                # A topic the pattern matches stands for it: the rules are patterns too.
                topic = ".".join("x" if s in ("*", "**") else s for s in part.segments)
                if self._eventlog.persistence(topic) == "ephemeral":
                    raise ValueError(f"[digests.{spec.name}] pattern {spec.pattern!r}: its events are "
                                     "ephemeral in [events] persistence; a digest reads them from the log")

    async def start(self) -> None:
        """Start each digest's cursor at the present (a new digest mails only what comes
        after it) and count events for the digests sent by count."""
        await self._store.start(list(self.specs), await self._eventlog.newest_id(), time.time())
        for spec in self.specs.values():
            if spec.count is not None:
                self._subscriptions.append(self._bus.subscribe(
                    spec.pattern, functools.partial(self._gather, spec), name=f"digest:{spec.name}"))
                # Events gathered before a restart are still in the log: check them now.
                await self._queue.enqueue(SEND_DIGEST_TASK, {"digest": spec.name, "at_least": spec.count})

    def stop(self) -> None:
        for subscription in self._subscriptions:
            subscription.unsubscribe()
        self._subscriptions.clear()

    def _gather(self, spec: DigestSpec, event: Event) -> None:
        assert spec.count is not None
        gathered = self._gathered.get(spec.name, 0) + 1
        if gathered < spec.count:
            self._gathered[spec.name] = gathered
            return
        self._gathered[spec.name] = 0
        self._spawner.spawn(
            self._queue.enqueue(SEND_DIGEST_TASK, {"digest": spec.name, "at_least": spec.count}),
            name=f"digest:{spec.name}")

    async def _send_task(self, ctx: Context, digest: str, at_least: int = 1) -> dict[str, Any]:
        spec = self.specs.get(digest)
        if spec is None:
            raise Fail(f"no digest {digest!r} is configured")
        return await self.send(spec, at_least)

    async def send(self, spec: DigestSpec, at_least: int = 1) -> dict[str, Any]:
        """Mail the events after the digest's cursor when there are at least `at_least`."""
        async with self._sending[spec.name]:
            return await self._send(spec, at_least)

    async def _send(self, spec: DigestSpec, at_least: int) -> dict[str, Any]:
        cursor, pending = await self._store.cursor(spec.name)
        matches = spec.topics.matches
        if pending is not None:
            # A send that may have gone out before a crash: the same range again, so the
            # repeat has the same Message-ID and content.
            last = pending
            events = await self._eventlog.replay(cursor, lambda e: e.id <= last and matches(e.topic))
        else:
            events = (await self._eventlog.replay(cursor, lambda e: matches(e.topic)))[:spec.limit]
            if len(events) < at_least:
                return {"sent": 0, "pending": len(events)}
            pending = events[-1].id
            await self._store.mark_pending(spec.name, pending)
        if events:
            text = "\n".join(_line(e) for e in events)
            args = message_args(list(spec.to), f"{spec.subject} ({len(events)} events)", text, None)
            sent = await self._mailer.deliver(args, f"digest-{spec.name}-{events[0].id}-{pending}")
            if sent["try_later"]:  # refused for now while others took it: a mail task for them
                await self._queue.enqueue(SEND_MAIL_TASK, {**args, "to": sent["try_later"]},
                                          idempotency_key=f"digest:{spec.name}:{pending}:try-later")
        await self._store.mark_sent(spec.name, pending, time.time())
        first = events[0].id if events else None
        return {"sent": len(events), "first_event_id": first, "last_event_id": pending}


def _line(event: Event) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(event.time))
    return f"{stamp}Z  {event.topic}  {json.dumps(event.data, ensure_ascii=False, sort_keys=True)}"
