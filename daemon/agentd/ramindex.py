"""The RAM copy of memory.db's binary codes (`[memory] ram_index`) through its life.

memory.db stays the truth. A write that changes the vector tables collects its
`IndexChanges`; `RamBitIndex.apply` takes them once the write has committed, in commit
order. The index is read from memory.db in a thread once it holds `start_from` memories
(at open, or when writes bring it there): below that sqlite-vec's scan takes a few
milliseconds and the index would cost a daemon numpy (0.1 s of its start, 15 MB) for
nothing. While it loads, recall scans with sqlite-vec and the changes that commit are kept,
then replayed over what the read found: a change the read already saw is replayed
harmlessly (an add replaces, a remove of what is gone does nothing).

This module does not import numpy; `agentd.bitindex`, the arrays and the scan, does, and is
imported here only when an index is loaded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentd.config import StoreConfig
from agentd.log import get_logger
from agentd.store.driver import Connection, connect

if TYPE_CHECKING:
    from agentd.bitindex import BitIndex

# A load's rows from memory.db, a batch at a time: (id, code as stored in memory_vectors,
# namespace, filter field values).
LoadRows = Callable[[Connection], Iterator[Sequence[tuple[int, bytes, str, tuple[str, ...]]]]]


@dataclass(frozen=True, slots=True)
class Indexed:
    """One memory as a write gives it to the index: its id, namespace, filter field values
    (in the order of `[memory] filter_fields`) and float32 vector (its code is made from it)."""

    memory_id: int
    namespace: str
    filters: tuple[str, ...]
    vector: bytes


@dataclass(slots=True)
class IndexChanges:
    """What one write did to the vector tables, in the order it did it, to be applied once
    the write commits. A write op may run twice (its batch failed for another op's sake and
    each op runs again alone), so the op calls `clear` first."""

    steps: list[tuple[str, Any]] = field(default_factory=list)
    rebuilt: bool = False  # the vector tables were made again: the index must be read anew

    def clear(self) -> None:
        self.steps.clear()
        self.rebuilt = False

    def add(self, entry: Indexed) -> None:
        self.steps.append(("add", entry))

    def remove(self, memory_id: int) -> None:
        self.steps.append(("remove", memory_id))

    def retag(self, memory_id: int, filters: tuple[str, ...]) -> None:
        self.steps.append(("retag", (memory_id, filters)))

    def rebuild(self) -> None:
        self.steps.clear()
        self.rebuilt = True

    @property
    def net(self) -> int:
        """Memories indexed by these changes less those taken out."""
        return sum(1 if kind == "add" else -1 if kind == "remove" else 0 for kind, _ in self.steps)


class RamBitIndex:
    """memory.db's codes in RAM: not loaded (fewer than `start_from` memories), loading,
    ready and following the writes, or failed (logged; recall stays on sqlite-vec)."""

    def __init__(self, path: Path, store_config: StoreConfig, dimension: int,
                 fields: Sequence[str], load_rows: LoadRows, *, start_from: int) -> None:
        self._path, self._store_config = path, store_config
        self._fields, self._load_rows = tuple(fields), load_rows
        self.dimension = dimension
        self.start_from = start_from
        self.index: BitIndex | None = None  # None until loaded: search with sqlite-vec
        self._count = 0  # memories memory.db holds, followed while not loaded
        self._backlog: list[IndexChanges] | None = None  # changes committed while loading
        self._loading: asyncio.Task[None] | None = None
        self._reading: Connection | None = None  # the load's connection, while it reads
        self._failed = False
        self._closed = False
        self._generation = 0
        self._log = get_logger("memory")

    def open(self, vectors: int) -> None:
        """memory.db holds `vectors` memories now (or at least `start_from`, counted no
        further): load if they are enough."""
        self._count = vectors
        if vectors >= self.start_from:
            self.start()

    def start(self) -> None:
        """Read the index from memory.db in a thread, anew; searches use sqlite-vec meanwhile."""
        self.index, self._failed = None, False
        self._backlog = []  # kept from before the read begins: its snapshot may miss them
        self._generation += 1
        self._loading = asyncio.create_task(self._load(self._generation), name="memory-ram-index")

    def _read(self) -> BitIndex:
        from agentd.bitindex import BitIndex, codes_of

        index = BitIndex(self.dimension, self._fields)
        conn = self._reading = connect(self._path, self._store_config)
        try:
            for rows in self._load_rows(conn):
                index.append([r[0] for r in rows], [r[2] for r in rows], [r[3] for r in rows],
                             codes_of([r[1] for r in rows], index.words))
        finally:
            self._reading = None
            conn.close()
        return index

    async def _load(self, generation: int) -> None:
        began = time.perf_counter()
        try:
            index = await asyncio.to_thread(self._read)
        except Exception as exc:
            if generation == self._generation:
                self._backlog, self._failed = None, True
                self._log.error("memory.ram_index.failed", path=str(self._path), error=repr(exc),
                                exc_info=exc)
            return
        if generation != self._generation:
            return  # a newer load started (or memory closed): its read sees all this one did
        for changes in self._backlog or ():
            index.apply(changes)
        self.index, self._backlog = index, None
        self._log.info("memory.ram_index.loaded", path=str(self._path), vectors=len(index),
                       bytes=index.nbytes, seconds=round(time.perf_counter() - began, 2))

    async def loaded(self) -> None:
        """Wait for the load under way, if any, to end."""
        if self._loading is not None:
            await asyncio.shield(self._loading)

    def apply(self, changes: IndexChanges) -> None:
        """One committed write's changes: applied, kept for after the load, counted toward
        `start_from`, or (the tables made anew) a new load. After `close` (writes finishing
        as memory.db closes), nothing."""
        if self._closed:
            return
        if self.index is not None or self._backlog is not None:
            if changes.rebuilt:
                self.start()
            elif self.index is not None:
                self.index.apply(changes)
            elif self._backlog is not None:
                self._backlog.append(changes)
            return
        if self._failed:
            return
        self._count = (0 if changes.rebuilt else self._count) + changes.net
        if self._count >= self.start_from:
            self.start()

    async def close(self) -> None:
        self._closed = True
        self._generation += 1
        reading = self._reading
        if reading is not None:
            reading.interrupt()  # a load of a million rows takes seconds: stop it now
        if self._loading is not None:
            await asyncio.gather(self._loading, return_exceptions=True)
        self.index, self._backlog = None, None

    async def search(self, vector: Sequence[float], k: int, namespace: str | None,
                     inside: Sequence[tuple[str, Sequence[str]]], *, margin: int, cap: int,
                     bits_within: int | None) -> list[int] | None:
        """`agentd.bitindex.candidates` for `vector`, computed in a thread; None while the
        index is not loaded (search with sqlite-vec)."""
        if self.index is None:
            return None
        return await search_bits(self.index, vector, k, namespace, inside, margin=margin, cap=cap,
                                 bits_within=bits_within)

    def describe(self) -> dict[str, Any]:
        """What memory's stats show of the index."""
        if self.index is not None:
            return {"engine": "ram", "state": "ready", "vectors": len(self.index),
                    "bytes": self.index.nbytes}
        if self._backlog is not None:
            return {"engine": "ram", "state": "loading"}
        if self._failed:
            return {"engine": "sqlite-vec", "state": "failed"}
        return {"engine": "sqlite-vec", "state": "waiting", "vectors": self._count,
                "ram_from": self.start_from}


async def search_bits(index: BitIndex, vector: Sequence[float], k: int, namespace: str | None,
                      inside: Sequence[tuple[str, Sequence[str]]], *, margin: int, cap: int,
                      bits_within: int | None) -> list[int]:
    """`agentd.bitindex.candidates` in `index` for `vector`, computed in a thread (numpy
    releases the GIL: the loop goes on, and two searches use two cores)."""
    import numpy as np

    from agentd.bitindex import candidates, pack_bits

    wanted = index.wanted(inside)
    if wanted is None:
        return []
    views = index.views(namespace)
    query = pack_bits(np.asarray([vector], dtype=np.float32), index.words)[0]
    return await asyncio.to_thread(candidates, views, query, k, dimension=index.dimension,
                                   margin=margin, cap=cap, wanted=wanted, bits_within=bits_within)
