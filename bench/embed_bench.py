"""Embedding throughput: how fast memory takes texts from many agents at once, beside what
the model itself does in batches, in the same run.

    PYTHONPATH=daemon python3 bench/embed_bench.py [--texts 2000] [--callers 64] [--runs 3]

The model is the default embedder (MiniLM int8 on onnxruntime, 2 threads). The texts are
sentences of 10-24 words drawn (seeded) from the whole words of the model's own tokenizer
vocabulary, so they are distinct, of realistic length, and no two are near duplicates.
Each phase runs `--runs` times on fresh texts (a text seen before would be a duplicate)
and reports the median:

- `model, batched`: the bare model, `embed()` on 64 texts at a time, one call after the
  other: the reference, what a hand-written loader gets.
- `model, one at a time`: the bare model on one text per call.
- `remember(), N callers`: `--callers` concurrent callers each calling `remember()` on
  their share of the texts, on a SqliteMemory in a temp dir (memory.db, sqlite-vec, the
  duplicate checks, the writes; the calls waiting at a moment are stored as one group):
  with `[memory] embed_batch` 64 (the default, texts of concurrent callers share a model
  call) and 1 (each text its own model call). While it runs, one recall every 0.5 s (its
  query embedded in a lane of its own) gives recall latency under that load, beside
  recall on the idle memory. The mean model batch leaves out the recalls' own calls.
- `remember_many(), 256 per call`: what `POST /v1/memory/batch` and `agentd memory import`
  do.

Texts/s is texts stored over wall time. Target (issue 21): `remember()` from 64 callers at
80 % or more of the model's batched texts/s. Prints a JSON line per phase and a markdown
table on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

from machine import BenchRun

MODEL_BATCH = 64
IMPORT_BATCH = 256
# Seconds between recalls under load: a probe, not a load of its own (each recall's query is
# a model call: at 20 a second they took a sixth of the model's time from the writes).
RECALL_EVERY = 0.5
PHASE_LIMIT = 300.0  # seconds any phase may take before the bench gives up on it


def main() -> int:
    args = parse_args()
    run = BenchRun("embed_bench")
    rows = asyncio.run(measure(args))
    for row in rows:
        run.emit({**row, "revision": run.revision})
    print_table(rows, args, run)
    return run.exit_code


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=2000, help="texts per phase and run (default 2000)")
    parser.add_argument("--callers", type=int, default=64, help="concurrent remember() callers (default 64)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each phase; the median is shown")
    args = parser.parse_args()
    if args.texts < args.callers or args.callers < 1 or args.runs < 1:
        parser.error("expected --texts >= --callers >= 1 and --runs >= 1")
    return args


class Sentences:
    """Distinct sentences of 10-24 whole words from the model's vocabulary, never repeated
    within a run of the bench."""

    def __init__(self, seed: int = 21) -> None:
        vocab = json.loads(resources.files("agentd").joinpath("models/minilm/tokenizer.json").read_text())
        words = [w for w in vocab["model"]["vocab"] if w.isalpha() and w.isascii() and len(w) >= 3]
        self.words = sorted(words)
        self.random = random.Random(seed)
        self.made = 0

    def take(self, count: int) -> list[str]:
        texts = []
        for _ in range(count):
            self.made += 1
            words = self.random.choices(self.words, k=self.random.randint(10, 24))
            texts.append(f"{' '.join(words).capitalize()} ({self.made}).")
        return texts


async def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    from agentd.embed import MiniLMEmbedder

    model = MiniLMEmbedder()
    sentences = Sentences()
    await model.embed(sentences.take(MODEL_BATCH))  # load the model before any clock runs
    rows = []

    async def model_batched(texts: list[str]) -> dict[str, Any]:
        for start in range(0, len(texts), MODEL_BATCH):
            await model.embed(texts[start:start + MODEL_BATCH])
        return {}

    async def model_alone(texts: list[str]) -> dict[str, Any]:
        for text in texts:
            await model.embed([text])
        return {}

    rows.append(await phase("model, batched (64 per call)", model_batched, sentences, args.texts, args.runs))
    rows.append(await phase("model, one text per call", model_alone, sentences, args.texts // 4, args.runs))
    with tempfile.TemporaryDirectory(prefix="agentd-embed-") as tmp:
        for embed_batch in (64, 1):
            texts = args.texts if embed_batch > 1 else args.texts // 4
            remember = Remember(Path(tmp) / f"batch{embed_batch}", model, embed_batch, args.callers,
                                sentences)
            rows.append(await phase(f"remember(), {args.callers} callers, embed_batch {embed_batch}",
                                    remember.run, sentences, texts, args.runs, setup=remember.open,
                                    teardown=remember.close))
        importer = Remember(Path(tmp) / "import", model, 64, 1, sentences)
        rows.append(await phase(f"remember_many(), {IMPORT_BATCH} per call", importer.import_texts,
                                sentences, args.texts, args.runs, setup=importer.open,
                                teardown=importer.close))
    reference = rows[0]["texts_per_s"]
    for row in rows:
        row["of_model_batched"] = round(row["texts_per_s"] / reference, 3)
    return rows


class Remember:
    """A SqliteMemory in `folder` on `model`, written by `callers` concurrent callers."""

    def __init__(self, folder: Path, model: Any, embed_batch: int, callers: int,
                 sentences: Sentences) -> None:
        self.folder = folder
        self.model = model
        self.embed_batch = embed_batch
        self.callers = callers
        self.sentences = sentences
        self.memory: Any = None

    async def open(self) -> None:
        from agentd.memory import SqliteMemory
        from agentd.testing import make_config

        self.folder.mkdir(parents=True, exist_ok=True)
        config = make_config(self.folder, overrides={"memory": {"embed_batch": self.embed_batch}})
        self.memory = SqliteMemory(config.memory, config.store, self.folder / "memory.db", self.model)
        await self.memory.open()
        # Something to recall, and the idle recall figure.
        await self.memory.remember_many([_new(text) for text in self.sentences.take(200)])

    async def close(self) -> None:
        await self.memory.close()  # MiniLM has no close: the next phase uses it on

    async def run(self, texts: list[str]) -> dict[str, Any]:
        idle = [await self._timed_recall() for _ in range(20)]
        shares = [texts[i::self.callers] for i in range(self.callers)]
        created = 0

        async def caller(share: list[str]) -> None:
            nonlocal created
            for text in share:
                _, new = await self.memory.remember(text)
                created += new

        loaded: list[float] = []
        done = asyncio.Event()
        recalls = asyncio.ensure_future(self._recall_until(done, loaded))
        await asyncio.gather(*(caller(share) for share in shares))
        done.set()
        await recalls
        return {"created": created, "recall_idle_p50_ms": _ms(statistics.median(idle)),
                "recall_loaded_p50_ms": _ms(_pct(loaded, 50)), "recall_loaded_p99_ms": _ms(_pct(loaded, 99)),
                "recalls_loaded": len(loaded), "mean_model_batch": self._mean_batch(len(idle) + len(loaded))}

    def _mean_batch(self, recalls: int) -> float:
        """Texts per model call for the texts stored: each recall here was a call of its
        own with its one query (one recall at a time), left out."""
        batcher = self.memory.batcher
        return round((batcher.texts_embedded - recalls) / max(batcher.model_calls - recalls, 1), 1)

    async def import_texts(self, texts: list[str]) -> dict[str, Any]:
        created = 0
        for start in range(0, len(texts), IMPORT_BATCH):
            results = await self.memory.remember_many([_new(t) for t in texts[start:start + IMPORT_BATCH]])
            created += sum(new for _, new in results)
        return {"created": created}

    async def _timed_recall(self) -> float:
        began = time.perf_counter()
        await self.memory.recall(self.sentences.take(1)[0], k=10)
        return time.perf_counter() - began

    async def _recall_until(self, done: asyncio.Event, seconds: list[float]) -> None:
        while not done.is_set() and len(seconds) < 10_000:
            seconds.append(await self._timed_recall())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), RECALL_EVERY)


def _new(text: str) -> Any:
    from agentd.memory import NewMemory

    return NewMemory(text)


async def phase(name: str, body: Callable[[list[str]], Awaitable[dict[str, Any]]], sentences: Sentences,
                count: int, runs: int, setup: Callable[[], Awaitable[None]] | None = None,
                teardown: Callable[[], Awaitable[None]] | None = None) -> dict[str, Any]:
    """Run `body` on `count` fresh texts `runs` times; the median run's figures."""
    results = []
    for _ in range(runs):
        if setup is not None:
            await setup()
        texts = sentences.take(count)
        began = time.perf_counter()
        extra = await asyncio.wait_for(body(texts), PHASE_LIMIT)
        wall = time.perf_counter() - began
        if teardown is not None:
            await teardown()
        results.append({"texts_per_s": round(count / wall, 1), **extra})
        print(f"  {name}: {results[-1]}", file=sys.stderr)
    results.sort(key=lambda row: row["texts_per_s"])
    median = results[len(results) // 2]
    return {"phase": name, "texts": count, "runs": runs, **median,
            "texts_per_s_all": [row["texts_per_s"] for row in results]}


def _pct(samples: list[float], percent: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * percent / 100))]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace, run: BenchRun) -> None:
    out = sys.stderr
    print(f"\nEmbedding throughput, agentd {run.revision}, {args.texts} texts per phase (a quarter for "
          f"one-at-a-time phases), median of {args.runs} runs. {run.load.report()}\n", file=out)
    print("| phase | texts/s | of the model, batched | mean model batch | recall p50 / p99 under load |",
          file=out)
    print("| --- | ---: | ---: | ---: | ---: |", file=out)
    for row in rows:
        recall = (f"{row['recall_loaded_p50_ms']} / {row['recall_loaded_p99_ms']} ms (idle "
                  f"{row['recall_idle_p50_ms']} ms)" if "recall_loaded_p50_ms" in row else "")
        batch = row.get("mean_model_batch", "")
        print(f"| {row['phase']} | {row['texts_per_s']:,.0f} | {row['of_model_batched']:.0%} | {batch} "
              f"| {recall} |", file=out)


if __name__ == "__main__":
    sys.exit(main())
