"""memory.db's binary codes in numpy arrays, and the scan that finds recall's candidates.

sqlite-vec scans a partition's codes through SQLite's pages, chunk by chunk, and its cost
grows with the file: at 1,000,000 memories an unfiltered recall took 490 ms and one in a
namespace of 100,000 took 80 ms (docs/benchmarks.md), slower than numpy's brute force over
the float vectors. The same codes as numpy arrays, one block per namespace (48 bytes a
memory at 384 dimensions, plus 8 for its id and 4 per filter field), are scanned in a
fraction of that. `agentd.ramindex` keeps a `BitIndex` beside memory.db: loaded from it,
then following its writes.

What a scan answers is a list of candidates by Hamming distance, chosen by the SQL path's
rule (`SqliteMemory._knn`): the `k` nearest codes, then every code within `margin` bits of
the k-th, at most `cap`. The caller re-ranks them by exact cosine and keeps only live
memories, so an entry that outlived its memory by a moment costs nothing.

This module imports numpy; `agentd.ramindex` imports it only once an index is wanted.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby
from operator import itemgetter
from typing import Any

import numpy as np

from agentd.ramindex import IndexChanges, Indexed

_MIN_CAPACITY = 64  # rows a new namespace's block holds before it first grows
_SCAN_ROWS = 65_536  # codes per pass of a scan: its temporaries (512 kB) stay in the CPU's cache
_SPLIT_ROWS = 4 * _SCAN_ROWS  # a scan of this many codes runs in two halves at once


def words_for(dimension: int) -> int:
    """The 64-bit words one code takes: the bits padded with zeros to a whole word."""
    return (dimension + 63) // 64


def pack_bits(vectors: np.ndarray, words: int) -> np.ndarray:
    """The binary codes of `vectors` (rows of float32) as rows of `words` uint64 words:
    bit i is set when component i is above 0, the bits of each byte in little-endian order.
    That is how sqlite-vec's `vec_quantize_binary` packs them, so codes read from
    memory_vectors and codes made here compare (a test holds the two to it)."""
    return _in_words(np.packbits(vectors > 0, axis=1, bitorder="little"), words)


def codes_of(bits: Sequence[bytes], words: int) -> np.ndarray:
    """Codes as memory_vectors stores them (`bit[D]`: D/8 bytes each), as rows of words."""
    return _in_words(_byte_rows(bits), words)


# Each byte with its bits in reverse order: PostgreSQL's bit strings put a vector's first
# component in a byte's high bit, sqlite-vec (and `pack_bits`) in its low bit.
_REVERSED_BITS = np.array([int(f"{b:08b}"[::-1], 2) for b in range(256)], dtype=np.uint8)


def codes_of_bit_strings(bits: Sequence[bytes], words: int) -> np.ndarray:
    """Codes as PostgreSQL's `bit` type sends them (pgvector's `binary_quantize`, without
    `bit_send`'s 4-byte length), as rows of words packed as `pack_bits` packs them."""
    return _in_words(_REVERSED_BITS[_byte_rows(bits)], words)


def _byte_rows(bits: Sequence[bytes]) -> np.ndarray:
    """Equal-length byte strings as the rows of a uint8 array."""
    size = len(bits[0]) if bits else 0
    return np.frombuffer(b"".join(bits), dtype=np.uint8).reshape(len(bits), size)


def _in_words(packed: np.ndarray, words: int) -> np.ndarray:
    """Rows of packed bytes as rows of `words` uint64 words, padded with zero bits."""
    padded = np.zeros((len(packed), words * 8), dtype=np.uint8)
    padded[:, :packed.shape[1]] = packed
    return padded.view(np.uint64)


