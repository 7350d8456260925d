"""EmbeddingBatcher: the texts of concurrent callers go to the model together, a query goes
first, one refused text fails only its caller, a cancelled caller is dropped, and closing
fails what waits. The model here is a stand-in whose calls the test holds and releases."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest

from agentd.embed_batch import EmbeddingBatcher
from agentd.errors import EmbedderError, EmbedderInputError

WAIT = 5.0


class HeldModel:
    """An embedder whose first call waits for `release`; vectors are [len(text), 1.0]."""

    id = "held"
    dimension = 2

    def __init__(self, parallel_calls: int = 1) -> None:
        self.parallel_calls = parallel_calls
        self.calls: list[list[str]] = []
        self.busy = asyncio.Event()
        self.release = asyncio.Event()
        self.refuse: set[str] = set()  # texts answered with EmbedderInputError
        self.fail_with: Exception | None = None
        self.closed = False

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.calls.append(list(texts))
        self.busy.set()
        await self.release.wait()
        if self.fail_with is not None:
            raise self.fail_with
        if self.refuse & set(texts):
            raise EmbedderInputError(f"refused: {sorted(self.refuse & set(texts))}")
        return [[float(len(text)), 1.0] for text in texts]

    async def close(self) -> None:
        self.closed = True


async def until(condition: Callable[[], bool]) -> None:
    """Wait for `condition` (a queued call publishes nothing to wait on)."""

    async def poll() -> None:
        while not condition():  # noqa: ASYNC110 - nothing to wait on but the condition
            await asyncio.sleep(0)

    await asyncio.wait_for(poll(), WAIT)


async def queued(batcher: EmbeddingBatcher, count: int) -> None:
    """Wait until `count` texts wait for the model."""
    await until(lambda: batcher.queued == count)


async def hold_first_call(batcher: EmbeddingBatcher, model: HeldModel) -> asyncio.Task[list[list[float]]]:
    first = asyncio.ensure_future(batcher.embed(["first"]))
    await asyncio.wait_for(model.busy.wait(), WAIT)
    return first


async def test_callers_arriving_while_the_model_works_share_its_next_call() -> None:
    model = HeldModel()
    batcher = EmbeddingBatcher(model, max_texts=64)
    first = await hold_first_call(batcher, model)
    later = [asyncio.ensure_future(batcher.embed([f"text {i}" * (i + 1)])) for i in range(10)]
    await queued(batcher, 10)
    model.release.set()
    assert await first == [[5.0, 1.0]]
    results = await asyncio.gather(*later)
    assert results == [[[float(len(f"text {i}" * (i + 1))), 1.0]] for i in range(10)]
    assert model.calls == [["first"], [f"text {i}" * (i + 1) for i in range(10)]]
    assert (batcher.model_calls, batcher.texts_embedded) == (2, 11)


async def test_a_call_holds_at_most_max_texts_and_never_splits_a_caller() -> None:
    model = HeldModel()
    batcher = EmbeddingBatcher(model, max_texts=4)
    first = await hold_first_call(batcher, model)
    pairs = [asyncio.ensure_future(batcher.embed([f"a{i}", f"b{i}"])) for i in range(3)]
    large = asyncio.ensure_future(batcher.embed([f"c{i}" for i in range(6)]))
    await queued(batcher, 12)
    model.release.set()
    await asyncio.gather(first, *pairs, large)
    assert model.calls == [["first"], ["a0", "b0", "a1", "b1"], ["a2", "b2"], [f"c{i}" for i in range(6)]]


async def test_queries_do_not_wait_for_the_texts_call_under_way_and_share_a_call() -> None:
    model = HeldModel()
    batcher = EmbeddingBatcher(model, max_texts=2)
    first = await hold_first_call(batcher, model)
    bulk = asyncio.ensure_future(batcher.embed(["m1", "m2", "m3", "m4"]))
    await queued(batcher, 4)
    query = asyncio.ensure_future(batcher.embed(["what is it?"], query=True))
    # Its own lane: called while the texts' call is held, the bulk still queued behind it.
    await until(lambda: len(model.calls) == 2)
    assert model.calls == [["first"], ["what is it?"]] and batcher.queued == 4
    more = [asyncio.ensure_future(batcher.embed([f"q{i}"], query=True)) for i in range(3)]
    await queued(batcher, 7)
    model.release.set()
    await asyncio.gather(first, bulk, query, *more)
    assert sorted(map(tuple, model.calls[2:])) == [("m1", "m2", "m3", "m4"), ("q0", "q1"), ("q2",)]


async def test_a_refused_text_fails_only_its_own_caller() -> None:
    model = HeldModel()
    batcher = EmbeddingBatcher(model)
    first = await hold_first_call(batcher, model)
    model.refuse = {"too long"}
    good = asyncio.ensure_future(batcher.embed(["fine"]))
    refused = asyncio.ensure_future(batcher.embed(["too long"]))
    also_good = asyncio.ensure_future(batcher.embed(["fine too"]))
    await queued(batcher, 3)
    model.release.set()
    await first
    assert await good == [[4.0, 1.0]] and await also_good == [[8.0, 1.0]]
    with pytest.raises(EmbedderInputError, match="too long"):
        await refused
    # The batch, then each caller of it alone.
    assert model.calls[1:] == [["fine", "too long", "fine too"], ["fine"], ["too long"], ["fine too"]]


async def test_any_other_failure_fails_the_whole_batch_and_the_next_call_goes_on() -> None:
    model = HeldModel()
    batcher = EmbeddingBatcher(model)
    first = await hold_first_call(batcher, model)
    callers = [asyncio.ensure_future(batcher.embed([f"t{i}"])) for i in range(3)]
    await queued(batcher, 3)
    model.fail_with = RuntimeError("the model's process died")
    model.release.set()
    for caller in (first, *callers):
        with pytest.raises(EmbedderError, match="'held' failed: RuntimeError: the model's process died"):
            await caller
    assert len(model.calls) == 2
    model.fail_with = None
    assert await batcher.embed(["again"]) == [[5.0, 1.0]]


async def test_a_cancelled_caller_is_dropped_from_its_batch() -> None:
    model = HeldModel()
    batcher = EmbeddingBatcher(model)
    first = await hold_first_call(batcher, model)
    kept = asyncio.ensure_future(batcher.embed(["kept"]))
    gone = asyncio.ensure_future(batcher.embed(["gone"]))
    await queued(batcher, 2)
    gone.cancel()
    await queued(batcher, 1)
    model.release.set()
    await first
    assert await kept == [[4.0, 1.0]]
    assert model.calls == [["first"], ["kept"]]


async def test_calls_run_side_by_side_up_to_the_embedders_parallel_calls() -> None:
    model = HeldModel(parallel_calls=2)
    batcher = EmbeddingBatcher(model)
    one = asyncio.ensure_future(batcher.embed(["one"]))
    await asyncio.wait_for(model.busy.wait(), WAIT)
    two = asyncio.ensure_future(batcher.embed(["two"]))
    await until(lambda: len(model.calls) == 2)
    three = asyncio.ensure_future(batcher.embed(["three"]))
    # Two calls are under way, both held: the third text waits for one of them.
    await queued(batcher, 1)
    assert model.calls == [["one"], ["two"]]
    model.release.set()
    await asyncio.gather(one, two, three)
    assert model.calls == [["one"], ["two"], ["three"]]


async def test_closing_fails_what_waits_and_closes_the_embedder() -> None:
    model = HeldModel()
    batcher = EmbeddingBatcher(model)
    first = await hold_first_call(batcher, model)
    waiting = asyncio.ensure_future(batcher.embed(["waiting"]))
    await queued(batcher, 1)
    await batcher.close()
    with pytest.raises(EmbedderError, match="memory closed while this text was being embedded"):
        await first
    with pytest.raises(EmbedderError, match="memory closed before this text was embedded"):
        await waiting
    with pytest.raises(EmbedderError, match="memory is closing"):
        await batcher.embed(["late"])
    assert model.closed


async def test_nothing_to_embed_calls_no_model_and_a_bad_size_is_refused() -> None:
    model = HeldModel()
    assert await EmbeddingBatcher(model).embed([]) == []
    assert model.calls == []
    with pytest.raises(ValueError, match="max_texts: expected at least 1, got 0"):
        EmbeddingBatcher(model, max_texts=0)


async def test_a_caller_asking_again_as_soon_as_it_is_answered_is_embedded() -> None:
    """The runner that answered a caller leaves its lane in the same step as it finds the
    lane empty: the caller, woken before the runner's done callbacks ran, asked again at
    once, found the one runner slot taken by a finished runner, and waited for ever."""
    model = HeldModel(parallel_calls=1)
    model.release.set()
    batcher = EmbeddingBatcher(model)
    async with asyncio.timeout(WAIT):
        for text in ("one", "two", "three"):
            assert await batcher.embed([text]) == [[float(len(text)), 1.0]]
        assert await batcher.embed(["query"], query=True) == [[5.0, 1.0]]
        assert await batcher.embed(["again"], query=True) == [[5.0, 1.0]]
    assert model.calls == [["one"], ["two"], ["three"], ["query"], ["again"]]
