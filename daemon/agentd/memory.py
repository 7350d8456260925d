"""Agent memory: short-term sessions (messages with a TTL) and long-term semantic memory
(texts with vectors, searched by meaning and, for hybrid recall, by keywords).

Two engines keep it, behind one contract (`MemoryStore`): memory.db beside the daemon
(`SqliteMemory`: sqlite-vec and FTS5, the default), or a PostgreSQL database with pgvector
that every daemon on it shares (`agentd.postgres.memory.PgMemory`: with `[store] url`, or
`[memory] url`). `agentd.storage.open_memory` picks the one the configuration names.

Long-term memories live in a namespace. On SQLite it is the vec0 partition key, so a
search within one costs a fraction of a full scan, and `[memory] filter_fields` are vec0
metadata columns: filters on them apply inside the KNN, so k results come back even when
most rows are filtered out; filters on other metadata keys apply after it, on an
over-fetched set. With `[memory] quantization = "binary"` (the default) the vector search
scans one bit per dimension (Hamming distance) and ranks the nearest candidates by exact
cosine from the float32 vectors kept beside them. Writing an exact duplicate (same text)
or a near duplicate (cosine similarity at least `dedupe_threshold`) in the same namespace
returns the existing memory.
`supersedes=` links a correction to what it replaces; the replaced one leaves the search.
Every change is kept in the memory's history (mem0's `history(memory_id)`), which goes
with the memory when it is forgotten or purged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import re
import struct
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import EllipsisType
from typing import Any, Protocol, TypeVar

from agentd.config import MemoryConfig, StoreConfig
from agentd.embed import Embedder
from agentd.embed_batch import EmbeddingBatcher
from agentd.errors import EmbedderMismatchError, MemoryBusyError, MemoryNotFoundError, UnstorableTextError
from agentd.log import get_logger
from agentd.metrics import RECALL_BUCKETS, Histogram
from agentd.ramindex import IndexChanges, Indexed, RamBitIndex
from agentd.store import Connection, Row
from agentd.store.sqlite import SqliteStore
from agentd.store.text import nul_at

T = TypeVar("T")

DEFAULT_NAMESPACE = "default"
# A memory's history (`memory_history`), in the column order of both engines' tables.
_RECORD_CHANGE = ("INSERT INTO memory_history (memory_id, event, text, old_text, metadata, "
                  "old_metadata, superseded_by, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_RECORD_SUPERSEDED = ("INSERT INTO memory_history (memory_id, event, text, metadata, superseded_by, at) "
                      "SELECT id, 'superseded', text, metadata, ?, ? FROM memories WHERE id = ?")
_RRF_K = 60
# `[memory] quantization = "binary"`: recall takes the candidates whose Hamming distance is
# within a sixteenth of the bits (24 at 384 dimensions) of its k-th nearest by Hamming, at
# most _CANDIDATES_PER_RESULT per result wanted (and sqlite-vec's limit, 4096), and ranks
# them by exact cosine. Measured with bench/memory_bench.py (docs/benchmarks.md).
_BINARY_MARGIN = 16
# A near-duplicate check skips the re-rank when even the nearest code differs from the new
# text's in more bits than a vector `dedupe_threshold` similar would flip: 2.5 times the
# expected share (angle / pi, as for random hyperplanes), at most half the bits. Measured on
# MiniLM: pairs at cosine >= 0.95 differed in at most 44 of 384 bits (the cut is 97), and a
# new sentence's nearest among 2,000 others in 110 or more.
_DUPLICATE_BITS_FACTOR = 2.5
_CANDIDATES_PER_RESULT = 40
_VEC0_K_MAX = 4096
# [memory] ram_index: the codes go to RAM once memory.db holds this many memories. Below it
# sqlite-vec's scan takes a few milliseconds (0.4 ms per 10,000 codes at k = 1) and numpy
# would cost a daemon's start 0.1 s and 15 MB for nothing.
RAM_INDEX_FROM = 10_000
_LOAD_ROWS = 10_000  # rows per fetch of the RAM index's load
_READERS = 2
_REPLANS = 5  # times a delete re-plans when correction chains change under it
MAX_MEMORY_BATCH = 1000  # memories per `remember_many` call (and per POST /v1/memory/batch)
# Keyword matches hybrid recall ranks at most, of those with every word and of the rest.
KEYWORD_CANDIDATES = 1000
_MIN_GROUP = 8  # a group may always hold this many calls (with `embed_batch` 1 too)


class ChainChangedError(Exception):
    """Raised inside a delete's write when its chains changed since it planned."""


NAME_PATTERN = r"[A-Za-z0-9_.:-]{1,128}"  # a namespace or a session id
_NAMESPACE = re.compile(NAME_PATTERN)


@dataclass(frozen=True, slots=True)
class Memory:
    """One long-term memory."""

    id: int
    namespace: str
    text: str
    metadata: dict[str, Any]
    created_at: float
    updated_at: float
    expires_at: float | None
    supersedes: int | None
    superseded_by: int | None

    @classmethod
    def _from_row(cls, row: Row) -> Memory:
        return cls(id=row["id"], namespace=row["namespace"], text=row["text"],
                   metadata=json.loads(row["metadata"]), created_at=row["created_at"],
                   updated_at=row["updated_at"], expires_at=row["expires_at"],
                   supersedes=row["supersedes"], superseded_by=row["superseded_by"])

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "namespace": self.namespace, "text": self.text,
                "metadata": self.metadata, "created_at": self.created_at,
                "updated_at": self.updated_at, "expires_at": self.expires_at,
                "supersedes": self.supersedes, "superseded_by": self.superseded_by}


@dataclass(frozen=True, slots=True)
class NewMemory:
    """One text for `remember_many`, with what `remember` takes beside it (a correction,
    `supersedes=`, is made one at a time with `remember`)."""

    text: str
    namespace: str = DEFAULT_NAMESPACE
    metadata: Mapping[str, Any] | None = None
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class CheckedMemory:
    """A memory to store that passed `check_memory`: its metadata also as JSON, and the
    digest of its text (the exact-duplicate key within a namespace)."""

    text: str
    namespace: str
    metadata: dict[str, Any]
    metadata_json: str
    digest: str
    expires_at: float | None


@dataclass(frozen=True, slots=True)
class Recalled:
    """A memory found by `recall`: `score` is its cosine similarity to the query (1 is the
    same meaning) for a vector recall, its reciprocal-rank-fusion score for a hybrid one;
    `distance` is the cosine distance (None for a keyword-only hybrid match)."""

    memory: Memory
    score: float
    distance: float | None

    def to_dict(self) -> dict[str, Any]:
        return {**self.memory.to_dict(), "score": self.score, "distance": self.distance}


@dataclass(frozen=True, slots=True)
class MemoryChange:
    """One entry of a memory's history: `created`, `updated` (with the text and metadata
    before), or `superseded` (by the correction `superseded_by`)."""

    id: int
    memory_id: int
    event: str
    text: str
    old_text: str | None
    metadata: dict[str, Any]
    old_metadata: dict[str, Any] | None
    superseded_by: int | None
    at: float

    @classmethod
    def _from_row(cls, row: Row | Mapping[str, Any]) -> MemoryChange:
        old = row["old_metadata"]
        return cls(id=row["id"], memory_id=row["memory_id"], event=row["event"], text=row["text"],
                   old_text=row["old_text"], metadata=json.loads(row["metadata"]),
                   old_metadata=None if old is None else json.loads(old),
                   superseded_by=row["superseded_by"], at=row["at"])

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "memory_id": self.memory_id, "event": self.event,
                "text": self.text, "old_text": self.old_text, "metadata": self.metadata,
                "old_metadata": self.old_metadata, "superseded_by": self.superseded_by,
                "at": self.at}


