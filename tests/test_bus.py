"""The bus: topic grammar, ids, subscriptions, bounded buffers and failing callbacks."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from structlog.testing import capture_logs

from agentd.bus import Bus
from agentd.errors import PatternError
from agentd.events import LAGGED_TOPIC, Event, TopicPattern, validate_topic
from agentd.spawn import Spawner

# --------------------------------------------------------------------------- grammar


@pytest.mark.parametrize(
    ("pattern", "topic", "matches"),
    [
        ("task.started", "task.started", True),
        ("task.started", "task.succeeded", False),
        ("task.started", "task", False),
        ("task.*", "task.started", True),
        ("task.*", "task", False),
        ("task.*", "task.a.b", False),
        ("*.started", "task.started", True),
        ("*", "task", True),
        ("*", "task.started", False),
        ("task.**", "task", True),
        ("task.**", "task.started", True),
        ("task.**", "task.a.b", True),
        ("task.**", "tasks.a", False),
        ("task.**", "other.task", False),
        ("**", "a", True),
        ("**", "a.b.c", True),
        ("a.**.z", "a.z", True),
        ("a.**.z", "a.b.c.z", True),
        ("a.**.z", "a.b.c", False),
        ("**.failed", "handler.failed", True),
        ("**.failed", "failed", True),
        ("**.failed", "handler.failed.more", False),
        ("a.*.**", "a", False),
        ("a.*.**", "a.b", True),
        ("my-plugin.on_1", "my-plugin.on_1", True),
    ],
)
def test_topic_grammar(pattern: str, topic: str, matches: bool) -> None:
    assert TopicPattern.parse(pattern).matches(topic) is matches
    bus = Bus()
    seen: list[str] = []
    bus.subscribe(pattern, lambda e: seen.append(e.topic))
    bus.publish(topic)
    assert seen == ([topic] if matches else [])


@pytest.mark.parametrize("topic", ["", "a..b", ".a", "a.", "a b", "a.*", "**", "a/b", "tâche", None, 3])
def test_bad_topics_raise_pattern_error(topic: object) -> None:
    with pytest.raises(PatternError):
        validate_topic(topic)
    with pytest.raises(PatternError):
        Bus().publish(topic)  # type: ignore[arg-type]


@pytest.mark.parametrize("pattern", ["", "a..b", "a.**b", "a*", "***", "a.b c", ".", None])
def test_bad_patterns_raise_pattern_error(pattern: object) -> None:
    with pytest.raises(PatternError):
        TopicPattern.parse(pattern)  # type: ignore[arg-type]
    with pytest.raises(PatternError):
        Bus().subscribe(pattern)  # type: ignore[arg-type]


def test_pattern_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="segment 'b c'"):
        TopicPattern.parse("a.b c")


# --------------------------------------------------------------------------- events


def test_event_ids_strictly_increase() -> None:
    bus = Bus()
    ids = [bus.publish("tick").id for _ in range(2000)]
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert bus.last_id == ids[-1]


def test_ids_continue_after_a_larger_last_id() -> None:
    huge = 10**18  # far past the wall clock in microseconds
    bus = Bus(last_id=huge)
    assert bus.publish("a").id == huge + 1
    assert bus.publish("b").id == huge + 2


def test_publish_carries_data_and_ids() -> None:
    bus = Bus()
    got: list[Event] = []
    bus.subscribe("order.**", got.append)
    event = bus.publish("order.placed", {"n": 1}, correlation_id="req-1", causation_id="evt-0")
    assert got == [event]
    assert event.topic == "order.placed"
    assert dict(event.data) == {"n": 1}
    assert event.correlation_id == "req-1"
    assert event.causation_id == "evt-0"
    as_dict = event.to_dict()
    assert as_dict["id"] == event.id
    assert as_dict["correlation_id"] == "req-1"
    assert as_dict["causation_id"] == "evt-0"
    assert as_dict["data"] == {"n": 1}
    assert bus.publish("order.placed").data == {}


def test_stats_count_published_and_subscriptions() -> None:
    bus = Bus()
    sub = bus.subscribe("a", maxsize=1)
    for _ in range(3):
        bus.publish("a")
    assert bus.stats() == {"subscriptions": 1, "published": 3, "dropped": 2}
    sub.unsubscribe()
    assert bus.stats()["subscriptions"] == 0


# --------------------------------------------------------------------------- subscriptions


def test_unsubscribe_stops_delivery() -> None:
    bus = Bus()
    got: list[str] = []
    sub = bus.subscribe("a.*", lambda e: got.append(e.topic))
    bus.publish("a.one")  # also fills the per-topic cache, which unsubscribe must invalidate
    sub.unsubscribe()
    sub.unsubscribe()  # idempotent
    bus.publish("a.one")
    bus.publish("a.two")
    assert got == ["a.one"]
    assert sub.closed is True


def test_subscribing_after_a_publish_invalidates_the_cache() -> None:
    bus = Bus()
    bus.publish("a")
    got: list[str] = []
    bus.subscribe("a", lambda e: got.append(e.topic))
    bus.publish("a")
    assert got == ["a"]


def test_the_per_topic_cache_stays_bounded_when_topics_are_made_per_item() -> None:
    bus = Bus()
    got: list[str] = []
    bus.subscribe("news.*", lambda e: got.append(e.topic))
    for n in range(5000):
        bus.publish(f"news.item{n}")
    assert len(got) == 5000
    assert len(bus._by_topic) <= 4096  # one entry per topic ever published, without the bound


def test_a_keyed_subscription_gets_only_its_correlations_events() -> None:
    bus = Bus()
    mine: list[tuple[str, str | None]] = []
    everyone: list[str | None] = []
    keyed = bus.subscribe("task.**", lambda e: mine.append((e.topic, e.correlation_id)),
                          correlation_id="7")
    bus.subscribe("task.**", lambda e: everyone.append(e.correlation_id))
    bus.publish("task.token", {"text": "a"}, correlation_id="7")
    bus.publish("task.token", {"text": "b"}, correlation_id="8")
    bus.publish("task.token", {"text": "c"})
    bus.publish("other.topic", correlation_id="7")  # its correlation, not its pattern
    assert mine == [("task.token", "7")]
    assert everyone == ["7", "8", None]
    assert bus.stats()["subscriptions"] == 2
    keyed.unsubscribe()
    bus.publish("task.token", correlation_id="7")
    assert mine == [("task.token", "7")]
    assert bus.stats()["subscriptions"] == 1


def test_a_keyed_subscription_counts_as_a_subscriber_of_its_topics() -> None:
    bus = Bus()
    assert not bus.has_subscribers("task.token")
    sub = bus.subscribe("task.**", correlation_id="7")
    other = bus.subscribe("task.**", correlation_id="8")
    assert bus.has_subscribers("task.token")
    assert not bus.has_subscribers("news.new")
    sub.unsubscribe()
    assert bus.has_subscribers("task.token")  # the other one still uses the pattern
    other.unsubscribe()
    assert not bus.has_subscribers("task.token")


def test_accepts_narrows_a_pattern_and_is_asked_once_per_topic() -> None:
    bus = Bus()
    asked: list[str] = []
    got: list[str] = []

    def accepts(topic: str) -> bool:
        asked.append(topic)
        return topic != "a.skip"

    bus.subscribe("a.*", lambda e: got.append(e.topic), accepts=accepts)
    for _ in range(3):
        bus.publish("a.keep")
        bus.publish("a.skip")
    assert got == ["a.keep"] * 3
    assert sorted(asked) == ["a.keep", "a.skip"]
    assert bus.has_subscribers("a.keep")
    assert not bus.has_subscribers("a.skip") and not bus.has_subscribers("b")


def test_an_accepts_that_looks_at_another_bus_is_asked_again_when_that_bus_changes() -> None:
    """How the event feed on PostgreSQL takes a topic only while a stream asks for it: the
    second bus tells of each subscribe and unsubscribe, and the first asks again."""
    bus = Bus()
    streams = Bus(on_subscriptions_changed=bus.reconsider_accepts)
    forwarded: list[str] = []
    bus.subscribe("**", lambda e: forwarded.append(e.topic), accepts=streams.has_subscribers)
    assert not bus.has_subscribers("llm.token")
    bus.publish("llm.token")
    keyed = streams.subscribe("llm.*", maxsize=10, correlation_id="7")
    assert bus.has_subscribers("llm.token")
    bus.publish("llm.token")
    keyed.unsubscribe()
    assert not bus.has_subscribers("llm.token")
    with streams.subscribe("llm.**", maxsize=10):
        assert bus.has_subscribers("llm.token")
    assert not bus.has_subscribers("llm.token")
    assert forwarded == ["llm.token"]


def test_events_are_immutable() -> None:
    event = Bus().publish("a", {"n": 1})
    with pytest.raises(AttributeError):
        event.topic = "b"  # type: ignore[misc]
    assert event.topic == "a"


def test_an_event_built_by_hand_defaults_its_data_and_time() -> None:
    before = time.time()
    event = Event(id=7, topic="plugin.made")
    assert (event.data, event.correlation_id, event.causation_id) == ({}, None, None)
    assert before <= event.time <= time.time()
    assert Event(id=8, topic="x", time=5.0).time == 5.0


def test_callbacks_receive_in_publish_order() -> None:
    bus = Bus()
    got: list[int] = []
    bus.subscribe("n", lambda e: got.append(e.data["i"]))
    for i in range(5):
        bus.publish("n", {"i": i})
    assert got == [0, 1, 2, 3, 4]


def test_events_made_after_a_reserved_one_are_delivered_after_it() -> None:
    bus = Bus()
    seen: list[str] = []
    bus.subscribe("**", lambda e: seen.append(e.topic))
    first = bus.reserve_event("a.first")
    second = bus.reserve_event("a.second")
    bus.publish("a.live")
    assert seen == []  # a client that resumed after a.live would never get a.first
    bus.dispatch(second)
    assert seen == []
    bus.dispatch(first)
    assert seen == ["a.first", "a.second", "a.live"]
    bus.publish("a.after")
    assert seen[-1] == "a.after"


def test_a_released_reservation_lets_what_it_held_go() -> None:
    bus = Bus()
    seen: list[int] = []
    bus.subscribe("**", lambda e: seen.append(e.id))
    failed = bus.reserve_event("a.failed")
    kept = bus.reserve_event("a.kept")
    live = bus.publish("a.live")
    bus.dispatch(kept)
    assert seen == []
    bus.release(failed)
    assert seen == [kept.id, live.id]


async def test_an_event_published_while_held_events_go_out_waits_its_turn() -> None:
    """A callback may publish as it receives an event: a plugin handler refused by a full
    spawner publishes handler.dropped from inside the delivery. Published while the events a
    reservation held were going out, it went out before the rest of them, though its id is
    higher; a client that resumed from it never got those."""
    bus = Bus()
    spawner = Spawner(bus, max_running=1, max_waiting=0)
    gate = asyncio.Event()
    assert spawner.spawn(gate.wait(), name="busy") is not None

    async def handler() -> None:
        await gate.wait()

    bus.subscribe("a.*", lambda e: spawner.spawn(handler(), name="h"))
    seen: list[int] = []
    bus.subscribe("**", lambda e: seen.append(e.id))
    durable = bus.reserve_event("a.durable")
    bus.publish("a.one")
    bus.publish("a.two")
    bus.dispatch(durable)
    assert len(seen) == 6  # three events, each with its handler.dropped
    assert seen == sorted(seen)
    gate.set()
    await asyncio.wait_for(spawner.idle(), 5)


async def test_async_iteration() -> None:
    bus = Bus()
    sub = bus.subscribe("job.*", name="reader")
    received: list[str] = []

    async def consume() -> None:
        async for event in sub:
            received.append(event.topic)
            if event.topic == "job.done":
                sub.unsubscribe()

    consumer = asyncio.create_task(consume())
    bus.publish("job.started")
    bus.publish("other")
    bus.publish("job.done")
    await asyncio.wait_for(consumer, 5)
    assert received == ["job.started", "job.done"]
    bus.publish("job.after")  # after the loop unsubscribed: not delivered
    assert len(sub) == 0


async def test_waiting_iterator_ends_when_unsubscribed() -> None:
    bus = Bus()
    sub = bus.subscribe("x")
    waiting = asyncio.create_task(sub.get())
    await asyncio.sleep(0)  # let it park on its waiter (a yield, not a timed sleep)
    assert not waiting.done()
    sub.unsubscribe()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, 5)


async def test_buffered_events_survive_unsubscribe() -> None:
    bus = Bus()
    sub = bus.subscribe("x")
    bus.publish("x", {"i": 1})
    bus.publish("x", {"i": 2})
    sub.unsubscribe()
    assert [e.data["i"] async for e in sub] == [1, 2]


async def test_context_manager_unsubscribes() -> None:
    bus = Bus()
    with bus.subscribe("x") as sub:
        bus.publish("x")
        assert len(sub) == 1
        assert (await asyncio.wait_for(sub.get(), 5)).topic == "x"
    assert sub.closed
    bus.publish("x")
    assert len(sub) == 0
    assert bus.stats()["subscriptions"] == 0


async def test_bus_close_ends_every_iterator() -> None:
    bus = Bus()
    subs = [bus.subscribe("x") for _ in range(3)]
    waiting = [asyncio.create_task(s.get()) for s in subs]
    await asyncio.sleep(0)
    bus.close()
    for task in waiting:
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(task, 5)


def test_maxsize_must_be_positive() -> None:
    with pytest.raises(ValueError, match="maxsize"):
        Bus().subscribe("x", maxsize=0)


# --------------------------------------------------------------------------- bounded buffers


async def test_slow_iterator_never_blocks_the_publisher() -> None:
    bus = Bus()
    sub = bus.subscribe("tick", name="slow", maxsize=5)
    published = []
    for i in range(50):
        published.append(bus.publish("tick", {"i": i}))  # returns at once: publish is sync
        assert len(sub) <= 5
    assert len(sub) == 5
    assert sub.dropped == 45
    assert bus.stats()["dropped"] == 45

    lagged = await asyncio.wait_for(sub.get(), 5)
    assert lagged.topic == LAGGED_TOPIC
    assert lagged.data["dropped"] == 45
    assert lagged.data["resume_after"] == published[44].id  # the last one dropped
    assert lagged.data["subscription"] == "slow"
    rest = [sub.get_nowait() for _ in range(5)]
    assert [e.data["i"] for e in rest if e is not None] == [45, 46, 47, 48, 49]
    assert sub.get_nowait() is None


async def test_lag_marker_is_sent_once_per_lag() -> None:
    bus = Bus()
    sub = bus.subscribe("t", maxsize=2)
    events = [bus.publish("t", {"i": i}) for i in range(4)]
    first = sub.get_nowait()
    assert first is not None
    assert first.topic == LAGGED_TOPIC
    assert first.data["dropped"] == 2
    assert first.data["resume_after"] == events[1].id
    assert [sub.get_nowait().data["i"] for _ in range(2)] == [2, 3]  # type: ignore[union-attr]
    # A second lag reports only what it dropped since the first marker.
    more = [bus.publish("t", {"i": i}) for i in range(4, 7)]
    second = sub.get_nowait()
    assert second is not None
    assert second.topic == LAGGED_TOPIC
    assert second.data["dropped"] == 1
    assert second.data["resume_after"] == more[0].id
    assert sub.dropped == 3


def test_callbacks_are_not_buffered() -> None:
    bus = Bus()
    got: list[int] = []
    sub = bus.subscribe("t", lambda e: got.append(e.data["i"]), maxsize=1)
    for i in range(10):
        bus.publish("t", {"i": i})
    assert got == list(range(10))
    assert sub.dropped == 0
    assert len(sub) == 0


# --------------------------------------------------------------------------- failing callbacks


def test_a_failing_callback_is_logged_and_others_still_receive() -> None:
    got_before: list[int] = []
    got_after: list[int] = []
    with capture_logs() as logs:
        bus = Bus()
        bus.subscribe("t", lambda e: got_before.append(e.id), name="before")

        def explode(event: Event) -> None:
            raise RuntimeError("callback broke")

        bus.subscribe("t", explode, name="exploder")
        bus.subscribe("t", lambda e: got_after.append(e.id), name="after")
        event = bus.publish("t")
    assert got_before == [event.id]
    assert got_after == [event.id]
    failures = [entry for entry in logs if entry["event"] == "bus.callback_failed"]
    assert len(failures) == 1
    assert failures[0]["subscriber"] == "exploder"
    assert failures[0]["topic"] == "t"
    assert failures[0]["event_id"] == event.id
    assert failures[0]["log_level"] == "error"
    assert failures[0]["component"] == "bus"


def test_callback_name_defaults_to_its_qualname() -> None:
    def my_callback(event: Event) -> None:
        raise ValueError("x")

    with capture_logs() as logs:
        bus = Bus()
        bus.subscribe("t", my_callback)
        bus.publish("t")
    assert [e["subscriber"] for e in logs if e["event"] == "bus.callback_failed"] == [
        my_callback.__qualname__
    ]
