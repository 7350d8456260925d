"""`MemoryStore` (agentd/memory.py) on PostgreSQL with pgvector, shared by every daemon on
the database: what an agent learned through one daemon is recalled through all, at once.

The tables are `agentd/sql/pg_memory/`'s, with migrations of their own (recorded in
`memory_schema_version`), so memory lives in the store's database or in another one
(`[memory] url`). Its own pool (`[memory] pool_size` connections): a slow embedding-heavy
write never holds the queue's connections.

Vectors. `memories.embedding` is typed `vector(<dimension>)` at the first open, with the
embedder recorded in `memory_meta` (a daemon with another embedder refuses to start, as on
SQLite), and indexed by HNSW (`[memory] hnsw_m`, `hnsw_ef_construction`) over the live
memories only (a partial index: superseded ones keep their vector, so a forgotten
correction's original comes back without embedding it again, but leave the search; one
copied from memory.db, where superseded memories have none, is embedded then). Every
connection searches with `hnsw.ef_search = [memory] hnsw_ef_search` and pgvector 0.8's
iterative scans (`hnsw.iterative_scan = relaxed_order`): a filter (a namespace, metadata)
that drops most of the nearest rows makes the scan go on until `k` pass, instead of
returning fewer. Relaxed order may return the nearest slightly out of order: they are
sorted again here. A namespace small enough is searched exactly, through its b-tree
index, when the planner finds that cheaper.

The RAM index (`[memory] ram_index`, agentd.postgres.memory_index). From 10,000 memories
each daemon scans the binary codes in RAM for candidates instead, re-ranked here by exact
cosine together with the rows written past its snapshot: HNSW's recall at a million fell
short (docs/benchmarks.md). HNSW still answers while the codes load, and for a filter the
codes cannot (a key outside `[memory] filter_fields`, an object or array value).

Filters. Every metadata filter applies inside the search, in SQL (`metadata -> key`), on
any key (the filter fields are also matched in RAM, the same way). A value matches as JSON
or as its text (`{"n": 5}` matches 5 and "5", as on SQLite).

Keywords. Hybrid recall fuses the vector ranking with PostgreSQL full-text search on
`keywords` (a generated `tsvector`, 'simple' configuration: no stemming, like FTS5's
default tokenizer), ranked by `ts_rank_cd`, any of the query's words matching: the
memories with every word first. Ranking reads each match, so a query of common words would
rank most of a namespace: the newest 1,000 matches with every word, and the newest 1,000
with some, are ranked, as on SQLite. (Any 1,000, as a scan found them first, made the same
recall give other results from one call to the next: each pooled connection may plan the
scan its own way.)

Duplicates. One live memory per text and namespace (a unique partial index): two daemons
remembering the same text at once store it once, and both get that memory. A near
duplicate (cosine similarity at least `dedupe_threshold`) is found by a search before the
write, as on SQLite; two daemons writing near duplicates in the same instant may both
store theirs. Unlike SQLite, an update that would give a memory the text of another live
memory of its namespace is refused (ValueError). An expired memory the purge has not
reached yet gives up its text's place to a new memory of the same text.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from types import EllipsisType
from typing import Any

import asyncpg

from agentd import memory as memory_module
from agentd.config import MemoryConfig, StoreConfig
from agentd.embed import Embedder
from agentd.embed_batch import EmbeddingBatcher
from agentd.errors import EmbedderMismatchError, MemoryNotFoundError, StoreError
from agentd.log import get_logger
from agentd.memory import (
    DEFAULT_NAMESPACE,
    KEYWORD_CANDIDATES,
    ChainChangedError,
    CheckedMemory,
    Memory,
    MemoryChange,
    NewMemory,
    Recalled,
    RememberGroups,
    Session,
    candidate_reach,
    changed,
    check_batch,
    check_expiry,
    check_memory,
    check_name,
    check_recall,
    check_recorded,
    check_text,
    delete_replanning,
    digest,
    duplicate_bits,
    fuse,
    matches,
    metadata_json,
    plan_delete,
    remember_checked,
    remember_one,
)
from agentd.metrics import RECALL_BUCKETS, Histogram
from agentd.postgres.memory_index import PAST_HORIZON, PgBitIndex
from agentd.store.postgres import PgConnection, PgStore, load_migrations
from agentd.store.text import nul_at

# The advisory lock under which the first daemon types the vector column and builds the
# index: "agentdm" in ASCII (the store's migrations take "agentd", the scheduler "agentds").
_VECTORS_LOCK = 0x6167656E74646D
# Rows fetched per search beyond `k`, for the live-row checks after it (a row expiring
# between the search and the read) to leave `k`.
_SPARE = 8
_FIELDS = ("id, namespace, text, metadata, created_at, updated_at, expires_at, supersedes, "
           "superseded_by")
# A memory's fields from its row: metadata as it was given where that is known (see
# pg_memory 0003); `_FIELDS` names them in a subquery of these.
_METADATA = "coalesce(metadata_text, metadata::text)"
_COLUMNS = _FIELDS.replace("metadata", f"{_METADATA} AS metadata")
_LIVE = "superseded_by IS NULL AND (expires_at IS NULL OR expires_at > $2)"
_RECORD_CHANGE = ("INSERT INTO memory_history (memory_id, event, text, old_text, metadata, "
                  "old_metadata, superseded_by, at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
_RECORD_SUPERSEDED = ("INSERT INTO memory_history (memory_id, event, text, metadata, superseded_by, at) "
                      f"SELECT id, 'superseded', text, {_METADATA}, $2, $3 FROM memories WHERE id = $1")


class PgMemory:
    """`MemoryStore` on a PostgreSQL database with pgvector; see the module docstring."""

    def __init__(self, config: MemoryConfig, url: str, embedder: Embedder, *,
                 setting: str = "[memory] url") -> None:
        self.config = config
        self.embedder = embedder
        self.batcher = EmbeddingBatcher(embedder, config.embed_batch)
        self.grouped = RememberGroups(self)
        self.recall_seconds = Histogram(RECALL_BUCKETS)  # for /metrics
        self.store = PgStore(StoreConfig(url=url, pool_size=config.pool_size),
                             migrations=load_migrations("sql/pg_memory"),
                             version_table="memory_schema_version", setting=setting,
                             settings=_search_settings(config), component="memory")
        self._setting = setting
        # [memory] ram_index: the binary codes scanned in RAM once loaded (memory_index).
        self._bits = PgBitIndex(self.store, embedder.dimension, config.filter_fields,
                                start_from=memory_module.RAM_INDEX_FROM) if config.ram_index else None
        self._duplicate_bits = duplicate_bits(embedder.dimension, config.dedupe_threshold)
        self._log = get_logger("memory")

    @property
    def location(self) -> str:
        return self.store.location

    async def open(self, *, check_embedder: bool = True) -> None:
        try:
            await self.store.open()
        except StoreError as exc:
            if "vector" in str(exc) and "extension" in str(exc):
                raise StoreError(
                    f"{exc}; memory on PostgreSQL needs the pgvector extension on the server "
                    f"(Debian: postgresql-<version>-pgvector), or {self._setting} naming a "
                    "database that has it, or [memory] url = \"sqlite\" to keep memory in "
                    "each daemon's memory.db") from None
            raise
        if not check_embedder:
            return
        try:
            await self._check_embedder()
        except BaseException:
            await self.store.close()
            raise
        if self._bits is not None:
            await self._bits.open()

    async def close(self) -> None:
        await self.batcher.close()
        if self._bits is not None:
            await self._bits.close()
        await self.store.close()

    def _wanted(self) -> dict[str, str]:
        return {"embedder": self.embedder.id, "dimension": str(self.embedder.dimension)}

    async def _check_embedder(self) -> None:
        wanted = self._wanted()

        async def op(conn: PgConnection) -> dict[str, str]:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _VECTORS_LOCK)
            rows = await conn.fetch("SELECT key, value FROM memory_meta")
            meta = {row["key"]: row["value"] for row in rows}
            if not meta:
                await self._create_vectors(conn, wanted)
                return wanted
            return meta

        check_recorded(await self.store.write(op), wanted, self.location, "the daemons")

    async def _create_vectors(self, conn: PgConnection, meta: Mapping[str, str]) -> None:
        """Type the vector column with the embedder's dimension (vectors of another go) and
        build the index; record what made the vectors."""
        await conn.execute("DROP INDEX IF EXISTS memories_embedding")
        await conn.execute(f"ALTER TABLE memories ALTER COLUMN embedding TYPE "
                           f"vector({int(self.embedder.dimension)}) USING NULL")
        await self._build_index(conn)
        await conn.executemany(
            "INSERT INTO memory_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE "
            "SET value = excluded.value", list(meta.items()))

    async def _build_index(self, conn: PgConnection) -> None:
        """Build the HNSW index, in the caller's transaction, with `hnsw_build_memory_mb`."""
        await conn.execute(f"SET LOCAL maintenance_work_mem = '{int(self.config.hnsw_build_memory_mb)}MB'")
        await conn.execute(
            "CREATE INDEX memories_embedding ON memories USING hnsw (embedding vector_cosine_ops) "
            f"WITH (m = {int(self.config.hnsw_m)}, "
            f"ef_construction = {int(self.config.hnsw_ef_construction)}) "
            "WHERE superseded_by IS NULL")

    # -- sessions ----------------------------------------------------------------------------

    def session(self, session_id: str) -> Session:
        return Session(self, session_id)

    async def append_message(self, session_id: str, role: str, content: str, meta_json: str, *,
                             now: float, expires_at: float) -> int:
        async def op(conn: PgConnection) -> int:
            await conn.execute("DELETE FROM memory_sessions WHERE id = $1 AND expires_at <= $2",
                               session_id, now)
            await conn.execute(
                "INSERT INTO memory_sessions (id, expires_at, updated_at) VALUES ($1, $2, $3) "
                "ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at, "
                "updated_at = excluded.updated_at", session_id, expires_at, now)
            message_id: int = await conn.fetchval(
                "INSERT INTO memory_messages (session_id, role, content, meta, created_at) "
                "VALUES ($1, $2, $3, $4, $5) RETURNING id", session_id, role, content, meta_json, now)
            return message_id

        return await self.store.write(op)

    async def session_messages(self, session_id: str, now: float, limit: int) -> Sequence[Any]:
        return await self.store.read(
            "SELECT m.* FROM memory_messages m JOIN memory_sessions s ON s.id = m.session_id "
            "WHERE m.session_id = $1 AND s.expires_at > $2 ORDER BY m.id DESC LIMIT $3",
            (session_id, now, limit))

    async def list_sessions(self, now: float, limit: int, prefix: str = "") -> list[dict[str, Any]]:
        rows = await self.store.read(
            "SELECT s.id, s.updated_at, s.expires_at, (SELECT count(*) FROM memory_messages m "
            "WHERE m.session_id = s.id) AS messages FROM memory_sessions s WHERE s.expires_at > $1 "
            "AND left(s.id, $2) = $3 ORDER BY s.updated_at DESC, s.id LIMIT $4",
            (now, len(prefix), prefix, limit))
        return [dict(row) for row in rows]

    async def clear_session(self, session_id: str) -> int:
        async def op(conn: PgConnection) -> int:
            count: int = await conn.fetchval(
                "SELECT count(*) FROM memory_messages WHERE session_id = $1", session_id)
            await conn.execute("DELETE FROM memory_sessions WHERE id = $1", session_id)
            return count

        return await self.store.write(op)

    # -- long-term ---------------------------------------------------------------------------

    async def remember(self, text: str, namespace: str = DEFAULT_NAMESPACE,
                       metadata: Mapping[str, Any] | None = None, expires_at: float | None = None,
                       supersedes: int | None = None) -> tuple[Memory, bool]:
        return await remember_one(self, check_memory(text, namespace, metadata, expires_at), supersedes)

    async def remember_many(self, items: Sequence[NewMemory]) -> list[tuple[Memory, bool]]:
        return await remember_checked(self, check_batch(items))

    async def _live_by_digest(self, namespace: str, digests: Sequence[str]) -> dict[str, Memory]:
        """The live memories of `namespace` whose texts have these digests, by digest."""
        rows = await self.store.read(
            f"SELECT {_COLUMNS}, hash FROM memories WHERE namespace = $1 AND hash = ANY($3::text[]) "
            f"AND {_LIVE}", (namespace, time.time(), list(digests)))
        return {row["hash"]: _memory(row) for row in rows}

    async def _insert(self, pairs: Sequence[tuple[CheckedMemory, list[float]]],
                      supersedes: int | None = None) -> list[tuple[Memory, bool]]:
        """Write new memories with their vectors in one transaction; each with whether it
        was written (False: the same text got in first, through another caller or daemon,
        and that memory is returned)."""
        for _, vector in pairs:
            self._check_dimension(vector)
        now = time.time()

        async def op(conn: PgConnection) -> list[tuple[Any, bool]]:
            return [await self._insert_one(conn, item, _vector_text(vector), supersedes, now)
                    for item, vector in pairs]

        return [(_memory(row), created) for row, created in await self.store.write(op)]

    async def _insert_one(self, conn: PgConnection, item: CheckedMemory, embedding: str,
                          supersedes: int | None, now: float) -> tuple[Any, bool]:
        if supersedes is not None:
            old = await conn.fetchval(
                "SELECT namespace FROM memories WHERE id = $1 FOR UPDATE", supersedes)
            if old != item.namespace:
                raise MemoryNotFoundError(
                    f"supersedes: no memory {supersedes} in namespace {item.namespace!r}")
            # Out of the live texts first: a correction may repeat the text it corrects.
            await conn.execute("UPDATE memories SET hash = hash || ':superseded' WHERE id = $1",
                               supersedes)
        else:
            await conn.execute(
                "UPDATE memories SET hash = hash || ':expired:' || id WHERE namespace = $1 "
                "AND hash = $2 AND superseded_by IS NULL AND expires_at <= $3",
                item.namespace, item.digest, now)
        row = await conn.fetchrow(
            "INSERT INTO memories (namespace, text, metadata, metadata_text, hash, created_at, "
            "updated_at, expires_at, supersedes, embedding) VALUES ($1, $2, $3::text::jsonb, "
            "$3::text, $4, $5, $5, $6, $7, $8::text::vector) "
            "ON CONFLICT (namespace, hash) WHERE superseded_by IS NULL "
            f"DO NOTHING RETURNING {_COLUMNS}",
            item.namespace, item.text, item.metadata_json, item.digest, now, item.expires_at,
            supersedes, embedding)
        if row is None:  # the same text, remembered through another caller a moment ago
            return await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM memories WHERE namespace = $1 AND hash = $2 "
                "AND superseded_by IS NULL", item.namespace, item.digest), False
        await conn.execute(_RECORD_CHANGE, row["id"], "created", item.text, None, item.metadata_json,
                           None, None, now)
        if supersedes is not None:
            await conn.execute(
                "UPDATE memories SET superseded_by = $1, hash = left(hash, 64) WHERE id = $2",
                row["id"], supersedes)
            await conn.execute(_RECORD_SUPERSEDED, supersedes, row["id"], now)
        return row, True

    async def recall(self, query: str, namespace: str = DEFAULT_NAMESPACE, k: int = 10,
                     where: Mapping[str, Any] | None = None, hybrid: bool = False) -> list[Recalled]:
        """`MemoryStore.recall`, its time observed in `recall_seconds`."""
        began = time.perf_counter()
        found = await self._recall(query, namespace, k, where, hybrid)
        self.recall_seconds.observe(time.perf_counter() - began)
        return found

    async def _recall(self, query: str, namespace: str, k: int, where: Mapping[str, Any] | None,
                      hybrid: bool) -> list[Recalled]:
        namespace = check_recall(query, namespace, k)
        _filters(where or {}, first=1)  # a bad `where` is refused before the embedding
        (vector,) = await self.batcher.embed([query], query=True)
        self._check_dimension(vector)
        # Hybrid fuses the spare rows' ranks too: their candidates must be chosen as well.
        rows = await self._knn(vector, k + _SPARE, namespace, where or {}, near=None if hybrid else k)
        distances = {row["id"]: float(row["distance"]) for row in rows}
        keyword_ranked = await self._keyword(query, namespace, k + _SPARE, where or {}) if hybrid else None
        return fuse([_memory(row) for row in rows], distances, keyword_ranked, k)

    async def get(self, memory_id: int) -> Memory:
        row = await self.store.read_one(f"SELECT {_COLUMNS} FROM memories WHERE id = $1", (memory_id,))
        if row is None:
            raise MemoryNotFoundError(f"no memory with id {memory_id}")
        return _memory(row)

    async def history(self, memory_id: int) -> list[MemoryChange]:
        await self.get(memory_id)
        rows = await self.store.read(
            "SELECT * FROM memory_history WHERE memory_id = $1 ORDER BY id", (memory_id,))
        return [MemoryChange._from_row(row) for row in rows]

    async def update(self, memory_id: int, text: str | None = None,
                     metadata: Mapping[str, Any] | None = None,
                     expires_at: float | EllipsisType | None = ...) -> Memory:
        if expires_at is not ...:
            check_expiry(expires_at)
        current = await self.get(memory_id)
        new_text = current.text if text is None else check_text(text)
        new_meta_json = metadata_json(current.metadata if metadata is None else metadata)
        vector = None
        if text is not None:
            (vector,) = await self.batcher.embed([new_text])
            self._check_dimension(vector)
        now = time.time()

        async def op(conn: PgConnection) -> Any:
            before = await conn.fetchrow(
                f"SELECT text, {_METADATA} AS metadata FROM memories "
                "WHERE id = $1 FOR UPDATE", memory_id)
            if before is None:
                raise MemoryNotFoundError(f"no memory with id {memory_id}")
            row = await conn.fetchrow(
                "UPDATE memories SET text = $1, metadata = $2::text::jsonb, metadata_text = $2::text, "
                "hash = $3, updated_at = $4, "
                "expires_at = CASE WHEN $5 THEN expires_at ELSE $6 END, "
                "embedding = coalesce($7::text::vector, embedding) "
                f"WHERE id = $8 RETURNING {_COLUMNS}",
                new_text, new_meta_json, digest(new_text), now, expires_at is ...,
                None if expires_at is ... else expires_at,
                None if vector is None else _vector_text(vector), memory_id)
            if changed(before["text"], before["metadata"], new_text, new_meta_json):
                await conn.execute(_RECORD_CHANGE, memory_id, "updated", new_text, before["text"],
                                   new_meta_json, before["metadata"], None, now)
            return row

        try:
            row = await self.store.write(op)
        except asyncpg.UniqueViolationError:
            raise ValueError(f"text: namespace {current.namespace!r} already holds a memory of "
                             "this text") from None
        return _memory(row)

    async def forget(self, memory_id: int | None = None, namespace: str | None = None,
                     where: Mapping[str, Any] | None = None) -> int:
        if memory_id is None and namespace is None:
            raise ValueError("give a memory id, or a namespace (with an optional where)")
        if memory_id is not None:
            await self.get(memory_id)
            ids = [memory_id]
        else:
            rows = await self.store.read(
                f"SELECT id, {_METADATA} AS metadata FROM memories WHERE namespace = $1",
                (check_name(namespace or "", "namespace"),))
            ids = [row["id"] for row in rows if matches(json.loads(row["metadata"]), where or {})]
        return await delete_replanning(self._delete_once, ids)

    async def purge_expired(self) -> dict[str, int]:
        now = time.time()
        expired = [row["id"] for row in await self.store.read(
            "SELECT id FROM memories WHERE expires_at IS NOT NULL AND expires_at <= $1", (now,))]
        memories = await delete_replanning(self._delete_once, expired)

        async def op(conn: PgConnection) -> int:
            return len(await conn.fetch(
                "DELETE FROM memory_sessions WHERE expires_at <= $1 RETURNING id", now))

        return {"memories": memories, "sessions": await self.store.write(op)}

    async def _delete_once(self, doomed: set[int]) -> int:
        """Delete `doomed`, keeping the correction chains whole (see `plan_delete`): an
        original that becomes the newest again is live at once, its vector kept."""
        chain_sql = ("SELECT id, supersedes, superseded_by FROM memories WHERE id = ANY($1) "
                     "ORDER BY id")
        rows = {row["id"]: row for row in await self.store.read(chain_sql, (list(doomed),))}
        seen = [tuple(row) for row in rows.values()]
        relinks, revive = plan_delete(rows, doomed)
        # An original without a vector (copied from memory.db, where a superseded memory
        # leaves the index: agentd store copy) is embedded before it comes back.
        bare = await self.store.read(
            "SELECT id, text FROM memories WHERE id = ANY($1) AND embedding IS NULL",
            (list(revive),)) if revive else []
        vectors = await self.batcher.embed([row["text"] for row in bare]) if bare else []
        for vector in vectors:
            self._check_dimension(vector)

        async def op(conn: PgConnection) -> int:
            if [tuple(row) for row in await conn.fetch(chain_sql + " FOR UPDATE", list(doomed))] != seen:
                raise ChainChangedError
            if bare:
                await conn.executemany(
                    "UPDATE memories SET embedding = $2::text::vector WHERE id = $1 AND embedding IS NULL",
                    [(row["id"], _vector_text(vector)) for row, vector in zip(bare, vectors, strict=True)])
            # Relinked first, so no original is left pointing at a deleted correction (which
            # would make it live, beside the correction that stays). The originals that come
            # back (the delete's foreign key clears their `superseded_by`) enter the live
            # texts under a key of their own, then take their text's if no live memory took
            # it meanwhile (else they are live beside it, a duplicate the search shows).
            for original, successor in relinks.items():
                await conn.execute("UPDATE memories SET superseded_by = $1 WHERE id = $2",
                                   successor, original)
                await conn.execute("UPDATE memories SET supersedes = $1 WHERE id = $2",
                                   original, successor)
            if revive:
                await conn.execute("UPDATE memories SET hash = left(hash, 64) || ':revived:' || id "
                                   "WHERE id = ANY($1)", list(revive))
            deleted = len(await conn.fetch(
                "DELETE FROM memories WHERE id = ANY($1) RETURNING id", list(doomed)))
            if revive:
                await conn.execute(
                    "UPDATE memories m SET hash = left(m.hash, 64) WHERE m.id = ANY($1) "
                    "AND m.superseded_by IS NULL AND NOT EXISTS (SELECT 1 FROM memories o "
                    "WHERE o.namespace = m.namespace AND o.hash = left(m.hash, 64) "
                    "AND o.superseded_by IS NULL AND o.id <> m.id)", list(revive))
            return deleted

        return await self.store.write(op)

    async def stats(self) -> dict[str, Any]:
        rows = await self.store.read(
            "SELECT namespace, count(*) AS n FROM memories WHERE superseded_by IS NULL GROUP BY namespace")
        counts = await self.store.read_one(
            "SELECT (SELECT count(*) FROM memory_sessions) AS sessions, "
            "(SELECT count(*) FROM memory_messages) AS messages")
        return {"embedder": self.embedder.id, "dimension": self.embedder.dimension,
                "namespaces": {row["namespace"]: row["n"] for row in rows},
                "sessions": counts["sessions"] if counts else 0,
                "messages": counts["messages"] if counts else 0,
                "vector_index": self._bits.describe() if self._bits is not None else {"engine": "pgvector"}}

    async def reembed(self, batch: int = 64) -> int:
        """Every memory's vector (superseded ones too: they may come back) made again with
        the configured embedder, and the index built once, after them."""
        rows = await self.store.read("SELECT id, text FROM memories ORDER BY id")
        vectors: list[list[float]] = []
        for start in range(0, len(rows), batch):
            vectors.extend(await self.embedder.embed([row["text"] for row in rows[start:start + batch]]))
        for vector in vectors:
            self._check_dimension(vector)
        wanted = self._wanted()

        async def op(conn: PgConnection) -> int:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _VECTORS_LOCK)
            await conn.execute("DROP INDEX IF EXISTS memories_embedding")
            await conn.execute(f"ALTER TABLE memories ALTER COLUMN embedding TYPE "
                               f"vector({int(self.embedder.dimension)}) USING NULL")
            await conn.executemany(
                "UPDATE memories SET embedding = $2::text::vector WHERE id = $1",
                [(row["id"], _vector_text(vector)) for row, vector in zip(rows, vectors, strict=True)])
            await self._build_index(conn)
            await conn.executemany(
                "INSERT INTO memory_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE "
                "SET value = excluded.value", list(wanted.items()))
            return len(rows)

        return await self.store.write(op)

    # -- helpers -----------------------------------------------------------------------------

    def _check_dimension(self, vector: Sequence[float]) -> None:
        if len(vector) != self.embedder.dimension:
            raise EmbedderMismatchError(
                f"the embedder returned {len(vector)} dimensions, not {self.embedder.dimension}")

    async def _nearest(self, vector: list[float], namespace: str) -> Memory | None:
        rows = await self._knn(vector, 1, namespace, {}, bits_within=self._duplicate_bits)
        if not rows or 1.0 - float(rows[0]["distance"]) < self.config.dedupe_threshold:
            return None
        return _memory(rows[0])

    async def _knn(self, vector: Sequence[float], k: int, namespace: str | None,
                   where: Mapping[str, Any], *, near: int | None = None,
                   bits_within: int | None = None) -> list[asyncpg.Record]:
        """The `k` live memories nearest `vector` by cosine distance, nearest first, as rows
        of `_COLUMNS` and `distance`: within `namespace` (None: every namespace), matching
        `where`. With the RAM index, the exact ranking of its Hamming candidates chosen for
        the `near` nearest (default `k`; none past `bits_within` bits) and of the rows
        written past its horizon (see agentd.postgres.memory_index); else pgvector's search."""
        params: list[Any] = [_vector_text(vector), time.time()]
        scope = ""
        if namespace is not None:
            params.append(namespace)
            scope = f" AND namespace = ${len(params)}"
        near = k if near is None else near
        margin, cap = candidate_reach(self.embedder.dimension, near)
        found = None if self._bits is None else await self._bits.search(
            vector, near, namespace, dict(where), margin=margin, cap=cap, bits_within=bits_within)
        if found is not None:
            ids, horizon = found
            params += [ids, horizon, k]
            filters, filter_params = _filters(where, first=len(params) + 1)
            n = len(params)
            # OFFSET 0 keeps the ORDER BY outside, so the planner cannot choose to walk the
            # HNSW index in distance order and filter it by the candidates.
            return await self.store.read(
                f"SELECT * FROM (SELECT {_COLUMNS}, embedding <=> $1::text::vector AS distance "
                f"FROM memories WHERE (id = ANY(${n - 2}::bigint[]) OR "
                f"{PAST_HORIZON.format(f'${n - 1}')}){scope} AND {_LIVE}"
                f" AND embedding IS NOT NULL{filters} OFFSET 0) AS found "
                f"ORDER BY distance, id LIMIT ${n}", (*params, *filter_params))
        params.append(k)
        filters, filter_params = _filters(where, first=len(params) + 1)
        rows = await self.store.read(
            f"SELECT {_COLUMNS}, embedding <=> $1::text::vector AS distance FROM memories "
            f"WHERE {_LIVE}{scope} AND embedding IS NOT NULL{filters} "
            f"ORDER BY embedding <=> $1::text::vector LIMIT ${len(params)}", (*params, *filter_params))
        return sorted(rows, key=lambda row: row["distance"])  # relaxed order: see the docstring

    async def _keyword(self, query: str, namespace: str, limit: int,
                       where: Mapping[str, Any]) -> list[Memory]:
        words = re.findall(r"\w+", query)
        if not words:
            return []
        filters, params = _filters(where, first=7)
        candidates = (f"SELECT {_COLUMNS}, keywords, {{every}} AS every_word FROM memories "
                      f"WHERE namespace = $1 AND {_LIVE}{filters} AND {{match}} ORDER BY id DESC LIMIT $6")
        every_word = candidates.format(every=1, match="keywords @@ to_tsquery('simple', $3)")
        some_word = candidates.format(every=0, match="keywords @@ to_tsquery('simple', $5) "
                                                     "AND NOT keywords @@ to_tsquery('simple', $3)")
        rows = await self.store.read(
            # Ranking reads each match's tsvector: see the module docstring for the bound.
            f"SELECT {_FIELDS} FROM (({every_word}) UNION ALL ({some_word})) AS candidates "
            "ORDER BY every_word DESC, ts_rank_cd(keywords, to_tsquery('simple', $5)) DESC, id LIMIT $4",
            (namespace, time.time(), " & ".join(f"'{word}'" for word in words), limit,
             " | ".join(f"'{word}'" for word in words), KEYWORD_CANDIDATES, *params))
        return [_memory(row) for row in rows]