class Session:
    """The messages of one conversation; the session expires `ttl` seconds after its last
    message and is purged by the built-in `agentd.purge_memory` schedule."""

    def __init__(self, memory: MemoryStore, session_id: str) -> None:
        self._memory = memory
        self.id = check_name(session_id, "session id")

    async def append(self, role: str, content: str, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise ValueError("role must be a non-empty string and content a string")
        check_no_nul(role, "role")
        check_no_nul(content, "content")
        now = time.time()
        expires = now + self._memory.config.session_ttl
        meta_json = as_json(meta or {}, "meta")
        message_id = await self._memory.append_message(self.id, role, content, meta_json,
                                                        now=now, expires_at=expires)
        return {"id": message_id, "session_id": self.id, "role": role, "content": content,
                "meta": dict(meta or {}), "created_at": now}

    async def history(self, limit: int = 50) -> list[dict[str, Any]]:
        """The last `limit` messages, oldest first (none once the session has expired)."""
        rows = await self._memory.session_messages(self.id, time.time(), limit)
        return [{"id": r["id"], "session_id": r["session_id"], "role": r["role"],
                 "content": r["content"], "meta": json.loads(r["meta"]), "created_at": r["created_at"]}
                for r in reversed(rows)]

    async def clear(self) -> int:
        """Delete the session and its messages; return how many messages there were."""
        return await self._memory.clear_session(self.id)


class MemoryStore(Protocol):
    """Both kinds of memory on one engine (see the module docstring): what the daemon, its
    HTTP API and `ctx.memory` use. Every method raises ValueError for a malformed argument
    and MemoryNotFoundError for an id that names no memory."""

    config: MemoryConfig
    embedder: Embedder
    batcher: EmbeddingBatcher  # the embedder, shared by concurrent callers' texts
    grouped: RememberGroups  # concurrent remember() calls, stored a group at a time
    recall_seconds: Histogram  # how long each recall took, for /metrics

    @property
    def location(self) -> str:
        """Where memory lives, for logs and errors (a path, or a URL without its password)."""

    async def open(self, *, check_embedder: bool = True) -> None:
        """Open it and (unless `reembed` is to follow) check it holds vectors of this
        embedder.

        Raises:
            EmbedderMismatchError: the stored vectors were made by another embedder.
            StoreError: it cannot be opened (naming the file or URL).
        """

    async def close(self) -> None: ...

    def session(self, session_id: str) -> Session: ...

    async def append_message(self, session_id: str, role: str, content: str, meta_json: str, *,
                             now: float, expires_at: float) -> int:
        """Add a message, keeping the session alive until `expires_at`; its id. An expired
        session the purge has not reached yet is gone all the same: the message starts a
        fresh conversation."""

    async def session_messages(self, session_id: str, now: float, limit: int) -> Sequence[Row]:
        """The last `limit` messages of a session alive at `now`, newest first."""

    async def clear_session(self, session_id: str) -> int:
        """Delete a session and its messages; how many messages there were."""

    async def list_sessions(self, now: float, limit: int, prefix: str = "") -> list[dict[str, Any]]:
        """The sessions alive at `now` whose ids start with `prefix`, the most recently
        active first, at most `limit`: each `id`, `updated_at`, `expires_at`, `messages`."""

    async def remember(self, text: str, namespace: str = DEFAULT_NAMESPACE,
                       metadata: Mapping[str, Any] | None = None, expires_at: float | None = None,
                       supersedes: int | None = None) -> tuple[Memory, bool]:
        """Store `text`; return the memory and whether it is new (False: a duplicate's)."""

    async def remember_many(self, items: Sequence[NewMemory]) -> list[tuple[Memory, bool]]:
        """Store up to `MAX_MEMORY_BATCH` memories at once, as `remember` would one by one in that
        order (an item repeating an earlier one, exactly or nearly, gets that one's memory),
        with their texts embedded in batches and the new ones written in one transaction.
        Every item is checked before anything is stored: a ValueError names the first bad
        one (`memories[3]: ...`)."""

    async def recall(self, query: str, namespace: str = DEFAULT_NAMESPACE, k: int = 10,
                     where: Mapping[str, Any] | None = None, hybrid: bool = False) -> list[Recalled]:
        """The `k` memories nearest `query` in meaning within `namespace`, newest corrections
        only; `hybrid` fuses the vector ranking with a keyword ranking (reciprocal rank
        fusion). `where`: {field: value or [values]}."""

    async def get(self, memory_id: int) -> Memory: ...

    async def history(self, memory_id: int) -> list[MemoryChange]:
        """The memory's changes, oldest first."""

    async def update(self, memory_id: int, text: str | None = None,
                     metadata: Mapping[str, Any] | None = None,
                     expires_at: float | EllipsisType | None = ...) -> Memory:
        """Change a memory in place (its namespace stays); a new text is embedded again.
        `expires_at`: a new expiry, None to keep the memory for good, or left out (`...`)
        to keep its expiry as it is."""

    async def forget(self, memory_id: int | None = None, namespace: str | None = None,
                     where: Mapping[str, Any] | None = None) -> int:
        """Delete one memory by id, or every memory of a namespace matching `where`."""

    async def purge_expired(self) -> dict[str, int]:
        """Delete expired memories and expired sessions (with their messages)."""

    async def stats(self) -> dict[str, Any]: ...

    async def reembed(self, batch: int = 64) -> int:
        """Rebuild every vector with the current embedder (after `[memory] embedder` changed)."""


class SqliteMemory:
    """`MemoryStore` in memory.db, with sqlite-vec and FTS5."""

    def __init__(self, config: MemoryConfig, store_config: StoreConfig, path: Any,
                 embedder: Embedder) -> None:
        self.config = config
        self.embedder = embedder
        self.batcher = EmbeddingBatcher(embedder, config.embed_batch)
        self.grouped = RememberGroups(self)
        self.recall_seconds = Histogram(RECALL_BUCKETS)  # for /metrics
        # Two readers: recalls are vector searches that SQLite runs without the GIL, so two
        # agents recalling at once use two cores instead of queueing on one connection.
        self.store = SqliteStore(path, store_config, migrations="sql/memory", writes_in_thread=True,
                                 readers=_READERS, setting="[memory] path")
        self._fields = tuple(config.filter_fields)
        # The vector tables' layout once open. Bits come in bytes: an embedder whose dimension
        # is not a multiple of 8 (a toy or test model; real ones are) keeps the float layout.
        self._layout = config.quantization if embedder.dimension % 8 == 0 else "none"
        # [memory] ram_index: the binary codes scanned in RAM once loaded (agentd.ramindex).
        self._bits = RamBitIndex(self.store.path, store_config, embedder.dimension, self._fields,
                                 self._codes, start_from=RAM_INDEX_FROM) \
            if self._layout == "binary" and config.ram_index else None
        self._duplicate_bits = duplicate_bits(embedder.dimension, config.dedupe_threshold)
        self._log = get_logger("memory")

    async def open(self, *, check_embedder: bool = True) -> None:
        await self.store.open()
        if not check_embedder:
            return
        try:
            await self._check_embedder()
        except BaseException:
            await self.store.close()
            raise
        if self._bits is not None:
            # Counted up to the threshold only: a count of a million rows of 1.5 kB vectors
            # would read the whole table at every start.
            counted = await self.store.read_one(
                "SELECT count(*) AS n FROM (SELECT 1 FROM memory_embeddings LIMIT ?)",
                (self._bits.start_from,))
            self._bits.open(counted["n"] if counted is not None else 0)

    async def close(self) -> None:
        await self.batcher.close()
        if self._bits is not None:
            await self._bits.close()
        await self.store.close()

    async def _write(self, op: Callable[[Connection, IndexChanges], T]) -> T:
        """`store.write` for an op that changes the vector tables: the changes it collects
        reach the RAM index once it commits, in commit order (the writer settles its futures
        in that order, and a future's callbacks run in the order it was settled), and even
        if the caller is cancelled meanwhile (the write commits all the same)."""
        changes = IndexChanges()

        def run(conn: Connection) -> T:
            changes.clear()
            return op(conn, changes)

        written = self.store.write(run)
        bits = self._bits
        if bits is not None:
            written.add_done_callback(
                lambda done: None if done.cancelled() or done.exception() else bits.apply(changes))
        return await asyncio.shield(written)

    async def _check_embedder(self) -> None:
        rows = await self.store.read("SELECT key, value FROM meta")
        meta = {r["key"]: r["value"] for r in rows}
        wanted = {"embedder": self.embedder.id, "dimension": str(self.embedder.dimension),
                  "filter_fields": ",".join(self._fields)}
        if not meta:
            await self.store.write(lambda conn: self._create_vectors(conn, wanted))
            return
        check_recorded(meta, wanted, str(self.store.path), "the daemon")
        held = meta.get("quantization", "none")
        if held != self._layout:
            self._log.info("memory.relayout", path=str(self.store.path), held=held, configured=self._layout)
            began = time.perf_counter()
            count = await self.store.write(lambda conn: self._relayout(conn, held))
            self._log.info("memory.relayout.done", vectors=count,
                           seconds=round(time.perf_counter() - began, 2))

    def _create_vectors(self, conn: Connection, meta: Mapping[str, str],
                        changes: IndexChanges | None = None) -> None:
        """(Re)make the vector tables, empty, in the configured layout (`[memory]
        quantization`), and record `meta` with the layout in the `meta` table."""
        if changes is not None:
            changes.rebuild()
        columns = "".join(f", {name} TEXT" for name in self._fields)
        dimension = self.embedder.dimension
        conn.execute("DROP TABLE IF EXISTS memory_vectors")
        conn.execute("DROP TABLE IF EXISTS memory_embeddings")
        if self._layout == "binary":
            conn.execute(
                f"CREATE VIRTUAL TABLE memory_vectors USING vec0(id INTEGER PRIMARY KEY, "
                f"bits bit[{dimension}], namespace TEXT PARTITION KEY{columns})")
            conn.execute("CREATE TABLE memory_embeddings (id INTEGER PRIMARY KEY, embedding BLOB NOT NULL)")
        else:
            conn.execute(
                f"CREATE VIRTUAL TABLE memory_vectors USING vec0(id INTEGER PRIMARY KEY, "
                f"embedding float[{dimension}] distance_metric=cosine, "
                f"namespace TEXT PARTITION KEY{columns})")
        conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
                         "SET value = excluded.value", [*meta.items(), ("quantization", self._layout)])

    def _relayout(self, conn: Connection, held: str) -> int:
        """Rebuild the vector tables of layout `held` in the configured one from the float32
        vectors they keep (nothing is embedded again); the number of vectors."""
        fields = "".join(f", v.{name}" for name in self._fields)
        source = ("SELECT v.id, v.embedding, v.namespace{} FROM memory_vectors v" if held == "none" else
                  "SELECT v.id, e.embedding, v.namespace{} FROM memory_vectors v "
                  "JOIN memory_embeddings e ON e.id = v.id").format(fields)
        conn.execute("DROP TABLE IF EXISTS temp.memory_relayout")
        conn.execute(f"CREATE TEMP TABLE memory_relayout AS {source}")
        self._create_vectors(conn, {})
        names = "".join(f", {name}" for name in self._fields)
        if self._layout == "binary":
            conn.execute(f"INSERT INTO memory_vectors (id, bits, namespace{names}) "
                         f"SELECT id, vec_quantize_binary(embedding), namespace{names} FROM memory_relayout")
            conn.execute("INSERT INTO memory_embeddings (id, embedding) "
                         "SELECT id, embedding FROM memory_relayout")
        else:
            conn.execute(f"INSERT INTO memory_vectors (id, embedding, namespace{names}) "
                         f"SELECT id, embedding, namespace{names} FROM memory_relayout")
        count = int(conn.execute("SELECT count(*) FROM memory_relayout").fetchone()[0])
        conn.execute("DROP TABLE temp.memory_relayout")
        return count

    @property
    def location(self) -> str:
        return str(self.store.path)

    def session(self, session_id: str) -> Session:
        return Session(self, session_id)

    async def append_message(self, session_id: str, role: str, content: str, meta_json: str, *,
                             now: float, expires_at: float) -> int:
        def op(conn: Connection) -> int:
            conn.execute("DELETE FROM sessions WHERE id = ? AND expires_at <= ?", (session_id, now))
            conn.execute(
                "INSERT INTO sessions (id, expires_at, updated_at) VALUES (?, ?, ?) ON CONFLICT (id) "
                "DO UPDATE SET expires_at = excluded.expires_at, updated_at = excluded.updated_at",
                (session_id, expires_at, now))
            return int(conn.execute(
                "INSERT INTO messages (session_id, role, content, meta, created_at) "
                "VALUES (?, ?, ?, ?, ?)", (session_id, role, content, meta_json, now)).lastrowid or 0)

        return await self.store.write(op)

    async def session_messages(self, session_id: str, now: float, limit: int) -> Sequence[Row]:
        return await self.store.read(
            "SELECT m.* FROM messages m JOIN sessions s ON s.id = m.session_id "
            "WHERE m.session_id = ? AND s.expires_at > ? ORDER BY m.id DESC LIMIT ?",
            (session_id, now, limit))

    async def list_sessions(self, now: float, limit: int, prefix: str = "") -> list[dict[str, Any]]:
        rows = await self.store.read(
            "SELECT s.id, s.updated_at, s.expires_at, (SELECT count(*) FROM messages m "
            "WHERE m.session_id = s.id) AS messages FROM sessions s WHERE s.expires_at > ? "
            "AND substr(s.id, 1, ?) = ? ORDER BY s.updated_at DESC, s.id LIMIT ?",
            (now, len(prefix), prefix, limit))
        return [dict(row) for row in rows]

    async def clear_session(self, session_id: str) -> int:
        def op(conn: Connection) -> int:
            count = conn.execute(
                "SELECT count(*) FROM messages WHERE session_id = ?", (session_id,)).fetchone()[0]
            conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            return int(count)

        return await self.store.write(op)

    # -- long-term ---------------------------------------------------------------------------

    async def remember(self, text: str, namespace: str = DEFAULT_NAMESPACE,
                       metadata: Mapping[str, Any] | None = None, expires_at: float | None = None,
                       supersedes: int | None = None) -> tuple[Memory, bool]:
        """Store `text`; return the memory and whether it is new (False: a duplicate's)."""
        return await remember_one(self, check_memory(text, namespace, metadata, expires_at), supersedes)

    async def remember_many(self, items: Sequence[NewMemory]) -> list[tuple[Memory, bool]]:
        return await remember_checked(self, check_batch(items))

    async def _live_by_digest(self, namespace: str, digests: Sequence[str]) -> dict[str, Memory]:
        """The live memories of `namespace` whose texts have these digests, by digest."""
        found: dict[str, Memory] = {}
        for start in range(0, len(digests), 500):  # under SQLite's bound-parameter limit
            chunk = digests[start:start + 500]
            rows = await self.store.read(
                f"SELECT * FROM memories WHERE namespace = ? AND hash IN ({','.join('?' * len(chunk))}) "
                "AND superseded_by IS NULL AND (expires_at IS NULL OR expires_at > ?)",
                (namespace, *chunk, time.time()))
            found.update((row["hash"], Memory._from_row(row)) for row in rows)
        return found

    async def _insert(self, pairs: Sequence[tuple[CheckedMemory, list[float]]],
                      supersedes: int | None = None) -> list[tuple[Memory, bool]]:
        """Write new memories with their vectors in one transaction; each with whether it
        was written (False: the same text got in first, through another caller, and that
        memory is returned)."""
        now = time.time()
        filters = [self._filter_values(item.metadata) for item, _ in pairs]

        def op(conn: Connection, changes: IndexChanges) -> list[tuple[Row, bool]]:
            written: list[tuple[Row, bool]] = []
            for (item, vector), filter_values in zip(pairs, filters, strict=True):
                if supersedes is not None:
                    old = conn.execute("SELECT namespace FROM memories WHERE id = ?",
                                       (supersedes,)).fetchone()
                    if old is None or old[0] != item.namespace:
                        raise MemoryNotFoundError(
                            f"supersedes: no memory {supersedes} in namespace {item.namespace!r}")
                else:
                    # Checked before embedding, outside this transaction: another caller may
                    # have stored the same text since. Here, writes are serialised.
                    twin = conn.execute(
                        "SELECT * FROM memories WHERE namespace = ? AND hash = ? AND superseded_by IS NULL "
                        "AND (expires_at IS NULL OR expires_at > ?)",
                        (item.namespace, item.digest, now)).fetchone()
                    if twin is not None:
                        written.append((twin, False))
                        continue
                row: Row = conn.execute(
                    "INSERT INTO memories (namespace, text, metadata, hash, created_at, updated_at, "
                    "expires_at, supersedes) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
                    (item.namespace, item.text, item.metadata_json, item.digest, now, now,
                     item.expires_at, supersedes)).fetchone()
                self._index(conn, row["id"], item.namespace, item.text, vector=vector,
                            filters=filter_values, changes=changes)
                conn.execute(_RECORD_CHANGE, (row["id"], "created", item.text, None, item.metadata_json,
                                              None, None, now))
                if supersedes is not None:
                    conn.execute("UPDATE memories SET superseded_by = ? WHERE id = ?",
                                 (row["id"], supersedes))
                    conn.execute(_RECORD_SUPERSEDED, (row["id"], now, supersedes))
                    self._unindex(conn, supersedes, changes)
                written.append((row, True))
            return written

        return [(Memory._from_row(row), created) for row, created in await self._write(op)]

    async def recall(self, query: str, namespace: str = DEFAULT_NAMESPACE, k: int = 10,
                     where: Mapping[str, Any] | None = None, hybrid: bool = False) -> list[Recalled]:
        """`MemoryStore.recall`, its time observed in `recall_seconds`."""
        began = time.perf_counter()
        found = await self._recall(query, namespace, k, where, hybrid)
        self.recall_seconds.observe(time.perf_counter() - began)
        return found

    async def _recall(self, query: str, namespace: str, k: int, where: Mapping[str, Any] | None,
                      hybrid: bool) -> list[Recalled]:
        """The `k` memories nearest `query` in meaning within `namespace`, newest corrections
        only; `hybrid` fuses the vector ranking with FTS5 keyword ranking (reciprocal rank
        fusion). `where`: {field: value or [values]}."""
        namespace = check_recall(query, namespace, k)
        inside, after = self._split_filters(where or {})
        (vector,) = await self.batcher.embed([query], query=True)
        fetch = k if not after else k * 4
        # Hybrid fuses the spare rows' ranks too: their candidates must be chosen as well.
        knn = await self._knn(vector, fetch + 8, namespace, inside, near=None if hybrid else fetch)
        distances = dict(knn)
        vector_ranked = await self._live(list(distances), after)
        keyword_ranked = await self._keyword(query, namespace, fetch + 8, inside, after) if hybrid else None
        return fuse(vector_ranked, distances, keyword_ranked, k)

    async def get(self, memory_id: int) -> Memory:
        row = await self.store.read_one("SELECT * FROM memories WHERE id = ?", (memory_id,))
        if row is None:
            raise MemoryNotFoundError(f"no memory with id {memory_id}")
        return Memory._from_row(row)

    async def history(self, memory_id: int) -> list[MemoryChange]:
        await self.get(memory_id)
        rows = await self.store.read(
            "SELECT * FROM memory_history WHERE memory_id = ? ORDER BY id", (memory_id,))
        return [MemoryChange._from_row(row) for row in rows]

    async def update(self, memory_id: int, text: str | None = None,
                     metadata: Mapping[str, Any] | None = None,
                     expires_at: float | EllipsisType | None = ...) -> Memory:
        """Change a memory in place (its namespace stays); a new text is embedded again.
        `expires_at`: a new expiry, None to keep the memory for good, or left out (`...`)
        to keep its expiry as it is."""
        if expires_at is not ...:
            check_expiry(expires_at)
        current = await self.get(memory_id)
        new_text = current.text if text is None else check_text(text)
        new_meta_json = metadata_json(current.metadata if metadata is None else metadata)
        new_meta = json.loads(new_meta_json)
        vector = (await self.batcher.embed([new_text]))[0] if text is not None else None
        filters = self._filter_values(new_meta)
        now = time.time()

        def op(conn: Connection, changes: IndexChanges) -> Row:
            before = conn.execute("SELECT text, metadata FROM memories WHERE id = ?",
                                  (memory_id,)).fetchone()
            if before is None:
                raise MemoryNotFoundError(f"no memory with id {memory_id}")
            row: Row = conn.execute(
                "UPDATE memories SET text = ?, metadata = ?, hash = ?, updated_at = ?, "
                "expires_at = CASE WHEN ? THEN expires_at ELSE ? END WHERE id = ? RETURNING *",
                (new_text, new_meta_json, digest(new_text), now, expires_at is ...,
                 None if expires_at is ... else expires_at, memory_id)).fetchone()
            if changed(before["text"], before["metadata"], new_text, new_meta_json):
                conn.execute(_RECORD_CHANGE, (memory_id, "updated", new_text, before["text"],
                                              new_meta_json, before["metadata"], None, now))
            if row["superseded_by"] is None:
                if vector is not None:
                    self._unindex(conn, memory_id, changes)
                    self._index(conn, memory_id, current.namespace, new_text, vector=vector,
                                filters=filters, changes=changes)
                elif self._fields:
                    sets = ", ".join(f"{name} = ?" for name in self._fields)
                    conn.execute(f"UPDATE memory_vectors SET {sets} WHERE id = ?",
                                 (*filters, memory_id))
                    changes.retag(memory_id, filters)
            return row

        return Memory._from_row(await self._write(op))

    async def forget(self, memory_id: int | None = None, namespace: str | None = None,
                     where: Mapping[str, Any] | None = None) -> int:
        """Delete one memory by id, or every memory of a namespace matching `where`."""
        if memory_id is None and namespace is None:
            raise ValueError("give a memory id, or a namespace (with an optional where)")
        if memory_id is not None:
            ids = [memory_id]
            await self.get(memory_id)
        else:
            rows = await self.store.read("SELECT * FROM memories WHERE namespace = ?",
                                         (check_name(namespace or "", "namespace"),))
            ids = [r["id"] for r in rows if matches(json.loads(r["metadata"]), where or {})]

        return await self._delete(ids)

    async def purge_expired(self) -> dict[str, int]:
        """Delete expired memories and expired sessions (with their messages)."""
        now = time.time()
        expired = [r["id"] for r in await self.store.read(
            "SELECT id FROM memories WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))]
        memories = await self._delete(expired)
        sessions = await self.store.write(
            lambda conn: conn.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,)).rowcount)
        return {"memories": memories, "sessions": sessions}

    async def _delete(self, ids: Sequence[int]) -> int:
        """Delete memories and keep their correction chains whole: what a deleted memory
        superseded is linked to the deleted one's successor, or, when the deleted one was
        the newest, becomes the newest again (back in the search index).

        The plan is made from a read and the revived memories embedded before the write;
        should a chain change in between (a correction landing meanwhile), the write notices
        and the plan is made again."""
        return await delete_replanning(self._delete_once, ids)

    async def _delete_once(self, doomed: set[int]) -> int:
        marks = ",".join("?" * len(doomed))
        chain_sql = f"SELECT id, supersedes, superseded_by FROM memories WHERE id IN ({marks}) ORDER BY id"
        rows = {r["id"]: r for r in await self.store.read(chain_sql, tuple(doomed))}
        seen = [tuple(r) for r in rows.values()]
        relinks, revive = plan_delete(rows, doomed)
        revived = [Memory._from_row(r) for r in await self.store.read(
            f"SELECT * FROM memories WHERE id IN ({','.join('?' * len(revive))})", tuple(revive))]
        vectors = await self.batcher.embed([m.text for m in revived]) if revived else []

        def op(conn: Connection, changes: IndexChanges) -> int:
            if [tuple(r) for r in conn.execute(chain_sql, tuple(doomed))] != seen:
                raise ChainChangedError
            deleted = 0
            for one in doomed:
                self._unindex(conn, one, changes)
                deleted += conn.execute("DELETE FROM memories WHERE id = ?", (one,)).rowcount
            for original, successor in relinks.items():
                conn.execute("UPDATE memories SET superseded_by = ? WHERE id = ?", (successor, original))
                conn.execute("UPDATE memories SET supersedes = ? WHERE id = ?", (original, successor))
            for memory, vector in zip(revived, vectors, strict=True):
                still_live = conn.execute(
                    "SELECT 1 FROM memories WHERE id = ? AND superseded_by IS NULL", (memory.id,)).fetchone()
                if still_live:
                    self._unindex(conn, memory.id, changes)
                    self._index(conn, memory.id, memory.namespace, memory.text, vector=vector,
                                filters=self._filter_values(memory.metadata), changes=changes)
            return deleted

        return await self._write(op)

    async def stats(self) -> dict[str, Any]:
        rows = await self.store.read(
            "SELECT namespace, count(*) AS n FROM memories WHERE superseded_by IS NULL GROUP BY namespace")
        counts = await self.store.read_one(
            "SELECT (SELECT count(*) FROM sessions) AS sessions, (SELECT count(*) FROM messages) AS messages")
        return {"embedder": self.embedder.id, "dimension": self.embedder.dimension,
                "namespaces": {r["namespace"]: r["n"] for r in rows},
                "sessions": counts["sessions"] if counts else 0,
                "messages": counts["messages"] if counts else 0,
                "vector_index": self._bits.describe() if self._bits is not None else {"engine": "sqlite-vec"}}

    async def reembed(self, batch: int = 64) -> int:
        """Rebuild every vector with the current embedder (after `[memory] embedder` changed)."""
        rows = await self.store.read("SELECT * FROM memories WHERE superseded_by IS NULL ORDER BY id")
        memories = [Memory._from_row(r) for r in rows]
        vectors: list[list[float]] = []
        for start in range(0, len(memories), batch):
            vectors.extend(await self.embedder.embed([m.text for m in memories[start:start + batch]]))
        wanted = {"embedder": self.embedder.id, "dimension": str(self.embedder.dimension),
                  "filter_fields": ",".join(self._fields)}

        def op(conn: Connection, changes: IndexChanges) -> int:
            self._create_vectors(conn, wanted, changes)
            conn.execute("DELETE FROM memories_fts")
            for memory, vector in zip(memories, vectors, strict=True):
                self._index(conn, memory.id, memory.namespace, memory.text, vector=vector,
                            filters=self._filter_values(memory.metadata), changes=changes)
            return len(memories)

        return await self._write(op)

    # -- helpers -----------------------------------------------------------------------------

    def _index(self, conn: Connection, memory_id: int, namespace: str, text: str, *,
               vector: Sequence[float], filters: tuple[str, ...], changes: IndexChanges) -> None:
        if len(vector) != self.embedder.dimension:
            raise EmbedderMismatchError(
                f"the embedder returned {len(vector)} dimensions, not {self.embedder.dimension}")
        names = "".join(f", {name}" for name in self._fields)
        blob = float32_blob(vector)
        if self._layout == "binary":
            conn.execute(
                f"INSERT INTO memory_vectors (id, bits, namespace{names}) "
                f"VALUES (?, vec_quantize_binary(?), ?{', ?' * len(self._fields)})",
                (memory_id, blob, namespace, *filters))
            conn.execute("INSERT INTO memory_embeddings (id, embedding) VALUES (?, ?)", (memory_id, blob))
            changes.add(Indexed(memory_id, namespace, filters, blob))
        else:
            conn.execute(
                f"INSERT INTO memory_vectors (id, embedding, namespace{names}) "
                f"VALUES (?, ?, ?{', ?' * len(self._fields)})",
                (memory_id, blob, namespace, *filters))
        conn.execute("INSERT INTO memories_fts (rowid, text, namespace) VALUES (?, ?, ?)",
                     (memory_id, text, _namespace_token(namespace)))

    def _unindex(self, conn: Connection, memory_id: int, changes: IndexChanges) -> None:
        conn.execute("DELETE FROM memory_vectors WHERE id = ?", (memory_id,))
        changes.remove(memory_id)
        if self._layout == "binary":
            conn.execute("DELETE FROM memory_embeddings WHERE id = ?", (memory_id,))
        conn.execute("DELETE FROM memories_fts WHERE rowid = ?", (memory_id,))

    def _codes(self, conn: Connection) -> Iterator[list[tuple[int, bytes, str, tuple[str, ...]]]]:
        """memory_vectors' codes with each memory's namespace and filter values, a batch at
        a time, for the RAM index's load (in its thread, on its own connection). The values
        come from `memories`: memory_vectors' text columns cost three times as much to read.
        CROSS JOIN keeps memory_vectors the outer loop: one pass over vec0's chunks, each
        memory found by its id, not a vec0 lookup per memory."""
        cursor = conn.execute("SELECT v.id, v.bits, m.namespace, m.metadata FROM memory_vectors v "
                              "CROSS JOIN memories m ON m.id = v.id")
        while rows := cursor.fetchmany(_LOAD_ROWS):
            yield [(r[0], r[1], r[2], self._filter_values(json.loads(r[3]))) for r in rows]

    def _filter_values(self, metadata: Mapping[str, Any]) -> tuple[str, ...]:
        # vec0 metadata columns reject NULL: an absent value is stored as ''.
        return tuple("" if metadata.get(name) is None else str(metadata[name]) for name in self._fields)

    def _split_filters(self, where: Mapping[str, Any]) -> tuple[list[tuple[str, list[str]]], dict[str, Any]]:
        if not isinstance(where, Mapping):
            raise ValueError("where must be an object of field: value")
        inside = [(name, [str(v) for v in (value if isinstance(value, list) else [value])])
                  for name, value in where.items() if name in self._fields]
        after = {name: value for name, value in where.items() if name not in self._fields}
        return inside, after

    async def _live(self, ids: list[int], after: Mapping[str, Any]) -> list[Memory]:
        if not ids:
            return []
        rows = await self.store.read(
            f"SELECT * FROM memories WHERE id IN ({','.join('?' * len(ids))}) "
            "AND superseded_by IS NULL AND (expires_at IS NULL OR expires_at > ?)", (*ids, time.time()))
        by_id = {r["id"]: Memory._from_row(r) for r in rows}
        return [by_id[i] for i in ids if i in by_id and matches(by_id[i].metadata, after)]

    async def _knn(self, vector: Sequence[float], k: int, namespace: str | None,
                   inside: Sequence[tuple[str, list[str]]] = (), *, near: int | None = None,
                   bits_within: int | None = None) -> list[tuple[int, float]]:
        """The `k` vectors nearest `vector` by cosine distance, nearest first, as (id,
        distance): within `namespace` (None: every namespace), whose filter fields hold one
        of the values `inside` names. Exact with quantization "none"; with "binary", the
        exact ranking of the Hamming candidates (see _BINARY_MARGIN) chosen for the `near`
        nearest (default `k`: a vector recall asks for a few spare rows beyond the ones it
        returns, and choosing candidates for those too nearly doubled the rows re-ranked),
        or none at all when the nearest code differs in more than `bits_within` bits."""
        scope = " AND namespace = ?" if namespace is not None else ""
        scope += "".join(f" AND {name} IN ({','.join('?' * len(values))})" for name, values in inside)
        scoped: list[Any] = [namespace] if namespace is not None else []
        for _, values in inside:
            scoped.extend(values)
        blob = float32_blob(vector)
        if self._layout == "none":
            rows = await self.store.read(
                f"SELECT id, distance FROM memory_vectors WHERE embedding MATCH ? AND k = ?{scope} "
                "ORDER BY distance", (blob, k, *scoped))
            return [(r["id"], r["distance"]) for r in rows]
        near = k if near is None else near
        margin, cap = candidate_reach(self.embedder.dimension, near)
        found = None if self._bits is None else await self._bits.search(
            vector, near, namespace, inside, margin=margin, cap=cap, bits_within=bits_within)
        if found is not None:
            ids = found
        else:
            ids = await self._sql_candidates(blob, near, scope, scoped, margin=margin, cap=cap,
                                             bits_within=bits_within)
        if not ids:
            return []
        rows = await self.store.read(
            f"SELECT id, vec_distance_cosine(embedding, ?) AS distance FROM memory_embeddings "
            f"WHERE id IN ({','.join('?' * len(ids))}) ORDER BY distance, id LIMIT ?", (blob, *ids, k))
        return [(r["id"], r["distance"]) for r in rows]

    async def _sql_candidates(self, blob: bytes, k: int, scope: str, scoped: Sequence[Any], *,
                              margin: int, cap: int, bits_within: int | None) -> list[int]:
        """`_knn`'s Hamming candidates found by sqlite-vec (while the RAM index loads, or
        without one): the rule of `agentd.bitindex.candidates`, in two scans."""
        # The k-th nearest's Hamming distance sets how far the candidates may lie, so that
        # their number follows the query's neighbourhood; the second scan is cheap, as
        # sqlite-vec's cost grows with the rows it keeps per chunk.
        nearest = await self.store.read(
            f"SELECT distance FROM memory_vectors WHERE bits MATCH vec_quantize_binary(?) AND k = ?{scope}",
            (blob, k, *scoped))
        if not nearest or (bits_within is not None and min(r["distance"] for r in nearest) > bits_within):
            return []
        reach = max(r["distance"] for r in nearest) + margin
        candidates = await self.store.read(
            f"SELECT id FROM memory_vectors WHERE bits MATCH vec_quantize_binary(?) AND k = ? "
            f"AND distance <= ?{scope}", (blob, cap, reach, *scoped))
        return [r["id"] for r in candidates]

    async def _nearest(self, vector: list[float], namespace: str) -> Memory | None:
        # Most new texts have no near duplicate: one scan of the bits tells, without the
        # second scan, the re-rank and the read of the memory (see _DUPLICATE_BITS_FACTOR).
        rows = await self._knn(vector, 1, namespace, bits_within=self._duplicate_bits)
        if not rows or 1.0 - rows[0][1] < self.config.dedupe_threshold:
            return None
        live = await self._live([rows[0][0]], {})
        return live[0] if live else None

    async def _keyword(self, query: str, namespace: str, limit: int,
                       inside: list[tuple[str, list[str]]], after: Mapping[str, Any]) -> list[Memory]:
        """The namespace's memories matching the query's words, those with every word first,
        each group by FTS5's bm25. Ranking reads each match, so a question of common words
        would rank most of a namespace (706 ms over 100,000 of 1,000,000 memories): the
        newest `KEYWORD_CANDIDATES` with every word and as many with some are ranked, as on
        PostgreSQL."""
        terms = [t for t in re.findall(r"\w+", query) if t]
        if not terms:
            return []
        quoted = [f'"{t}"' for t in terms]
        scope = f"namespace:{_namespace_token(namespace)}"
        all_words = f"text:({' AND '.join(quoted)})"
        every = f"{scope} AND {all_words}"
        some = f"({scope} AND text:({' OR '.join(quoted)})) NOT {all_words}"
        candidates = ("SELECT * FROM (SELECT rowid, bm25(memories_fts, 1.0, 0.0) AS rank, "
                      "{every} AS every_word FROM memories_fts WHERE memories_fts MATCH ? "
                      "ORDER BY rowid DESC LIMIT ?)")
        rows = await self.store.read(
            f"SELECT m.* FROM ({candidates.format(every=1)} UNION ALL {candidates.format(every=0)}) c "
            "JOIN memories m ON m.id = c.rowid WHERE m.namespace = ? AND m.superseded_by IS NULL "
            "AND (m.expires_at IS NULL OR m.expires_at > ?) ORDER BY c.every_word DESC, c.rank, m.id LIMIT ?",
            (every, KEYWORD_CANDIDATES, some, KEYWORD_CANDIDATES, namespace, time.time(), limit))
        memories = [Memory._from_row(r) for r in rows]
        wanted = {**after, **{name: values for name, values in inside}}
        return [m for m in memories if matches(m.metadata, wanted)]


