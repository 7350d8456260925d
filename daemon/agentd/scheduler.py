"""The scheduler: fires schedules into the durable queue (or onto the bus) exactly once per
fire time, handles missed fires by policy, and keeps each schedule's record.

Exactly once. A task fire is enqueued with the idempotency key `schedule:<id>:<fire time>`
(kept forever), and the schedule's `next_fire` only moves past a fire time after that.
A crash between the two re-computes the same fire time at the next start, and the key
returns the task already made: no fire time is ever enqueued twice, across restarts,
reloads and retries. An event fire commits the tasks of the durable handlers it triggers
(keyed the same way), then the schedule's state, and only then delivers the event: a crash
before the state commits fires that time again without a second trigger task, and a crash
after it never publishes the event twice (the bus is at-most-once; the durable handlers'
tasks are exactly-once).

Missed fires. A fire handled more than `grace` seconds after its time (the daemon was down,
the loop stalled, or the store refused the fire's writes and it was tried again) is late.
`catch_up = "skip"` fires none of the late ones, `"once"` fires the latest of them once,
`"all"` fires up to `catch_up_limit` of the latest; every late fire not fired publishes
`schedule.missed`.

Overlap, when the last run is still unfinished: `allow` runs anyway; `skip` misses this
fire; `queue_one` keeps one owed fire and runs it as soon as the last run ends; and
`cancel_previous` cancels the last run, then fires.

Sources. A schedule is declared (by agentd itself, a plugin or agentd.toml: re-synced at
every start) or made over the API (kept until deleted). One id is one schedule: when a
declaration takes the id of a schedule made over the API, the declaration wins (it is the
operator's current code and configuration) with a record of its own, and the API's
definition it replaces is logged and published (`schedule.replaced`), never dropped in
silence. The API cannot take an id that is declared (TaskStateError naming its owner).

Storage and leadership. The scheduler keeps its schedules through a `ScheduleStore`:
`SqliteSchedules` below (one daemon, which always leads) or
`agentd.postgres.schedules.PgSchedules`, where several daemons share the table. There one
daemon leads: only it fires and records outcomes, the others keep a copy that follows the
table (each write notifies; a daemon re-reads what another changed), so their API shows and
changes the same schedules, and they take the lead when the leader goes (see PgSchedules
for the bound). Whatever leads, the fire time's idempotency key keeps each fire once.
Declared schedules are re-synced by each daemon at its start, as by a lone daemon: daemons
of different versions (a rolling upgrade) agree on the declarations of the one that started
last. They change only when a daemon starts, never back and forth in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Protocol, get_args

from agentd.bus import Bus, Subscription
from agentd.errors import (
    InvalidScheduleError,
    ScheduleNotFoundError,
    StoreWriteError,
    TaskStateError,
    describe,
)
from agentd.events import Event
from agentd.log import get_logger
from agentd.schedule import ScheduleSpec
from agentd.store import Connection, Row, Store
from agentd.taskdef import TaskRegistry
from agentd.taskqueue import FINAL_TOPIC, TaskQueue, TaskRequest, TaskStatus

# Fires walked one by one before a long outage is crossed by estimate (cron only; interval
# schedules are crossed exactly by arithmetic), and missed fires reported one event each.
_MAX_WALKED = 2000
_MAX_MISSED_EVENTS = 100
_FINAL_TOPICS = ",".join(sorted(FINAL_TOPIC.values()))
_STATUS_OF_TOPIC: dict[str, TaskStatus] = {topic: status for status, topic in FINAL_TOPIC.items()}
# Task ids whose outcome the scheduler remembers having recorded.
_OUTCOMES_REMEMBERED = 4096
# Seconds before a schedule whose processing failed (not a fire: its state) is tried again.
_RETRY_FAILED = 60.0
# Seconds before a fire the store refused (a full disk) is tried again.
_RETRY_REFUSED = 5.0

# The statements on `schedules`, all of them (a fire's tasks are the queue's to write).
_SCHEDULES = "SELECT * FROM schedules"
_SAVE = (
    "INSERT INTO schedules (id, source, spec, paused, next_fire, last_fire, last_task_id, "
    "last_outcome, fires, misses, failures_in_row, owed_fire, created_at, updated_at) "
    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET "
    "source = excluded.source, spec = excluded.spec, paused = excluded.paused, "
    "next_fire = excluded.next_fire, last_fire = excluded.last_fire, "
    "last_task_id = excluded.last_task_id, last_outcome = excluded.last_outcome, "
    "fires = excluded.fires, misses = excluded.misses, "
    "failures_in_row = excluded.failures_in_row, owed_fire = excluded.owed_fire, "
    "updated_at = excluded.updated_at")
_DELETE = "DELETE FROM schedules WHERE id = ?"
_ONE = "SELECT * FROM schedules WHERE id = ?"


class Clock(Protocol):
    """Time for the scheduler; tests swap in a clock they move by hand."""

    def now(self) -> float: ...

    async def sleep_until(self, deadline: float | None, wake: asyncio.Event) -> None: ...


# Where a schedule comes from: declared by a plugin, agentd.toml or agentd itself (re-synced
# at every start), or made over the API (kept until deleted). The `schedules` table's CHECK
# lists the same.
DeclaredSource = Literal["plugin", "config", "builtin"]
ScheduleSource = Literal["api", DeclaredSource]
SOURCES: frozenset[ScheduleSource] = frozenset(get_args(ScheduleSource))


# Why a fire was not fired (`schedule.missed`'s `reason`): it was more than `grace` late and
# `catch_up` passed it over; the last run was unfinished (`overlap`); it could not be
# enqueued; or the schedule was paused (by failures) before a fire it owed ran.
MissReason = Literal["late", "overlap", "error", "paused"]


# Commit the tasks of the durable handlers an event triggers, before it is delivered; with a
# key (a scheduled fire's), each handler's task is keyed by it, so a fire repeated after a
# crash finds the tasks its first try committed.
CommitTriggers = Callable[[Event, str | None], Awaitable[None]]


class SystemClock:
    def now(self) -> float:
        return time.time()

    async def sleep_until(self, deadline: float | None, wake: asyncio.Event) -> None:
        timeout = None if deadline is None else max(0.0, deadline - time.time())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout)


@dataclass(slots=True)
class ScheduleState:
    """A schedule and its record, as kept in the `schedules` table."""

    spec: ScheduleSpec
    source: ScheduleSource
    paused: bool = False
    next_fire: float | None = None
    last_fire: float | None = None
    last_task_id: int | None = None
    last_outcome: TaskStatus | None = None  # the final status of the last fire's task
    fires: int = 0
    misses: int = 0
    failures_in_row: int = 0
    owed_fire: float | None = None
    created_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.spec.to_dict(), "source": self.source, "paused": self.paused,
            "next_fire": self.next_fire, "last_fire": self.last_fire,
            "last_task_id": self.last_task_id, "last_outcome": self.last_outcome,
            "fires": self.fires, "misses": self.misses, "failures_in_row": self.failures_in_row,
            "owed_fire": self.owed_fire,
        }

    def adopt(self, other: ScheduleState) -> None:
        """Take every field of `other` (the same schedule, as stored by another daemon)."""
        for column in fields(self):
            setattr(self, column.name, getattr(other, column.name))

    @classmethod
    def from_row(cls, row: Row | Mapping[str, Any]) -> ScheduleState:
        return cls(
            spec=ScheduleSpec(**json.loads(row["spec"])), source=row["source"],
            paused=bool(row["paused"]), next_fire=row["next_fire"], last_fire=row["last_fire"],
            last_task_id=row["last_task_id"], last_outcome=row["last_outcome"], fires=row["fires"],
            misses=row["misses"], failures_in_row=row["failures_in_row"],
            owed_fire=row["owed_fire"], created_at=row["created_at"],
        )


class ScheduleStore(Protocol):
    """The `schedules` table as the scheduler uses it, and which daemon fires: the one that
    leads (on an engine only one daemon uses, that one, always)."""

    async def load(self) -> list[ScheduleState]:
        """Every stored schedule."""

    async def load_one(self, schedule_id: str) -> ScheduleState | None:
        """One stored schedule, or None if there is none of that id."""

    def save(self, state: ScheduleState, now: float) -> Awaitable[object]:
        """Store the schedule, definition and record (insert or replace); resolves once
        committed."""

    def insert(self, state: ScheduleState, now: float) -> Awaitable[bool]:
        """Store a new schedule; resolves to False, storing nothing, if its id is taken
        (by another daemon's API, say, a moment ago)."""

    def save_record(self, state: ScheduleState, now: float) -> Awaitable[object]:
        """Store what firing changes (the timing, the record), not the definition nor
        `paused`, which other daemons' API may change meanwhile; resolves once committed."""

    def delete(self, schedule_id: str) -> Awaitable[object]:
        """Remove the schedule; resolves once committed."""

    def watch(self, changed: Callable[[str | None], None]) -> None:
        """Call `changed(schedule_id)` when another daemon changed that schedule, or
        `changed(None)` when any may have changed (notifications were lost)."""

    async def lead(self, lost: Callable[[], None]) -> bool:
        """Return once this daemon leads the firing; call `lost()` if it stops leading
        later. True when other daemons may have changed the table meanwhile (re-read it)."""

    @property
    def leading(self) -> bool:
        """Whether this daemon leads the firing now."""

    def resign(self) -> None:
        """Stop leading (at once: another daemon may lead)."""


class SqliteSchedules:
    """`ScheduleStore` on agentd.db's SQLite file: one daemon uses it, and it always leads."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def load(self) -> list[ScheduleState]:
        return [ScheduleState.from_row(row) for row in await self.store.read(_SCHEDULES)]

    async def load_one(self, schedule_id: str) -> ScheduleState | None:
        row = await self.store.read_one(_ONE, (schedule_id,))
        return None if row is None else ScheduleState.from_row(row)

    def save(self, state: ScheduleState, now: float) -> Awaitable[object]:
        values = row_values(state, now)
        return self.store.write(lambda conn: conn.execute(_SAVE, values))

    save_record = save  # one daemon writes the table: the whole row is its own

    async def insert(self, state: ScheduleState, now: float) -> bool:
        await self.save(state, now)  # the one daemon's schedules are all it knows of
        return True

    def delete(self, schedule_id: str) -> Awaitable[object]:
        return self.store.write(_delete(schedule_id))

    def watch(self, changed: Callable[[str | None], None]) -> None:
        pass  # no other daemon changes the table

    async def lead(self, lost: Callable[[], None]) -> bool:
        return False

    @property
    def leading(self) -> bool:
        return True

    def resign(self) -> None:
        pass


def row_values(state: ScheduleState, now: float) -> tuple[Any, ...]:
    """The row of `state`, in `_SAVE`'s column order."""
    return (state.spec.id, state.source, json.dumps(state.spec.to_dict()), int(state.paused),
            state.next_fire, state.last_fire, state.last_task_id, state.last_outcome,
            state.fires, state.misses, state.failures_in_row, state.owed_fire,
            state.created_at or now, now)


class Scheduler:
    """Owns every schedule; see the module docstring for its guarantees."""

    def __init__(self, store: ScheduleStore, queue: TaskQueue, bus: Bus, registry: TaskRegistry,
                 commit_triggers: CommitTriggers, *, clock: Clock | None = None) -> None:
        self.store = store
        self.queue = queue
        self.bus = bus
        self.registry = registry
        self._commit_triggers = commit_triggers
        self.clock: Clock = clock or SystemClock()
        self.schedules: dict[str, ScheduleState] = {}
        self._by_task: dict[int, str] = {}
        self._wake = asyncio.Event()
        self._outcomes: set[asyncio.Task[None]] = set()
        self._refused_until: dict[str, float] = {}  # schedule id -> when to try its fire again
        self._stale: set[str | None] = set()  # changed by another daemon (None: any)
        # Schedule id -> this daemon's writes of it: made, and under way; and the ids to read
        # again once their writes under way are done.
        self._writes: dict[str, int] = {}
        self._writing: dict[str, int] = {}
        self._recheck: set[str] = set()
        self._reloading: asyncio.Task[None] | None = None
        self._log = get_logger("scheduler")
        self._subscription = bus.subscribe(_FINAL_TOPICS, self._on_task_final, name="scheduler")
        self._remote: Subscription | None = None
        self._outcomes_taken: dict[int, None] = {}  # the latest task ids whose outcome was taken

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, declared: list[tuple[ScheduleSpec, DeclaredSource]],
                    outcomes: Bus | None = None) -> None:
        """Load the stored schedules and re-sync the declared ones (plugin, config, built-in):
        new ones are added, changed ones replaced (keeping their record), missing ones removed.
        A declared one with the id of a schedule made over the API replaces it, with a
        record of its own, and says so (`schedule.replaced`: see the module docstring).
        `outcomes`, a bus that carries the final events of tasks other daemons ran (the event
        log's streams on a shared store), is followed too: the leader records the outcome of a
        fire wherever its task ran (each once: whichever bus tells first).

        Raises:
            InvalidScheduleError: a declared schedule names an unknown task.
        """
        for spec, source in declared:
            self._check_action(spec, f"{source} schedule {spec.id!r}: ")
        stored = {state.spec.id: state for state in await self.store.load()}
        wanted = {spec.id: (spec, source) for spec, source in declared}
        for schedule_id, state in stored.items():
            if state.source != "api" and schedule_id not in wanted:
                await self.store.delete(schedule_id)
                continue
            self.schedules[schedule_id] = state
        await self._declare(wanted)
        for schedule_id, state in self.schedules.items():
            if state.last_task_id is not None:
                self._by_task[state.last_task_id] = schedule_id
        self.store.watch(self._changed_elsewhere)
        if outcomes is not None and outcomes is not self.bus:
            self._remote = outcomes.subscribe(_FINAL_TOPICS, self._on_task_final,
                                              name="scheduler-remote")

    async def redeclare(self, declared: list[tuple[ScheduleSpec, DeclaredSource]]) -> list[str]:
        """Re-sync the declared schedules while running (a reload): as `start` does, those
        no longer declared are deleted, new ones added, changed ones replaced (keeping their
        record, timed from now); unchanged ones and the API's are left as they are. Returns
        the ids added, changed or removed.

        Raises:
            InvalidScheduleError: a declared schedule names an unknown task (nothing changed).
        """
        for spec, source in declared:
            self._check_action(spec, f"{source} schedule {spec.id!r}: ")
        wanted = {spec.id: (spec, source) for spec, source in declared}
        removed = [schedule_id for schedule_id, state in self.schedules.items()
                   if state.source != "api" and schedule_id not in wanted]
        for schedule_id in removed:
            del self.schedules[schedule_id]
            with self._writing_to(schedule_id):
                await self.store.delete(schedule_id)
            self._writes.pop(schedule_id, None)
        touched = await self._declare(wanted)
        self.wake()
        return sorted([*removed, *touched])

    async def _declare(self, wanted: dict[str, tuple[ScheduleSpec, DeclaredSource]]) -> list[str]:
        """Add the declared schedules `wanted` that are new, replace those changed (their
        record kept, their timing from now); return the ids of both."""
        now = self.clock.now()
        touched: list[str] = []
        for schedule_id, (spec, source) in wanted.items():
            known = self.schedules.get(schedule_id)
            if known is not None and known.source == "api":
                self._replaced(known, source)
                known = None
            if known is None:
                known = ScheduleState(spec, source, next_fire=_first_fire(spec, now), created_at=now)
            elif known.spec != spec or known.source != source:
                # Changed definition: keep the record, restart the timing from now.
                known.spec, known.source = spec, source
                known.next_fire = _first_fire(spec, now)
            else:
                continue
            self.schedules[schedule_id] = known
            touched.append(schedule_id)
            await self._save(known)
        return touched

    async def load_stored(self) -> None:
        """Take the stored schedules as they are, declaring none and firing none: what a
        daemon in safe mode runs instead of `start` (without `run`), so that the API still
        lists, pauses and resumes them. The declared ones are re-synced at the next start."""
        await self._reload(None)

    def _replaced(self, replaced: ScheduleState, source: DeclaredSource) -> None:
        """Report a schedule of the API that a declared one (from `source`) replaces: its
        definition, so it can be made again under another id."""
        schedule_id, definition = replaced.spec.id, replaced.spec.to_dict()
        self._log.warning("schedule.replaced", schedule=schedule_id, source=source,
                          replaced_source=replaced.source, replaced=definition,
                          fires=replaced.fires, paused=replaced.paused)
        self.bus.publish("schedule.replaced", {
            "schedule_id": schedule_id, "source": source, "owner": _owner(schedule_id, source),
            "replaced_source": replaced.source, "replaced": definition})

    def check(self, spec: ScheduleSpec, source: DeclaredSource) -> None:
        """Refuse, as `start` would, a declared schedule that would fail at every fire.

        Raises:
            InvalidScheduleError: naming the source, the schedule and what is wrong.
        """
        self._check_action(spec, f"{source} schedule {spec.id!r}: ")

    async def stop(self) -> None:
        """Stop following task outcomes; finish recording the ones already seen."""
        self._subscription.unsubscribe()
        if self._remote is not None:
            self._remote.unsubscribe()
        self.store.resign()
        await asyncio.gather(*self._outcomes, return_exceptions=True)
        if self._reloading is not None:
            self._reloading.cancel()
            await asyncio.gather(self._reloading, return_exceptions=True)

    async def run(self) -> None:
        """Forever: wait to lead the firing (at once with one daemon), then fire while
        leading. Leaving (cancelled, or failing) gives the lead up at once."""
        try:
            while True:
                if await self.store.lead(self.wake):
                    self._log.info("scheduler.leading")
                    await self._reload(None)
                await self._fire_while_leading()
                self._log.warning("scheduler.lead_lost")
        finally:
            self.store.resign()

    async def _fire_while_leading(self) -> None:
        """Handle due schedules, then sleep until the next one (or a change), while leading."""
        while self.store.leading:
            self._wake.clear()
            now = self.clock.now()
            for state in list(self.schedules.values()):
                if not self.store.leading:
                    return
                if (not state.paused and state.next_fire is not None and state.next_fire <= now
                        and self._refused_until.get(state.spec.id, now) <= now):
                    try:
                        await self._fire_due(state, now)
                        self._refused_until.pop(state.spec.id, None)
                    except StoreWriteError as exc:
                        self._log.error("schedule.fire_refused", schedule=state.spec.id,
                                        error=str(exc), retry_in=_RETRY_REFUSED)
                        self._refused_until[state.spec.id] = now + _RETRY_REFUSED
                    except Exception:
                        self._log.exception("schedule.process_failed", schedule=state.spec.id)
                        # Tried again later, not at once: a fault that stays would spin.
                        state.next_fire = now + _RETRY_FAILED
            pending = [max(s.next_fire, self._refused_until.get(s.spec.id, s.next_fire))
                       for s in self.schedules.values() if not s.paused and s.next_fire is not None]
            if self.store.leading:
                await self.clock.sleep_until(min(pending) if pending else None, self._wake)

    def wake(self) -> None:
        self._wake.set()

    # -- other daemons' changes --------------------------------------------------------------

    def _changed_elsewhere(self, schedule_id: str | None) -> None:
        """Another daemon changed `schedule_id` (None: maybe any): re-read it, one reload
        at a time, so an older read never lands after a newer one."""
        self._stale.add(schedule_id)
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.get_running_loop().create_task(
                self._reload_stale(), name="schedule-reload")

    async def _reload_stale(self) -> None:
        while self._stale:
            stale = None if None in self._stale else self._stale.pop()
            if stale is None:
                self._stale.clear()
            try:
                await self._reload(stale)
            except Exception as exc:  # the store is away: the reconnect reloads everything
                self._log.error("schedule.reload_failed", schedule=stale, error=describe(exc))

    async def _reload(self, schedule_id: str | None) -> None:
        """Take the stored state of one schedule (or of all) as this daemon's: the same
        objects, updated in place, so work under way on them goes on with the new state.
        A schedule this daemon wrote while the read was under way, or is writing, keeps its
        own state (the read may predate that write) and is read again once written."""
        written = dict(self._writes)
        if schedule_id is None:
            found = {state.spec.id: state for state in await self.store.load()}
            looked_at = set(self.schedules) | set(found)
        else:
            one = await self.store.load_one(schedule_id)
            found = {} if one is None else {schedule_id: one}
            looked_at = {schedule_id}
        changed = bool(found)
        for key in looked_at:
            if self._writing.get(key):
                self._recheck.add(key)
                found.pop(key, None)
            elif self._writes.get(key, 0) != written.get(key, 0):
                self._changed_elsewhere(key)
                found.pop(key, None)
            elif key not in found:
                changed = self.schedules.pop(key, None) is not None or changed
        for key, state in found.items():
            known = self.schedules.get(key)
            if known is None:
                self.schedules[key] = state
            else:
                known.adopt(state)
            if state.last_task_id is not None:
                self._by_task[state.last_task_id] = key
        if changed:
            self.wake()

    # -- the API -----------------------------------------------------------------------------

    async def refresh(self, schedule_id: str | None = None) -> None:
        """Before the API reads or changes `schedule_id` (None: every schedule): on a daemon
        that does not lead, whose copy follows the table a notification behind, read it
        now, so what was made or changed through another daemon a moment ago is seen. The
        leader's copy is the freshest there is (it is the one firing), but for a schedule it
        does not know yet; with one daemon, the copy is the table."""
        if self.store.leading and (schedule_id is None or schedule_id in self.schedules):
            return
        await self._reload(schedule_id)

    def get(self, schedule_id: str) -> ScheduleState:
        try:
            return self.schedules[schedule_id]
        except KeyError:
            raise ScheduleNotFoundError(f"no schedule with id {schedule_id!r}") from None

    async def create(self, spec: ScheduleSpec, paused: bool = False) -> ScheduleState:
        existing = self.schedules.get(spec.id)
        if existing is not None:
            if existing.source == "api":
                raise TaskStateError(f"a schedule with id {spec.id!r} already exists")
            raise TaskStateError(f"schedule id {spec.id!r} is taken: "
                                 f"{_owner(spec.id, existing.source)} declares it")
        self._check_action(spec, "")
        now = self.clock.now()
        state = ScheduleState(spec, "api", paused=paused, next_fire=_first_fire(spec, now),
                              created_at=now)
        self.schedules[spec.id] = state
        try:
            with self._writing_to(spec.id):
                created = await self.store.insert(state, now)
        except BaseException:
            if self.schedules.get(spec.id) is state:
                del self.schedules[spec.id]
            raise
        if not created:  # made through another daemon a moment ago
            if self.schedules.get(spec.id) is state:
                del self.schedules[spec.id]
            raise TaskStateError(f"a schedule with id {spec.id!r} already exists")
        self.wake()
        return state

    async def update(self, schedule_id: str, changes: dict[str, Any]) -> ScheduleState:
        state = self._editable(schedule_id, "change")
        merged = {**state.spec.to_dict(), **changes}
        for trigger in ("every", "cron", "at"):
            if changes.get(trigger) is not None:  # a new trigger replaces the old kind
                merged = {k: v for k, v in merged.items()
                          if k not in {"every", "cron", "at"} - {trigger}}
        for action, other in (("task", ("event", "data")), ("event", ("task", "args", "queue"))):
            if changes.get(action) is not None:
                merged = {k: v for k, v in merged.items() if k not in other}
        spec = ScheduleSpec.from_mapping(merged)
        if spec.id != schedule_id:
            raise InvalidScheduleError("id: a schedule's id cannot be changed")
        self._check_action(spec, "")
        timing_changed = any(getattr(spec, k) != getattr(state.spec, k)
                             for k in ("every", "cron", "at", "timezone"))
        state.spec = spec
        if timing_changed:
            state.next_fire = _first_fire(spec, self.clock.now())
        await self._save(state)
        self.wake()
        return state

    async def delete(self, schedule_id: str) -> None:
        self._editable(schedule_id, "delete")
        del self.schedules[schedule_id]
        with self._writing_to(schedule_id):
            await self.store.delete(schedule_id)
        self._writes.pop(schedule_id, None)  # (a reload under way then reads it again)
        self.wake()

    async def set_paused(self, schedule_id: str, paused: bool) -> ScheduleState:
        """Pause, or resume: a resumed schedule goes on from now (fires due while it was
        paused are not made up)."""
        state = self.get(schedule_id)
        if state.paused != paused:
            state.paused = paused
            if not paused:
                state.failures_in_row = 0
                state.next_fire = _first_fire(state.spec, self.clock.now(), state.last_fire)
            await self._save(state)
            self.bus.publish("schedule.paused" if paused else "schedule.resumed",
                             {"schedule_id": schedule_id})
            self.wake()
        return state

    async def run_now(self, schedule_id: str) -> ScheduleState:
        """Fire once now, outside the timetable (overlap policy applies)."""
        state = self.get(schedule_id)
        await self._fire(state, self.clock.now(), manual=True)
        await self._save(state, record=True)
        return state

    # -- firing ------------------------------------------------------------------------------

    async def _fire_due(self, state: ScheduleState, now: float) -> None:
        """Fire the schedule's fires that have come due (from `next_fire` up to `now`) as
        its `catch_up` policy says, report each late one passed over (`schedule.missed`),
        and save it with `next_fire` after `now`. A fire the store refuses raises
        StoreWriteError, with `next_fire` left at that fire, to be tried again."""
        spec = state.spec
        keep = {"skip": 0, "once": 1, "all": spec.catch_up_limit}[spec.catch_up]
        due = _due_fires(spec, state.next_fire, now, max(keep, _MAX_MISSED_EVENTS))
        to_fire = list(due.on_time)
        if keep and (spec.catch_up == "all" or not due.on_time):
            to_fire = due.late_tail[-keep:] + to_fire
        fired_late = len(to_fire) - len(due.on_time)
        missed_late = due.late_count - fired_late
        listed = [f for f in due.late_tail if f not in to_fire][-_MAX_MISSED_EVENTS:]
        for fire_time in listed:
            self._missed(state, fire_time, "late")
        if missed_late > len(listed):
            # Too many to report one by one (a long outage of a frequent schedule).
            rest = missed_late - len(listed)
            state.misses += rest
            self.bus.publish("schedule.missed", {"schedule_id": spec.id, "reason": "late",
                                                  "count": rest, "approximate": due.approximate})
        for index, fire_time in enumerate(to_fire):
            following = to_fire[index + 1] if index + 1 < len(to_fire) else due.next_fire
            record = state.last_fire, state.fires
            try:
                await self._fire(state, fire_time, following=following)
            except StoreWriteError:
                # The store refuses writes (a full disk), not this fire: it stays due and is
                # tried again, late as after the daemon was down (catch_up decides then).
                # Its triggers and task are keyed by its time: a retry makes no second one.
                state.next_fire = fire_time
                state.last_fire, state.fires = record
                raise
            except Exception as exc:
                # A fire that cannot be enqueued (its task is gone, its arguments no longer
                # fit) is reported and passed over, never retried in a loop.
                self._log.error("schedule.fire_failed", schedule=spec.id, error=str(exc))
                self._missed(state, fire_time, "error", error=describe(exc))
        state.next_fire = due.next_fire
        await self._save(state, record=True)

    async def _fire(self, state: ScheduleState, fire_time: float, manual: bool = False,
                    following: float | None = None) -> None:
        """Fire once. `following` is the schedule's next fire time once this one is done
        (a scheduled event fire saves it before the event goes out)."""
        spec = state.spec
        if spec.task is None:
            await self._fire_event(state, fire_time, manual, following)
            return
        if not await self._overlap_allows(state, fire_time):
            return
        delay = random.uniform(0, spec.jitter) if spec.jitter else 0.0
        # A manual run is its own fire; the scheduled ones are keyed by their fire time.
        key = f"schedule:{spec.id}:manual:{uuid.uuid4().hex}" if manual else \
            f"schedule:{spec.id}:{fire_time:.6f}"
        (outcome,) = await self.queue.enqueue_many([TaskRequest(
            spec.task, spec.args, queue=spec.queue, delay=delay or None,
            idempotency_key=key, dedupe_window=float("inf"))])
        task = outcome.task
        state.last_fire, state.last_task_id, state.fires = fire_time, task.id, state.fires + 1
        self._by_task[task.id] = spec.id
        self.bus.publish("schedule.fired", {"schedule_id": spec.id, "fire_time": fire_time,
                                            "task_id": task.id, "created": outcome.created,
                                            "manual": manual})

    async def _fire_event(self, state: ScheduleState, fire_time: float, manual: bool,
                          following: float | None) -> None:
        """Commit the triggered tasks, then the state, then deliver (see the module docstring)."""
        spec = state.spec
        event = self.bus.reserve_event(spec.event or "", {**spec.data, "schedule_id": spec.id,
                                                          "fire_time": fire_time})

        async def commit() -> None:
            await self._commit_triggers(event, None if manual else f"schedule:{spec.id}:{fire_time:.6f}")
            state.last_fire, state.fires = fire_time, state.fires + 1
            if not manual:
                state.next_fire = following
            await self._save(state, record=True)

        await self.bus.dispatch_once_committed(event, commit())
        self.bus.publish("schedule.fired", {"schedule_id": spec.id, "fire_time": fire_time,
                                            "event_id": event.id, "manual": manual})

    async def _overlap_allows(self, state: ScheduleState, fire_time: float) -> bool:
        policy = state.spec.overlap
        if policy == "allow" or state.last_task_id is None:
            return True
        try:
            last = await self.queue.get(state.last_task_id)
        except LookupError:
            return True
        if last.finished:
            return True
        if policy == "cancel_previous":
            # Forgotten first: this cancel is the schedule's doing, not an outcome of its run.
            self._by_task.pop(last.id, None)
            await self.queue.cancel(last.id)
            return True
        if policy == "queue_one" and state.owed_fire is None:
            state.owed_fire = fire_time
            return False
        self._missed(state, fire_time, "overlap")
        return False

    def _missed(self, state: ScheduleState, fire_time: float, reason: MissReason, **extra: Any) -> None:
        state.misses += 1
        self.bus.publish("schedule.missed", {"schedule_id": state.spec.id, "fire_time": fire_time,
                                              "reason": reason, **extra})

    def _on_task_final(self, event: Event) -> None:
        task_id = event.data.get("task_id", -1)
        # Every task's final event comes here: most are no schedule's (not in `_by_task`).
        if task_id not in self._by_task or not self.store.leading:
            return  # the leading daemon records outcomes: once, whichever daemon ran the task
        schedule_id = self._by_task.pop(task_id, None)
        state = self.schedules.get(schedule_id) if schedule_id else None
        if state is None or state.last_task_id != task_id or task_id in self._outcomes_taken:
            return
        # Once each, though two buses may tell (a re-read of the table maps the task again).
        self._outcomes_taken[task_id] = None
        if len(self._outcomes_taken) > _OUTCOMES_REMEMBERED:
            del self._outcomes_taken[next(iter(self._outcomes_taken))]
        task = asyncio.get_running_loop().create_task(
            self._record_outcome(state, _STATUS_OF_TOPIC[event.topic]),
            name=f"schedule-outcome:{state.spec.id}")
        self._outcomes.add(task)
        task.add_done_callback(self._outcome_recorded)

    def _outcome_recorded(self, task: asyncio.Task[None]) -> None:
        """The scheduler owns the tasks recording outcomes: a failure of one (its state could
        not be saved) is logged here, not left to asyncio as an exception never retrieved."""
        self._outcomes.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._log.error("schedule.outcome_failed", task=task.get_name(),
                            error=describe(exc), exc_info=exc)

    async def _record_outcome(self, state: ScheduleState, outcome: TaskStatus) -> None:
        state.last_outcome = outcome
        limit = state.spec.pause_after_failures
        paused_now = False
        if outcome == "succeeded":
            state.failures_in_row = 0
        else:
            state.failures_in_row += 1
            if limit and state.failures_in_row >= limit and not state.paused:
                state.paused = paused_now = True
                self.bus.publish("schedule.paused", {"schedule_id": state.spec.id,
                                                     "reason": f"{limit} failures in a row"})
        owed, state.owed_fire = state.owed_fire, None
        if owed is not None and state.paused:
            self._missed(state, owed, "paused")  # the failure just paused it: said, not dropped
        elif owed is not None:
            try:
                await self._fire(state, owed)
            except Exception as exc:  # as in `_fire_due`: reported, and the state still saved
                self._log.error("schedule.fire_failed", schedule=state.spec.id, error=str(exc))
                self._missed(state, owed, "error", error=describe(exc))
        await self._save(state, record=not paused_now)

    def _check_action(self, spec: ScheduleSpec, where: str) -> None:
        """Refuse now what would fail at every fire: an unknown task, args that do not fit
        it, a queue without workers."""
        if spec.task is None:
            return
        definition = self.registry.find(spec.task)
        if definition is None:
            raise InvalidScheduleError(f"{where}task: no task named {spec.task!r} is registered")
        try:
            definition.check_args(spec.args)
        except ValueError as exc:
            raise InvalidScheduleError(f"{where}args: {exc}") from None
        queue = spec.queue or definition.queue
        if queue not in self.queue.config.queues:
            raise InvalidScheduleError(f"{where}queue: {queue!r} has no workers; configured: "
                                       f"{', '.join(self.queue.config.queues)}")

    def _editable(self, schedule_id: str, action: str) -> ScheduleState:
        state = self.get(schedule_id)
        if state.source != "api":
            where = ("retime it by its key in agentd.toml" if state.source == "builtin"
                     else "change it there")
            raise TaskStateError(
                f"cannot {action} schedule {schedule_id!r}: {_owner(schedule_id, state.source)} "
                f"declares it; {where} (pause and resume work on every schedule)")
        return state

    @contextlib.contextmanager
    def _writing_to(self, schedule_id: str) -> Iterator[None]:
        """Count a write of the schedule as it begins and as it ends (see `_reload`)."""
        self._writes[schedule_id] = self._writes.get(schedule_id, 0) + 1
        self._writing[schedule_id] = self._writing.get(schedule_id, 0) + 1
        try:
            yield
        finally:
            # Counted again: a write under way as a read began, and over before the read's
            # rows were looked at, may have committed after the read's snapshot. Unseen,
            # it would have looked like a schedule deleted elsewhere (a new one was dropped,
            # and never fired, when the lead was taken as it was created).
            self._writes[schedule_id] = self._writes.get(schedule_id, 0) + 1
            self._writing[schedule_id] -= 1
            if not self._writing[schedule_id]:
                del self._writing[schedule_id]
                if schedule_id in self._recheck:
                    self._recheck.discard(schedule_id)
                    self._changed_elsewhere(schedule_id)

    async def _save(self, state: ScheduleState, record: bool = False) -> None:
        """Store the schedule; with `record`, only what firing changes (its definition and
        `paused` may have been changed meanwhile through another daemon's API)."""
        if self.schedules.get(state.spec.id) is not state:
            return  # deleted (or replaced) while this was being worked out: not written back
        with self._writing_to(state.spec.id):
            if record:
                await self.store.save_record(state, time.time())
            else:
                await self.store.save(state, time.time())


