"""In-process pub/sub: publish never blocks, every subscriber has a bounded buffer.

Delivery is in memory and at most once; anything that must not be lost is a durable task.

A subscription is either a *callback* (called synchronously inside `publish`, so it must be
quick; async work belongs in `Spawner.spawn`) or an *iterator* with its own buffer of
`maxsize` events. A subscription may be keyed by a correlation id (`correlation_id=`):
it receives only that correlation's events, found by one lookup per event however many
keyed subscriptions there are (a task's stream is one: with thousands of agents streaming
tokens, a stream that sees every task's events costs each token a delivery per stream).
When an iterator's buffer is full, the oldest buffered event is dropped
and counted; the consumer then receives one `bus.lagged` event, before the events that
are still buffered, whose data says how many were dropped and the id of the last one
(`resume_after`), so it can re-read them from the event log. The publisher is never
blocked and the buffer never grows past `maxsize`.

Events are delivered in the order of their ids, which resuming streams rely on (a client
that saw id N asks the event log for what came after N). An event made ahead of its
delivery (`reserve_event`: a durable publish commits first) holds back the events made
after it until it is delivered or `release`d: delivering them first would let a client
resume past it.

Several daemons (PostgreSQL). A daemon's bus carries only the events published on that
daemon: its subscribers (plugin handlers, durable triggers, digests' counters, the
scheduler, the event log's recorder) never see another daemon's events, or a handler
running on every daemon would act once per daemon (a webhook sent N times). What another
daemon published reaches this one on a second `Bus`, `EventLog.streams`, which the event
log's feed fills in commit order with the log's ids (see agentd/eventlog.py and
agentd/postgres/events.py); SSE and WebSocket clients subscribe to that one. On SQLite
`EventLog.streams` is the daemon's bus itself.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

from agentd.errors import describe
from agentd.events import LAGGED_TOPIC, Event, Lagged, TopicFilter, validate_topic
from agentd.log import get_logger

Callback = Callable[[Event], None]
T = TypeVar("T")
# Given the newest buffered event and a new one, the one event standing for both, or None.
Merge = Callable[[Event, Event], Event | None]

DEFAULT_BUFFER = 1000
# Topics whose matching subscribers are remembered; the cache starts over past this many.
_TOPICS_CACHED = 4096


class Subscription:
    """A handle on one subscription: `unsubscribe()`, `async for event in sub`, `await sub.get()`."""

    def __init__(
        self,
        bus: Bus,
        pattern: TopicFilter,
        *,
        name: str,
        callback: Callback | None,
        maxsize: int,
        merge: Merge | None = None,
        accepts: Callable[[str], bool] | None = None,
        correlation_id: str | None = None,
    ) -> None:
        self.bus = bus
        self.pattern = pattern
        self.correlation_id = correlation_id
        self.accepts = accepts
        self.merge = merge
        self.name = name
        self.callback = callback
        self.maxsize = maxsize
        self.dropped = 0
        self.closed = False
        self._buffer: deque[Event] = deque()
        self._lag = 0
        self._last_dropped_id = 0
        self._waiter: asyncio.Future[None] | None = None
        # A keyed subscription's answers by topic: the bus asks it for each event of its
        # correlation (a stream's every token), and a pattern match costs more than a lookup.
        self._wanted: dict[str, bool] = {}

    def unsubscribe(self) -> None:
        """Stop receiving; a waiting iterator ends once its buffer is drained. Idempotent."""
        if not self.closed:
            self.closed = True
            self.bus._remove(self)
            self._wake()

    def wants(self, topic: str) -> bool:
        """Whether events of `topic` are delivered to this subscription."""
        return self.pattern.matches(topic) and (self.accepts is None or self.accepts(topic))

    def wants_remembered(self, topic: str) -> bool:
        """`wants(topic)`, asked once per topic (the answers kept up to a bound)."""
        wanted = self._wanted.get(topic)
        if wanted is None:
            if len(self._wanted) >= _TOPICS_CACHED:
                self._wanted.clear()
            wanted = self._wanted[topic] = self.wants(topic)
        return wanted

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *_: object) -> None:
        self.unsubscribe()

    def __len__(self) -> int:
        return len(self._buffer)

    def deliver(self, event: Event) -> None:
        """Called by the bus. Never blocks, never grows past `maxsize`."""
        if self.callback is not None:
            self.callback(event)
            return
        if self.merge is not None and len(self._buffer) * 2 >= self.maxsize:
            # Half full: fold the new event into the newest one where they combine (tokens),
            # so a slow reader loses granularity before it loses events.
            merged = self.merge(self._buffer[-1], event)
            if merged is not None:
                self._buffer[-1] = merged
                return
        if len(self._buffer) >= self.maxsize:
            dropped = self._buffer.popleft()
            self.dropped += 1
            self._lag += 1
            self._last_dropped_id = dropped.id
        self._buffer.append(event)
        self._wake()

    def get_nowait(self) -> Event | None:
        """The next event (or the lagged marker), or None when nothing is buffered."""
        if self._lag:
            marker = Lagged(
                id=self._last_dropped_id,
                topic=LAGGED_TOPIC,
                data={"dropped": self._lag, "resume_after": self._last_dropped_id,
                      "subscription": self.name},
            )
            self._lag = 0
            return marker
        return self._buffer.popleft() if self._buffer else None

    async def get(self) -> Event:
        """Wait for the next event. Raises StopAsyncIteration once unsubscribed and drained."""
        while True:
            event = self.get_nowait()
            if event is not None:
                return event
            if self.closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        return await self.get()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Bus:
    """Topic pub/sub for one process. See the module docstring for the delivery policy."""

    def __init__(self, last_id: int = 0, *,
                 on_subscriptions_changed: Callable[[], None] | None = None) -> None:
        self._last_id = last_id
        # Told after every subscribe and unsubscribe: whoever asks `has_subscribers` of this
        # bus to answer another bus's `accepts` (the event feed on PostgreSQL) re-asks then.
        self._on_subscriptions_changed = on_subscriptions_changed
        # A dict as an ordered set: O(1) removal with thousands of stream clients.
        self._subscriptions: dict[Subscription, None] = {}
        self._by_topic: dict[str, tuple[Subscription, ...]] = {}
        # Keyed subscriptions by correlation id, and how many of them use each pattern:
        # whether a topic has subscribers asks the few patterns, not every keyed one.
        self._by_correlation: dict[str, list[Subscription]] = {}
        self._keyed_patterns: dict[TopicFilter, int] = {}
        self._keyed_topics: dict[str, bool] = {}  # topic -> whether a keyed pattern matches it
        self._log = get_logger("bus")
        self.published = 0
        self._dropped_by_gone = 0
        # Ids of reserved events not yet delivered, and the events held back behind them
        # (a heap by id).
        self._reserved: set[int] = set()
        self._held: list[tuple[int, Event]] = []
        # Whether an event is going out now: one a callback publishes meanwhile (a handler
        # refused by a full spawner publishes handler.dropped) waits in _held for its turn,
        # or it would reach the subscribers after this one before the event it answers.
        self._delivering = False

    @property
    def last_id(self) -> int:
        return self._last_id

    @property
    def delivered_id(self) -> int:
        """The id up to which every event has gone out (or was released): where a stream
        subscribing now resumes from. Below `last_id` while a reserved event is still to go
        out, which a stream resuming after `last_id` would never get."""
        return min(self._reserved) - 1 if self._reserved else self._last_id

    def _next_id(self, now: float) -> int:
        """A new event id: strictly increasing, and close to the wall clock (`now`) in
        microseconds, so ids stay monotonic across restarts without storing a counter."""
        stamp = int(now * 1_000_000)
        self._last_id = stamp if stamp > self._last_id else self._last_id + 1
        return self._last_id

    def subscribe(
        self,
        pattern: str | Sequence[str],
        callback: Callback | None = None,
        *,
        name: str | None = None,
        maxsize: int = DEFAULT_BUFFER,
        merge: Merge | None = None,
        accepts: Callable[[str], bool] | None = None,
        correlation_id: str | None = None,
    ) -> Subscription:
        """Subscribe to topics matching `pattern`.

        Args:
            pattern: a topic pattern (`*` one segment, `**` any number), a comma-separated
                string of them, or a list.
            callback: called with each event inside `publish`; None for an iterator.
            name: shown in logs and lag markers; defaults to the callback's name.
            maxsize: the iterator's buffer bound (ignored for callbacks).
            merge: folds a new event into the newest buffered one once the buffer is half
                full (e.g. consecutive LLM tokens), before anything is dropped.
            accepts: a further test of a topic the pattern matches (asked once per topic,
                its answer remembered until `reconsider_accepts`), for what a pattern
                cannot say: "all but these", "while someone listens there".
            correlation_id: receive only events of this correlation (keyed: a subscription
                costs the events of other correlations nothing).

        Raises:
            PatternError: the pattern is malformed.
        """
        compiled = TopicFilter.parse(pattern)
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}")
        label = name or getattr(callback, "__qualname__", None) or f"subscriber:{compiled.text}"
        sub = Subscription(self, compiled, name=label, callback=callback, maxsize=maxsize, merge=merge,
                           accepts=accepts, correlation_id=correlation_id)
        self._subscriptions[sub] = None
        if correlation_id is None:
            self._by_topic.clear()
        else:
            self._by_correlation.setdefault(correlation_id, []).append(sub)
            if compiled not in self._keyed_patterns:
                self._keyed_topics.clear()
            self._keyed_patterns[compiled] = self._keyed_patterns.get(compiled, 0) + 1
        if self._on_subscriptions_changed is not None:
            self._on_subscriptions_changed()
        return sub

    def publish(
        self,
        topic: str,
        data: Mapping[str, Any] | None = None,
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> Event:
        """Deliver an event to every matching subscriber now; return it. Never blocks."""
        event = self.make_event(
            topic, data, correlation_id=correlation_id, causation_id=causation_id
        )
        self.dispatch(event)
        return event

    def make_event(
        self,
        topic: str,
        data: Mapping[str, Any] | None = None,
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> Event:
        """An event with the next id, not yet delivered (`dispatch` delivers it)."""
        validate_topic(topic)
        now = time.time()  # one clock reading for the event's time and its id
        return Event(self._next_id(now), topic, data if data is not None else {}, now,
                     correlation_id, causation_id)

    def reserve_event(
        self,
        topic: str,
        data: Mapping[str, Any] | None = None,
    ) -> Event:
        """An event to deliver later (`dispatch`), once what it needs has committed. Until it
        is delivered or `release`d, events made after it are held back: the caller must do
        one or the other, whatever happens (a `try`/`except BaseException`)."""
        event = self.make_event(topic, data)
        self._reserved.add(event.id)
        return event

    def release(self, event: Event) -> None:
        """Give up a reserved event that will not be delivered (its commit failed)."""
        self._reserved.discard(event.id)
        self._deliver_held()

    async def dispatch_once_committed(self, event: Event, commit: Awaitable[T]) -> T:
        """Run `commit` (what must be stored before the reserved `event` goes out), then
        deliver `event`, or release it if `commit` fails; return what `commit` returns.
        Shielded: a caller cancelled meanwhile (a WebSocket that closed, a stop) cannot
        stop a write the store's thread may commit anyway, and what committed goes out; a
        commit that fails once its caller has left is logged (`bus.publish_failed`)."""
        committing = asyncio.ensure_future(commit)

        def settle(done: asyncio.Future[T]) -> None:
            if done.cancelled() or done.exception() is not None:
                self.release(event)
            else:
                self.dispatch(event)

        committing.add_done_callback(settle)
        try:
            return await asyncio.shield(committing)
        except asyncio.CancelledError:
            if not committing.done():  # nobody is left to hear how it ends
                committing.add_done_callback(partial(self._log_unheard_failure, event))
            raise

    def _log_unheard_failure(self, event: Event, done: asyncio.Future[Any]) -> None:
        if not done.cancelled() and (exc := done.exception()) is not None:
            self._log.error("bus.publish_failed", topic=event.topic, event_id=event.id,
                            error=describe(exc), exc_info=exc)

    def advance_to(self, last_id: int) -> None:
        """Never hand out an id at or below `last_id` (the newest id stored before a restart)."""
        self._last_id = max(self._last_id, last_id)

    def reconsider_accepts(self) -> None:
        """Ask the unkeyed subscriptions' `accepts` again for each topic from the next event
        on: what it answers depends on something that changed."""
        self._by_topic.clear()

    def has_subscribers(self, topic: str) -> bool:
        """Whether an event of `topic` published now might reach anyone: a publisher may skip
        building the events of a busy topic that nobody takes. (A keyed subscription counts
        whatever its correlation.)"""
        if self._subscribers(topic):
            return True
        keyed = self._keyed_topics.get(topic)
        if keyed is None:
            keyed = any(pattern.matches(topic) for pattern in self._keyed_patterns)
            if len(self._keyed_topics) >= _TOPICS_CACHED:
                self._keyed_topics.clear()
            self._keyed_topics[topic] = keyed
        return keyed

    def dispatch(self, event: Event) -> None:
        """Deliver an already-built event, or hold it back while an event reserved before it
        is still to be delivered or another event is going out."""
        reserved = self._reserved
        if reserved:
            reserved.discard(event.id)
        if self._delivering or self._held or (reserved and min(reserved) < event.id):
            heapq.heappush(self._held, (event.id, event))
            self._deliver_held()
            return
        self._delivering = True
        try:
            self._deliver(event)
        finally:
            self._delivering = False
        if self._held:  # published by a subscriber as it received this one
            self._deliver_held()

    def _deliver_held(self) -> None:
        """Deliver the held events that no reserved event precedes any longer, in id order
        (unless an event is going out already: its delivery delivers them next)."""
        if self._delivering:
            return
        self._delivering = True
        try:
            while self._held and (not self._reserved or self._held[0][0] < min(self._reserved)):
                self._deliver(heapq.heappop(self._held)[1])
        finally:
            self._delivering = False

    def _deliver(self, event: Event) -> None:
        self.published += 1
        topic = event.topic
        by_correlation = self._by_correlation.get(event.correlation_id) if event.correlation_id else None
        # Who receives it is settled before anyone does: a callback that subscribes or
        # unsubscribes changes the next event's subscribers, not this one's.
        keyed = tuple(by_correlation) if by_correlation else ()
        for sub in self._subscribers(topic):
            try:
                sub.deliver(event)
            except Exception:
                self._callback_failed(sub, event)
        # A loop, not a generator joined to the topic's tuple: every token of every streamed
        # reply comes this way, to its one stream (the generator and the joined tuple were a
        # tenth of a token's publishing).
        for sub in keyed:
            if sub.wants_remembered(topic):
                try:
                    sub.deliver(event)
                except Exception:
                    self._callback_failed(sub, event)

    def _callback_failed(self, sub: Subscription, event: Event) -> None:
        self._log.exception("bus.callback_failed", subscriber=sub.name, topic=event.topic,
                            event_id=event.id)

    def _subscribers(self, topic: str) -> tuple[Subscription, ...]:
        subscribers = self._by_topic.get(topic)
        if subscribers is None:
            subscribers = tuple(s for s in self._subscriptions
                                if s.correlation_id is None and s.wants(topic))
            if len(self._by_topic) >= _TOPICS_CACHED:
                self._by_topic.clear()  # topics made per item (`news.<id>`) must not pile up
            self._by_topic[topic] = subscribers
        return subscribers

    def close(self) -> None:
        """End every subscription; iterators finish after draining their buffers."""
        for sub in list(self._subscriptions):
            sub.unsubscribe()

    def stats(self) -> dict[str, int]:
        return {
            "subscriptions": len(self._subscriptions),
            "published": self.published,
            "dropped": self._dropped_by_gone + sum(s.dropped for s in self._subscriptions),
        }

    def _remove(self, sub: Subscription) -> None:
        if self._subscriptions.pop(sub, 0) is not None:
            return
        self._dropped_by_gone += sub.dropped
        if sub.correlation_id is None:
            self._by_topic.clear()
        else:
            keyed = self._by_correlation[sub.correlation_id]
            keyed.remove(sub)
            if not keyed:
                del self._by_correlation[sub.correlation_id]
            left = self._keyed_patterns[sub.pattern] - 1
            if left:
                self._keyed_patterns[sub.pattern] = left
            else:
                del self._keyed_patterns[sub.pattern]
                self._keyed_topics.clear()
        if self._on_subscriptions_changed is not None:
            self._on_subscriptions_changed()