def candidate_reach(dimension: int, near: int) -> tuple[int, int]:
    """(margin, cap) of the Hamming candidates re-ranked for the `near` nearest: every code
    within `margin` bits of the near-th's, at most `cap` (see _BINARY_MARGIN)."""
    return dimension // _BINARY_MARGIN, min(_VEC0_K_MAX, max(near, 10) * _CANDIDATES_PER_RESULT)


def duplicate_bits(dimension: int, dedupe_threshold: float) -> int:
    """The most bits a code may differ from a new text's for a near duplicate's vector to be
    worth re-ranking (see _DUPLICATE_BITS_FACTOR)."""
    angle_share = math.acos(min(1.0, dedupe_threshold)) / math.pi
    return int(dimension * min(0.5, _DUPLICATE_BITS_FACTOR * angle_share))


def check_recorded(recorded: Mapping[str, str], wanted: Mapping[str, str], location: str,
                   stop: str) -> None:
    """Refuse memory whose stored vectors `recorded` says were made otherwise than `wanted`
    (the configured embedder, its dimension...), at `location`; `stop` names what must be
    stopped for `agentd memory reembed`.

    Raises:
        EmbedderMismatchError: naming each setting that differs, as stored and as configured.
    """
    different = {k: (recorded.get(k), v) for k, v in wanted.items() if recorded.get(k) != v}
    if different:
        held = ", ".join(f"{k} {a!r} (configured: {b!r})" for k, (a, b) in different.items())
        raise EmbedderMismatchError(
            f"{location} holds vectors made with {held}; stop {stop} and run "
            "`agentd memory reembed` to rebuild them with the configured embedder")