class _Block:
    """One namespace's rows: rows [0, count) of parallel arrays, a dead row's id -1. The
    codes are stored a word per row of `codes` (words x capacity): a scan then runs each
    step over one contiguous array, four times as fast at 100,000 codes as over rows of
    six words (measured, 0.7 against 2.9 ms).

    Rows are appended past `count` and only then counted, and growing or compacting makes
    new arrays, so a scan in a thread holding views of [0, count) sees whole rows whatever
    the loop does meanwhile. Only a removal writes in place (an id to -1): the scan may then
    still return that id, which the caller's re-rank of live memories drops."""

    __slots__ = ("codes", "count", "dead", "ids", "tags")

    def __init__(self, words: int, fields: int, capacity: int = _MIN_CAPACITY) -> None:
        self.codes = np.zeros((words, capacity), dtype=np.uint64)
        self.ids = np.full(capacity, -1, dtype=np.int64)
        self.tags = np.zeros((capacity, fields), dtype=np.int32)
        self.count = 0
        self.dead = 0

    def append(self, ids: np.ndarray, codes: np.ndarray, tags: np.ndarray) -> None:
        rows = len(ids)
        if self.count + rows > len(self.ids):
            self._move(max(2 * len(self.ids), self.count + rows))
        end = self.count + rows
        self.codes[:, self.count:end] = codes.T
        self.tags[self.count:end] = tags
        self.ids[self.count:end] = ids
        self.count = end

    def kill(self, doomed: np.ndarray) -> int:
        """Mark the rows whose id is in `doomed` dead; how many were live."""
        hit = np.flatnonzero(np.isin(self.ids[:self.count], doomed))
        if hit.size:
            self.ids[hit] = -1
            self.dead += int(hit.size)
            if self.dead * 4 > self.count:  # a quarter dead: scans would pay for them
                self._move(max(_MIN_CAPACITY, 2 * (self.count - self.dead)))
        return int(hit.size)

    def _move(self, capacity: int) -> None:
        """Copy the live rows to new arrays of `capacity` rows."""
        live = np.flatnonzero(self.ids[:self.count] >= 0)
        codes = np.zeros((self.codes.shape[0], capacity), dtype=np.uint64)
        ids = np.full(capacity, -1, dtype=np.int64)
        tags = np.zeros((capacity, self.tags.shape[1]), dtype=np.int32)
        codes[:, :live.size] = self.codes[:, live]
        ids[:live.size] = self.ids[live]
        tags[:live.size] = self.tags[live]
        self.codes, self.ids, self.tags = codes, ids, tags
        self.count, self.dead = int(live.size), 0

    @property
    def live(self) -> int:
        return self.count - self.dead

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.ids.nbytes + self.tags.nbytes


# (codes, ids, tags) of one block's rows [0, count), codes a word per row: what a scan reads.
BlockView = tuple[np.ndarray, np.ndarray, np.ndarray]