@dataclass(slots=True)
class _DueFires:
    """The fires from a schedule's `next_fire` up to now, sorted into on time and late: every
    on-time one; the late ones counted, and the latest of them kept; and the first fire
    after now (the schedule's next `next_fire`)."""

    on_time: list[float] = field(default_factory=list)
    late_tail: list[float] = field(default_factory=list)  # the latest late ones, in order
    late_count: int = 0
    next_fire: float | None = None
    approximate: bool = False


def _due_fires(spec: ScheduleSpec, start: float | None, now: float, keep: int) -> _DueFires:
    """Sort the fires in [start, now] by lateness, keeping the latest `keep` (>= 1) late ones.

    A late fire is one more than `grace` seconds old. Long stretches of late fires are
    crossed without listing them: exactly for interval schedules, by estimate for cron
    ones (then `approximate`)."""
    trigger, cutoff = spec.trigger(), now - spec.grace
    due, tail = _DueFires(), deque[float](maxlen=keep)
    cursor = start
    if spec.every and cursor is not None and cursor < cutoff:
        jump = int((cutoff - cursor) // spec.every) - keep - 1
        if jump > 0:
            cursor, due.late_count = cursor + jump * spec.every, jump
    walked = 0
    while cursor is not None and cursor <= now:
        if cursor < cutoff:
            due.late_count += 1
            tail.append(cursor)
        else:
            due.on_time.append(cursor)
        cursor, walked = _next_after(trigger, cursor), walked + 1
        if walked == _MAX_WALKED and cursor is not None and cursor < cutoff and start is not None:
            gap = max((cursor - start) / walked, 1e-3)
            probe = cutoff - 2 * (keep + 1) * gap
            if probe > cursor:
                jumped = _first_at_or_after(trigger, probe)
                if jumped is not None:
                    due.late_count += int((jumped - cursor) / gap)
                    cursor, due.approximate = jumped, True
    due.late_tail = list(tail)
    due.next_fire = cursor
    return due


def _first_at_or_after(trigger: Any, moment: float) -> float | None:
    found = trigger.get_next_fire_time(None, dt.datetime.fromtimestamp(moment, dt.UTC))
    return None if found is None else found.timestamp()


def _owner(schedule_id: str, source: DeclaredSource) -> str:
    """Who declares a schedule, for messages: a plugin's schedule ids are `<plugin>.<name>`."""
    if source == "plugin":
        return f"plugin {schedule_id.partition('.')[0]}"
    return {"config": "agentd.toml", "builtin": "agentd itself"}[source]


def _delete(schedule_id: str) -> Callable[[Connection], Any]:
    return lambda conn: conn.execute(_DELETE, (schedule_id,))


def _first_fire(spec: ScheduleSpec, now: float, fired_at: float | None = None) -> float | None:
    """The first fire time at or after `now`. A date's is the date itself, even when past, so
    a missed one-off is handled by the catch-up policy, unless it has fired (`fired_at`)."""
    if spec.at is not None:
        return None if fired_at is not None and fired_at >= spec.at else spec.at
    moment = spec.trigger().get_next_fire_time(None, dt.datetime.fromtimestamp(now, dt.UTC))
    return None if moment is None else moment.timestamp()


def _next_after(trigger: Any, fire_time: float) -> float | None:
    moment = dt.datetime.fromtimestamp(fire_time, dt.UTC)
    following = trigger.get_next_fire_time(moment, moment)
    return None if following is None else following.timestamp()
