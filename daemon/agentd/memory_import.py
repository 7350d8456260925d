"""`agentd memory import FILE`: load existing knowledge into long-term memory.

The file holds JSON lines: each line a JSON object with `text` and, optionally,
`namespace`, `metadata`, `expires_at` or `ttl` (as `POST /v1/memory` takes them), or a
bare JSON string (just the text). Blank lines are skipped. The whole file is read and
checked before anything is sent, so a malformed line (named by its number) stores nothing;
then the lines go in order, in batches, to the running daemon's `POST /v1/memory/batch`.

Importing again is safe: lines already stored come back as duplicates. A batch the daemon
refuses stops the import there, and the message says which line and how many were stored.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TextIO

# What a line may hold: POST /v1/memory's fields but `supersedes` (corrections are made
# one at a time).
LINE_KEYS = ("text", "namespace", "metadata", "expires_at", "ttl")
DEFAULT_BATCH = 256
# Under the daemon's default [server] max_body_bytes (1 MiB), with room for JSON's escapes.
BATCH_BYTES = 512 * 1024

Send = Callable[[list[dict[str, Any]]], Awaitable[dict[str, Any]]]


class ImportFileError(ValueError):
    """A line of the file is not a memory: the message names the file and line."""


class ImportStoppedError(Exception):
    """The daemon refused a batch: the message names the first line of it not stored."""

    def __init__(self, message: str, stored: int) -> None:
        super().__init__(message)
        self.stored = stored


@dataclass(frozen=True, slots=True)
class Line:
    """One memory of the file, with the number of the line it came from."""

    number: int
    body: dict[str, Any]


@dataclass(slots=True)
class Outcome:
    """What an import did."""

    lines: int = 0
    created: int = 0
    duplicates: int = 0


def read_lines(source: Iterable[str], name: str, namespace: str | None = None) -> list[Line]:
    """The memories of a JSON-lines file; `namespace` for lines that name none.

    Raises:
        ImportFileError: a line is not JSON, or not a text or an object with a text.
    """
    lines = []
    for number, raw in enumerate(source, start=1):
        if not raw.strip():
            continue
        where = f"{name}:{number}"
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ImportFileError(f"{where}: not JSON: {exc.msg} (column {exc.colno})") from None
        body = {"text": value} if isinstance(value, str) else value
        if not isinstance(body, dict):
            raise ImportFileError(f"{where}: expected an object with \"text\", or a string; "
                                  f"got {type(value).__name__}")
        unknown = sorted(set(body) - set(LINE_KEYS))
        if unknown:
            raise ImportFileError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(LINE_KEYS)}")
        if not isinstance(body.get("text"), str) or not body["text"].strip():
            raise ImportFileError(f"{where}: \"text\" must be a non-empty string")
        if namespace is not None:
            body.setdefault("namespace", namespace)
        lines.append(Line(number, body))
    return lines


def read_file(path: str, namespace: str | None = None) -> tuple[str, list[Line]]:
    """The name to show for `path` ('-': standard input) and its memories (`read_lines`).

    Raises:
        ImportFileError: the file cannot be read, is not UTF-8, or a line is malformed.
    """
    name = "<stdin>" if path == "-" else path
    try:
        if path == "-":
            return name, read_lines(sys.stdin, name, namespace)
        with open(path, encoding="utf-8") as source:
            return name, read_lines(source, name, namespace)
    except OSError as exc:
        raise ImportFileError(f"{name}: cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ImportFileError(f"{name}: not UTF-8 text: {exc.reason} at byte {exc.start}") from None


def batches(lines: list[Line], size: int, max_bytes: int = BATCH_BYTES) -> list[list[Line]]:
    """`lines` in order, in batches of at most `size` lines and about `max_bytes` of JSON."""
    found: list[list[Line]] = []
    current: list[Line] = []
    weight = 0
    for line in lines:
        line_bytes = len(json.dumps(line.body).encode())
        if current and (len(current) >= size or weight + line_bytes > max_bytes):
            found.append(current)
            current, weight = [], 0
        current.append(line)
        weight += line_bytes
    if current:
        found.append(current)
    return found


async def import_lines(lines: list[Line], send: Send, name: str, *, size: int = DEFAULT_BATCH,
                       progress: Progress | None = None) -> Outcome:
    """Send `lines` batch by batch through `send` (one POST /v1/memory/batch each).

    Raises:
        ImportStoppedError: `send` raised for a batch (ValueError: the daemon refused it, its
            message naming the item, mapped here to its line).
    """
    outcome = Outcome()
    for batch in batches(lines, size):
        try:
            answer = await send([line.body for line in batch])
        except Exception as exc:
            message = _locate(str(exc), batch, name)
            raise ImportStoppedError(
                f"{message}; {outcome.lines} lines before it were stored (importing again "
                "skips them as duplicates)", outcome.lines) from exc
        outcome.lines += len(batch)
        outcome.created += int(answer["created"])
        outcome.duplicates += int(answer["duplicates"])
        if progress is not None:
            progress.update(outcome.lines)
    if progress is not None:
        progress.finish()
    return outcome


def _locate(message: str, batch: list[Line], name: str) -> str:
    """The daemon's message about a batch, led by the file's line it is about: the line of
    the item it names (`memories[3]`), else the batch's lines."""
    _, bracket, rest = message.partition("memories[")
    index, closing, _ = rest.partition("]")
    if bracket and closing and index.isdigit() and int(index) < len(batch):
        return f"{name}:{batch[int(index)].number}: {message}"
    return f"{name}:{batch[0].number}-{batch[-1].number}: {message}"


class Progress:
    """A progress bar on a terminal (redrawn in place); elsewhere (a log, a pipe) a plain
    line at every tenth of the way, so logs stay readable."""

    WIDTH = 30

    def __init__(self, total: int, stream: TextIO = sys.stderr, *, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self._clock = clock
        self._began = clock()
        self._tenths_told = 0

    def update(self, done: int) -> None:
        if self.tty:
            self.stream.write("\r" + self.render(done, self._clock() - self._began))
            self.stream.flush()
            return
        tenths = done * 10 // max(self.total, 1)
        if tenths > self._tenths_told:
            self._tenths_told = tenths
            self.stream.write(self.render(done, self._clock() - self._began) + "\n")
            self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def render(self, done: int, elapsed: float) -> str:
        """`[#########.....]  1,024/10,000 lines  10%  312/s  eta 29s`."""
        share = done / self.total if self.total else 1.0
        filled = round(share * self.WIDTH)
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = f"eta {round((self.total - done) / rate)}s" if rate and done < self.total else "done"
        return (f"[{'#' * filled}{'.' * (self.WIDTH - filled)}]  {done:,}/{self.total:,} lines  "
                f"{share:.0%}  {rate:,.0f}/s  {eta}")