def _search_settings(config: MemoryConfig) -> dict[str, str]:
    """The session settings of memory's connections (see the module docstring)."""
    return {"hnsw.ef_search": str(config.hnsw_ef_search), "hnsw.iterative_scan": "relaxed_order"}


def _filters(where: Mapping[str, Any], *, first: int) -> tuple[str, list[Any]]:
    """`where` ({key: value or [values]}) as SQL conditions on `metadata`, with their
    parameters numbered from `first`. A value matches as JSON, or by its text as SQLite's
    filters match (5 and "5" match each other); None matches an absent key too."""
    if not isinstance(where, Mapping):
        raise ValueError("where must be an object of field: value")
    clauses: list[str] = []
    params: list[Any] = []
    for key, value in where.items():
        # No stored key or value holds a NUL (`metadata_json`), and jsonb and text take none
        # as a parameter: such a key is absent from every memory, such a value matches none.
        allowed = [v for v in (value if isinstance(value, list) else [value]) if nul_at(v) is None]
        if "\x00" in str(key) or not allowed:
            clauses.append("" if None in allowed else " AND false")
            continue
        key_at, json_at, text_at = (first + len(params) + i for i in range(3))
        absent = f" OR NOT metadata ? ${key_at}" if None in allowed else ""
        clauses.append(f" AND (metadata -> ${key_at} = ANY(${json_at}::jsonb[]) "
                       f"OR metadata ->> ${key_at} = ANY(${text_at}::text[]){absent})")
        params += [str(key), sorted({json.dumps(v) for v in allowed} | {json.dumps(str(v)) for v in allowed}),
                   sorted({str(v) for v in allowed if v is not None})]
    return "".join(clauses), params


def _vector_text(vector: Sequence[float]) -> str:
    """A vector in pgvector's text form (asyncpg has no codec for the type)."""
    return "[" + ",".join(repr(float(x)) for x in vector) + "]"


def _memory(row: Any) -> Memory:
    """A memory from its row (metadata as the JSON text it was given in, `_COLUMNS`)."""
    return Memory._from_row(row)