class BitIndex:
    """The binary codes of the searchable memories, by namespace; see the module's doc."""

    def __init__(self, dimension: int, fields: Sequence[str]) -> None:
        self.dimension = dimension
        self.words = words_for(dimension)
        self.fields = tuple(fields)
        self._blocks: dict[str, _Block] = {}
        # A code per filter value seen, per field: rows hold codes, a filter compares codes.
        self._vocabulary: list[dict[str, int]] = [{} for _ in self.fields]
        self._max_id = 0

    def __len__(self) -> int:
        return sum(block.live for block in self._blocks.values())

    @property
    def nbytes(self) -> int:
        return sum(block.nbytes for block in self._blocks.values())

    def add(self, entries: Sequence[Indexed]) -> None:
        """Index `entries`; an id the index holds already is replaced."""
        if not entries:
            return
        vectors = np.frombuffer(b"".join(e.vector for e in entries), dtype=np.float32)
        self.put([e.memory_id for e in entries], [e.namespace for e in entries],
                 [e.filters for e in entries], pack_bits(vectors.reshape(len(entries), -1), self.words))

    def put(self, ids: Sequence[int], namespaces: Sequence[str], filters: Sequence[tuple[str, ...]],
            codes: np.ndarray) -> None:
        """`append`, an id the index holds already replaced."""
        # Ids above any held cannot be held: a new memory's id costs no search.
        self.remove([memory_id for memory_id in ids if memory_id <= self._max_id])
        self.append(ids, namespaces, filters, codes)

    def append(self, ids: Sequence[int], namespaces: Sequence[str], filters: Sequence[tuple[str, ...]],
               codes: np.ndarray) -> None:
        """Index memories none of which the index holds (a load's rows): their ids,
        namespaces, filter values and codes (rows of `words` words), in the same order."""
        if not ids:
            return
        self._max_id = max(self._max_id, *ids)
        by_namespace: dict[str, list[int]] = {}
        for row, namespace in enumerate(namespaces):
            by_namespace.setdefault(namespace, []).append(row)
        id_array = np.asarray(ids, dtype=np.int64)
        tags = np.array([self._tag(values) for values in filters], dtype=np.int32).reshape(
            len(ids), len(self.fields))
        for namespace, rows in by_namespace.items():
            block = self._blocks.get(namespace)
            if block is None:
                block = self._blocks[namespace] = _Block(self.words, len(self.fields))
            block.append(id_array[rows], codes[rows], tags[rows])

    def remove(self, memory_ids: Collection[int]) -> int:
        """Drop `memory_ids` (those it holds); how many it held."""
        if not memory_ids:
            return 0
        doomed = np.fromiter(memory_ids, dtype=np.int64, count=len(memory_ids))
        return sum(block.kill(doomed) for block in self._blocks.values())

    def retag(self, memory_id: int, filters: tuple[str, ...]) -> None:
        """Give `memory_id` new filter field values (its metadata changed, its text not)."""
        tags = self._tag(filters)
        for block in self._blocks.values():
            hit = np.flatnonzero(block.ids[:block.count] == memory_id)
            if hit.size:
                block.tags[hit[0]] = tags
                return

    def apply(self, changes: IndexChanges) -> None:
        """One committed write's changes, in order; a run of adds or of removes goes in at
        once (a purge's thousands of removes cost one pass over the blocks)."""
        for kind, steps in groupby(changes.steps, key=itemgetter(0)):
            values: list[Any] = [value for _, value in steps]
            if kind == "add":
                self.add(values)
            elif kind == "remove":
                self.remove(values)
            else:
                for memory_id, filters in values:
                    self.retag(memory_id, filters)

    def views(self, namespace: str | None) -> list[BlockView]:
        """The rows a search in `namespace` (None: all of them) scans, as they are now."""
        blocks = list(self._blocks.values()) if namespace is None else \
            [self._blocks[namespace]] if namespace in self._blocks else []
        return [(b.codes[:, :b.count], b.ids[:b.count], b.tags[:b.count]) for b in blocks if b.live]

    def values(self, field: str) -> Collection[str]:
        """The values of filter field `field` the index has seen."""
        return self._vocabulary[self.fields.index(field)].keys()

    def wanted(self, inside: Sequence[tuple[str, Sequence[str]]]) -> list[tuple[int, np.ndarray]] | None:
        """`inside` ({field: values} on filter fields) as (column, codes); None when a field
        wants only values no memory has (nothing can match)."""
        wanted = []
        for name, values in inside:
            column = self.fields.index(name)
            codes = [self._vocabulary[column][v] for v in values if v in self._vocabulary[column]]
            if not codes:
                return None
            wanted.append((column, np.array(codes, dtype=np.int32)))
        return wanted

    def _tag(self, filters: tuple[str, ...]) -> list[int]:
        return [vocabulary.setdefault(value, len(vocabulary))
                for vocabulary, value in zip(self._vocabulary, filters, strict=True)]