def check_memory(text: str, namespace: str, metadata: Mapping[str, Any] | None,
                 expires_at: float | None) -> CheckedMemory:
    """Check what `remember` is given. Raises ValueError naming what is wrong."""
    check_text(text)
    check_expiry(expires_at)
    return CheckedMemory(text, check_name(namespace, "namespace"), dict(metadata or {}),
                         metadata_json(metadata or {}), digest(text), expires_at)


def check_text(text: object) -> str:
    """`text` if a memory can hold it: not empty or only spaces, and no NUL (see
    `check_no_nul`). Raises ValueError naming what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text must be a non-empty string")
    check_no_nul(text, "text")
    return text


def check_no_nul(text: str, what: str) -> None:
    """Raise UnstorableTextError if `text` holds U+0000 (NUL): PostgreSQL's text cannot, and
    memory keeps the same on both stores."""
    if "\x00" in text:
        raise UnstorableTextError(f"{what} holds U+0000 (NUL), which memory cannot keep")


def metadata_json(metadata: Mapping[str, Any]) -> str:
    """A memory's metadata as JSON text, or ValueError: an object of JSON values whose
    strings and keys hold no NUL (PostgreSQL keeps metadata as jsonb, which cannot)."""
    text = as_json(metadata, "metadata")
    # json.dumps writes a NUL as \u0000; a backslash then "u0000" shows the same six
    # characters, so the walk decides.
    if "\\u0000" in text and (at := nul_at(metadata, "metadata")) is not None:
        raise UnstorableTextError(f"{at} holds U+0000 (NUL), which memory cannot keep")
    return text


def check_batch(items: Sequence[NewMemory]) -> list[CheckedMemory]:
    """Check what `remember_many` is given, every item before any is stored. Raises
    ValueError naming the first bad item by its index."""
    if not 1 <= len(items) <= MAX_MEMORY_BATCH:
        raise ValueError(f"memories: expected 1..{MAX_MEMORY_BATCH} items, got {len(items)}")
    checked = []
    for index, item in enumerate(items):
        try:
            checked.append(check_memory(item.text, item.namespace, item.metadata, item.expires_at))
        except ValueError as exc:
            raise type(exc)(f"memories[{index}]: {exc}") from None
    return checked


class BatchEngine(Protocol):
    """What `remember_checked` needs of a memory engine."""

    config: MemoryConfig
    batcher: EmbeddingBatcher
    grouped: RememberGroups

    async def _live_by_digest(self, namespace: str, digests: Sequence[str]) -> dict[str, Memory]: ...

    async def _nearest(self, vector: list[float], namespace: str) -> Memory | None: ...

    async def _insert(self, pairs: Sequence[tuple[CheckedMemory, list[float]]],
                      supersedes: int | None = None) -> list[tuple[Memory, bool]]: ...


async def remember_one(engine: BatchEngine, item: CheckedMemory,
                       supersedes: int | None) -> tuple[Memory, bool]:
    """`remember` on either engine: a new text as `remember_checked` stores it, grouped with
    the other callers' of the moment (`RememberGroups`), or a correction of `supersedes`
    (always written: it replaces what it corrects)."""
    if supersedes is None:
        return await engine.grouped.remember(item)
    (vector,) = await engine.batcher.embed([item.text])
    ((memory, _),) = await engine._insert([(item, vector)], supersedes=supersedes)
    return memory, True


async def remember_checked(engine: BatchEngine, items: Sequence[CheckedMemory]) -> list[tuple[Memory, bool]]:
    """`remember_many` on either engine: each item's memory and whether it is new; nothing
    is stored if any item fails (the first failure is raised). See `_store_items`."""
    outcomes = await _store_items(engine, items, each_alone=False)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return [outcome for outcome in outcomes if not isinstance(outcome, BaseException)]


Outcome = tuple[Memory, bool] | BaseException  # an item's memory and whether it is new, or its failure


async def _store_items(engine: BatchEngine, items: Sequence[CheckedMemory], *,
                       each_alone: bool, embedding: asyncio.Lock | None = None) -> list[Outcome]:
    """Store `items`; each one's outcome, in order.

    In order: an item repeating an earlier item's text shares its result; one whose text a
    live memory of its namespace has gets that memory; the rest are embedded (in batches
    of `[memory] embed_batch`, queued behind recalls); one within `dedupe_threshold` of an
    earlier item of the batch or of a stored memory gets that one; what is left is written
    in one transaction.

    `each_alone`: the items are different callers' (`RememberGroups`): each text is its own
    request to the batcher, so a text the embedder refuses fails only its item, and the
    others are still stored. Otherwise (one caller's batch) an embedding failure fails the
    call before anything is written. A failed read or write fails every item.
    `embedding`: held while the texts are embedded (see `RememberGroups`)."""
    results: dict[int, Outcome] = {}
    shares = _repeats(items)  # an item -> the earlier item whose result it takes
    firsts = [index for index in range(len(items)) if index not in shares]
    by_namespace: dict[str, list[int]] = {}
    for index in firsts:
        by_namespace.setdefault(items[index].namespace, []).append(index)
    for namespace, indexes in by_namespace.items():
        stored = await engine._live_by_digest(namespace, [items[i].digest for i in indexes])
        results.update((i, (stored[items[i].digest], False)) for i in indexes if items[i].digest in stored)
    fresh = [index for index in firsts if index not in results]
    async with embedding or contextlib.nullcontext():
        if each_alone:
            vectors, refused = await _embed_each(engine.batcher, items, fresh)
            results.update(refused)
        else:
            vectors = await _embed_all(engine.batcher, items, fresh)
    if each_alone:
        fresh = [index for index in fresh if index in vectors]
    shares.update(_near_in_batch(items, fresh, vectors, engine.config.dedupe_threshold))
    kept = [index for index in fresh if index not in shares]
    near = await asyncio.gather(*(engine._nearest(vectors[i], items[i].namespace) for i in kept))
    results.update((index, (memory, False)) for index, memory in zip(kept, near, strict=True)
                   if memory is not None)
    new = [index for index in kept if index not in results]
    if new:
        written = await engine._insert([(items[i], vectors[i]) for i in new])
        results.update(zip(new, written, strict=True))
    for index in sorted(shares):  # after the item each shares with, which comes first
        first = results[shares[index]]
        results[index] = first if isinstance(first, BaseException) else (first[0], False)
    return [results[index] for index in range(len(items))]


class RememberGroups:
    """Concurrent `remember()` calls of one engine, stored a group at a time.

    Alone, each call takes a read (its exact duplicate), a model call, a nearest-neighbour
    search and a write of its own, and callers that each search before the others write
    can all store near duplicates of one another. Grouped, the calls waiting at the moment
    share one read per namespace and one write transaction, their texts reach the batcher
    together, and near duplicates within a group are stored once.

    Two groups are under way at most, taking turns at the model: while one group's texts
    are embedded, the other's are checked and written, so neither the model nor the writes
    wait for the other (one group at a time left the model idle during every write). A
    group holds at most half a model batch (`[memory] embed_batch`), so that the calls
    waiting make two groups; at least `_MIN_GROUP`. A group is taken when its runner first
    runs, so the calls of one loop turn share it, and an idle daemon's lone call is a group
    of one at once.

    A text the embedder refuses fails only its caller; a failed read or write fails its
    group's callers. A caller cancelled before its group is taken is dropped; one cancelled
    later does not stop the group (its text may be stored)."""

    def __init__(self, engine: BatchEngine, *, in_flight: int = 2) -> None:
        self._engine = engine
        self._max_items = max(_MIN_GROUP, engine.batcher.max_texts // 2)
        self._in_flight = in_flight
        self._embedding = asyncio.Lock()  # held by the group whose texts the model has
        self._waiting: list[tuple[CheckedMemory, asyncio.Future[tuple[Memory, bool]]]] = []
        self._runners: set[asyncio.Task[None]] = set()
        self.unanswered = 0  # calls made and not answered yet

    async def remember(self, item: CheckedMemory) -> tuple[Memory, bool]:
        future: asyncio.Future[tuple[Memory, bool]] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        self._start()
        self.unanswered += 1
        try:
            return await future
        finally:
            self.unanswered -= 1

    def _start(self) -> None:
        if self._waiting and len(self._runners) < self._in_flight:
            runner = asyncio.get_running_loop().create_task(self._run(), name="agentd-remember-group")
            self._runners.add(runner)
            runner.add_done_callback(self._runner_done)

    def _runner_done(self, runner: asyncio.Task[None]) -> None:
        self._runners.discard(runner)
        self._start()

    async def _run(self) -> None:
        group = [(item, future) for item, future in self._waiting[:self._max_items] if not future.done()]
        del self._waiting[:self._max_items]
        if not group:
            return
        try:
            outcomes = await _store_items(self._engine, [item for item, _ in group], each_alone=True,
                                          embedding=self._embedding)
        except BaseException as exc:
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), outcome in zip(group, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)


def _repeats(items: Sequence[CheckedMemory]) -> dict[int, int]:
    """The items repeating an earlier item's text in its namespace, each with the first."""
    first_of: dict[tuple[str, str], int] = {}
    return {index: first for index, item in enumerate(items)
            if (first := first_of.setdefault((item.namespace, item.digest), index)) != index}


async def _embed_all(batcher: EmbeddingBatcher, items: Sequence[CheckedMemory],
                     indexes: Sequence[int]) -> dict[int, list[float]]:
    """The vectors of these items' texts, asked for in batches of the batcher's size (a
    recall may go between them)."""
    size = batcher.max_texts
    chunks = [indexes[start:start + size] for start in range(0, len(indexes), size)]
    embedded = await asyncio.gather(*(batcher.embed([items[i].text for i in chunk]) for chunk in chunks))
    return {index: vector for chunk, vectors in zip(chunks, embedded, strict=True)
            for index, vector in zip(chunk, vectors, strict=True)}


async def _embed_each(batcher: EmbeddingBatcher, items: Sequence[CheckedMemory],
                      indexes: Sequence[int]) -> tuple[dict[int, list[float]], dict[int, BaseException]]:
    """The vectors of these items' texts, each asked for alone (the batcher still puts them
    in one model call), and the failures of those it could not embed."""
    embedded = await asyncio.gather(*(batcher.embed([items[i].text]) for i in indexes),
                                    return_exceptions=True)
    vectors: dict[int, list[float]] = {}
    failed: dict[int, BaseException] = {}
    for index, got in zip(indexes, embedded, strict=True):
        if isinstance(got, asyncio.CancelledError):
            raise got
        if isinstance(got, BaseException):
            failed[index] = got
        else:
            vectors[index] = got[0]
    return vectors, failed


def _near_in_batch(items: Sequence[CheckedMemory], fresh: Sequence[int],
                   vectors: Mapping[int, list[float]], threshold: float) -> dict[int, int]:
    """The items of `fresh` within `threshold` (cosine similarity) of an earlier kept item of
    the same namespace, each with the first such item."""
    if len(fresh) < 2:
        return {}
    import numpy as np  # here, not at import: a daemon that never batches never loads it

    matrix = np.asarray([vectors[i] for i in fresh], dtype=np.float32)
    similar = matrix @ matrix.T >= threshold
    spaces: dict[str, int] = {}
    space = np.asarray([spaces.setdefault(items[i].namespace, len(spaces)) for i in fresh])
    kept = np.zeros(len(fresh), dtype=bool)
    near: dict[int, int] = {}
    for position, index in enumerate(fresh):
        earlier = np.flatnonzero(similar[position] & kept & (space == space[position]))
        if len(earlier):
            near[index] = fresh[int(earlier[0])]
        else:
            kept[position] = True
    return near


def check_recall(query: str, namespace: str, k: int) -> str:
    """Check what `recall` is given; the namespace."""
    if not isinstance(query, str) or not query.strip():
        raise ValueError("query must be a non-empty string")
    if not 1 <= k <= 1000:
        raise ValueError(f"k must be between 1 and 1000, got {k}")
    return check_name(namespace, "namespace")


def fuse(vector_ranked: Sequence[Memory], distances: Mapping[int, float],
         keyword_ranked: Sequence[Memory] | None, k: int) -> list[Recalled]:
    """The best `k`: by cosine similarity for a vector recall; for a hybrid one (with
    `keyword_ranked`), by reciprocal rank fusion of the two rankings."""
    ranked: dict[int, float] = {m.id: 1.0 / (_RRF_K + i + 1) for i, m in enumerate(vector_ranked)}
    found = {m.id: m for m in vector_ranked}
    for i, memory in enumerate(keyword_ranked or ()):
        found.setdefault(memory.id, memory)
        ranked[memory.id] = ranked.get(memory.id, 0.0) + 1.0 / (_RRF_K + i + 1)
    order = sorted(ranked, key=lambda i: ranked[i], reverse=True)[:k]
    if keyword_ranked is not None:
        return [Recalled(found[i], round(ranked[i], 6), distances.get(i)) for i in order]
    # Vector only: the cosine similarity says how good a match is, not just its place.
    return [Recalled(found[i], round(1.0 - distances[i], 6), distances[i]) for i in order]


async def delete_replanning(delete_once: Callable[[set[int]], Awaitable[int]], ids: Sequence[int]) -> int:
    """Run a planned delete of `ids`, planning again (up to `_REPLANS` times) when a chain
    changed between its read and its write (`ChainChangedError`)."""
    if not ids:
        return 0
    doomed = set(ids)
    for _ in range(_REPLANS):
        try:
            return await delete_once(doomed)
        except ChainChangedError:
            continue
    raise MemoryBusyError(f"the correction chains of {sorted(doomed)} kept changing; try again")


def plan_delete(rows: Mapping[int, Any], doomed: set[int]) -> tuple[dict[int, int], set[int]]:
    """How deleting `doomed` keeps the correction chains whole, from their rows (id,
    supersedes, superseded_by): the surviving originals to link to a surviving correction,
    and those that become the newest again."""
    def outside(start: int | None, link: str) -> int | None:
        while start is not None and start in doomed:
            start = rows[start][link] if start in rows else None
        return start

    relinks: dict[int, int] = {}  # surviving original -> surviving correction
    revive: set[int] = set()
    for row in rows.values():
        original = outside(row["supersedes"], "supersedes")
        if original is None:
            continue
        successor = outside(row["superseded_by"], "superseded_by")
        if successor is None:
            revive.add(original)
        else:
            relinks[original] = successor
    return relinks, revive


def changed(old_text: str, old_metadata: str, text: str, metadata: str) -> bool:
    """Whether an update changes what a memory's history keeps (its text or metadata)."""
    return old_text != text or json.loads(old_metadata) != json.loads(metadata)


def matches(metadata: Mapping[str, Any], where: Mapping[str, Any]) -> bool:
    for name, value in where.items():
        allowed = value if isinstance(value, list) else [value]
        if metadata.get(name) not in allowed and str(metadata.get(name)) not in map(str, allowed):
            return False
    return True


def _namespace_token(namespace: str) -> str:
    """The namespace as one FTS5 token, whatever punctuation it holds (see sql/memory/0002)."""
    return "n" + namespace.encode().hex().upper()


def digest(text: str) -> str:
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()


def as_json(value: Any, what: str) -> str:
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be an object")
    try:
        return json.dumps(dict(value), separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON: {exc}") from exc


def check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not _NAMESPACE.fullmatch(value):
        raise ValueError(f"{what} {value!r} must be 1-128 letters, digits or _ . : -")
    return value


def check_expiry(expires_at: float | None) -> None:
    """ValueError unless `expires_at` is None or a finite Unix time: an infinite one was
    stored and given back as `Infinity`, which is not JSON; NaN was stored as none."""
    if expires_at is not None and not math.isfinite(expires_at):
        raise ValueError(f"expires_at must be a Unix time in seconds, got {expires_at!r}")


def float32_blob(vector: Sequence[float]) -> bytes:
    """A vector as vec0 stores it: float32s in the machine's byte order."""
    return struct.pack(f"{len(vector)}f", *vector)