def candidates(views: Sequence[BlockView], query: np.ndarray, k: int, *, dimension: int,
               margin: int, cap: int, wanted: Sequence[tuple[int, np.ndarray]] = (),
               bits_within: int | None = None) -> list[int]:
    """The ids to re-rank for the `k` nearest to the code `query` among `views`' live rows
    whose tags hold one of the `wanted` codes in each wanted column: the `k` nearest by
    Hamming distance, then every row within `margin` bits of the k-th, the nearest `cap` of
    those; none when the nearest differs in more than `bits_within` bits. Reads only its
    arguments: it runs in a thread while the loop goes on."""
    excluded = dimension + 1  # a distance no real code has: dead or filtered-out rows
    distances, counts = _scan_all(views, query, wanted, dimension)
    within = np.cumsum(counts[:excluded])
    live = int(within[-1]) if within.size else 0
    if live == 0:
        return []
    nearest = int(np.argmax(counts[:excluded] > 0))
    if bits_within is not None and nearest > bits_within:
        return []
    kth = int(np.searchsorted(within, min(k, live)))
    reach = min(kth + margin, dimension)
    if within[reach] > cap:
        # More than `cap` within reach: the rows nearer than the distance at which `cap` is
        # passed, then as many at that distance as fit.
        edge = int(np.searchsorted(within, cap, side="right"))
        room = cap - (int(within[edge - 1]) if edge > 0 else 0)
    else:
        edge, room = reach + 1, 0
    found: list[int] = []
    for (_, ids, _), d in zip(views, distances, strict=True):
        found.extend(ids[d < edge].tolist())
        if room > 0:
            at_edge = ids[d == edge][:room]
            room -= len(at_edge)
            found.extend(at_edge.tolist())
    return found


def _scan_all(views: Sequence[BlockView], query: np.ndarray, wanted: Sequence[tuple[int, np.ndarray]],
              dimension: int) -> tuple[list[np.ndarray], np.ndarray]:
    """`_scan` of every view: the distances of each, and the count of rows at each distance
    in all. A long scan is cut in two halves by rows, the second scanned by a helper thread
    at the same time (numpy releases the GIL): a million codes took 9.9 ms on one core, 7.9 on two (the
    scan is bound by memory bandwidth: 48 MB a million)."""
    total = sum(ids.shape[0] for _, ids, _ in views)
    if total < _SPLIT_ROWS:
        scanned = [_scan(view, query, wanted, dimension) for view in views]
    else:
        halves: tuple[list[BlockView], list[BlockView]] = ([], [])
        start = 0
        for codes, ids, tags in views:
            cut = min(max(total // 2 - start, 0), ids.shape[0])
            halves[0].append((codes[:, :cut], ids[:cut], tags[:cut]))
            halves[1].append((codes[:, cut:], ids[cut:], tags[cut:]))
            start += ids.shape[0]
        theirs = _helper().submit(lambda: [_scan(view, query, wanted, dimension) for view in halves[1]])
        mine = [_scan(view, query, wanted, dimension) for view in halves[0]]
        scanned = [(np.concatenate([d0, d1]), c0 + c1)
                   for (d0, c0), (d1, c1) in zip(mine, theirs.result(), strict=True)]
    counts = np.zeros(dimension + 2, dtype=np.int64)
    for _, view_counts in scanned:
        counts += view_counts
    return [d for d, _ in scanned], counts


def _scan(view: BlockView, query: np.ndarray, wanted: Sequence[tuple[int, np.ndarray]],
          dimension: int) -> tuple[np.ndarray, np.ndarray]:
    """The Hamming distance of each row of `view` to `query` (dimension + 1 for a dead row
    or one the filters leave out), and the count of rows at each distance."""
    codes, ids, tags = view
    d = _hamming(codes, query)
    keep = ids >= 0
    for column, codes_wanted in wanted:
        keep &= np.isin(tags[:, column], codes_wanted)
    d[~keep] = dimension + 1
    return d, np.bincount(d, minlength=dimension + 2)


@functools.cache
def _helper() -> ThreadPoolExecutor:
    """The one thread that scans the second half of long scans, started on first use."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentd-bitscan")


def _hamming(codes: np.ndarray, query: np.ndarray) -> np.ndarray:
    """The Hamming distance of each code of `codes` (a word per row) to `query`, as
    uint16, `_SCAN_ROWS` codes a pass."""
    words, count = codes.shape
    out = np.empty(count, dtype=np.uint16)
    for start in range(0, count, _SCAN_ROWS):
        end = min(count, start + _SCAN_ROWS)
        differ = np.bitwise_xor(codes[0, start:end], query[0])
        bits = np.bitwise_count(differ)
        total = out[start:end]
        total[:] = bits
        for word in range(1, words):
            np.bitwise_xor(codes[word, start:end], query[word], out=differ)
            np.bitwise_count(differ, out=bits)
            total += bits
    return out
