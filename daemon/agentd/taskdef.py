"""What a task is before it runs: its definition, the registry of definitions, and the
limits (concurrency cap, token-bucket rate) the workers enforce per name, or per name and
key (`concurrency_key`, `rate_key`: a format over the task's arguments, or a function)."""

from __future__ import annotations

import inspect
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agentd.errors import InvalidTaskError, UnknownTaskError
from agentd.jsontext import compact_encoder

TaskFunction = Callable[..., Any]

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d*)\s*(s|sec|m|min|h|hour)\s*$")
_UNIT_SECONDS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hour": 3600.0}
TASK_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"
_NAME = re.compile(TASK_NAME_PATTERN)
# The daemon's own tasks (webhook and mail delivery, maintenance, digests): plugins and tasks
# enqueue them through ctx; the public API refuses them.
INTERNAL_PREFIX = "agentd."


# A limit's key: a format over the task's arguments ("{user}"), or a function of them.
LimitKey = str | Callable[[dict[str, Any]], str]


@dataclass(frozen=True, slots=True)
class TokenBucket:
    """A rate: `capacity` tokens refilled at `per_second`; a claim takes one. Burst =
    capacity. The buckets themselves (tokens left, a 429's hold) live in the store, one
    per limit group (`rate_group`), so they hold across daemons and restarts."""

    per_second: float
    capacity: float

    @classmethod
    def parse(cls, text: str) -> TokenBucket:
        """`"10/s"`, `"100/m"`, `"5/10s"` (5 per 10 seconds), `"1000/h"`."""
        match = _RATE.match(text) if isinstance(text, str) else None
        if not match or float(match.group(1)) <= 0:
            raise InvalidTaskError(f"rate {text!r} must look like '10/s', '100/m', '5/10s' or '1000/h'")
        count, span, unit = float(match.group(1)), match.group(2), match.group(3)
        seconds = (float(span) if span else 1.0) * _UNIT_SECONDS[unit]
        return cls(per_second=count / seconds, capacity=max(1.0, count))



@dataclass(slots=True)
class TaskDef:
    """A registered task: the function and its defaults."""

    name: str
    fn: TaskFunction
    queue: str = "default"
    max_attempts: int | None = None
    timeout: float | None = None
    priority: int = 0
    concurrency: int | None = None
    rate: TokenBucket | None = None
    concurrency_key: LimitKey | None = None
    rate_key: LimitKey | None = None
    plugin: str | None = None
    remember: bool | str = False
    token_budget: int | None = None
    signature: inspect.Signature = field(init=False)
    is_async: bool = field(init=False)
    # For the common shapes (keyword parameters, maybe **kwargs) `check_args` compares names
    # instead of binding: binding was a tenth of an enqueue's cost.
    _names: frozenset[str] | None = field(init=False, default=None)
    _required: frozenset[str] = field(init=False, default=frozenset())
    _any_keyword: bool = field(init=False, default=False)
    _context_name: str = field(init=False, default="ctx")

    def __post_init__(self) -> None:
        self.signature = inspect.signature(self.fn)
        self.is_async = inspect.iscoroutinefunction(self.fn)
        every = list(self.signature.parameters.values())
        if every:
            self._context_name = every[0].name
        params = every[1:]  # after ctx
        simple = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        named = [p for p in params if p.kind in simple]
        if all(p.kind in simple or p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            self._names = frozenset(p.name for p in named)
            self._required = frozenset(p.name for p in named if p.default is inspect.Parameter.empty)
            self._any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        if not _NAME.fullmatch(self.name):
            raise InvalidTaskError(f"task name {self.name!r} must be letters, digits, '_', '.', '-'")
        if self.concurrency is not None and self.concurrency < 1:
            raise InvalidTaskError(f"task {self.name}: concurrency must be at least 1")
        if self.concurrency_key is not None and self.concurrency is None:
            raise InvalidTaskError(f"task {self.name}: concurrency_key needs a concurrency")
        for what, key in (("concurrency_key", self.concurrency_key), ("rate_key", self.rate_key)):
            if isinstance(key, str):
                try:
                    list(string.Formatter().parse(key))
                except ValueError as exc:
                    raise InvalidTaskError(f"task {self.name}: {what} {key!r}: {exc}") from None
            elif key is not None and not callable(key):
                raise InvalidTaskError(f"task {self.name}: {what} must be a format string or a "
                                       f"function of the arguments, got {type(key).__name__}")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise InvalidTaskError(f"task {self.name}: max_attempts must be at least 1")
        if self.token_budget is not None and self.token_budget < 0:
            raise InvalidTaskError(f"task {self.name}: token_budget must be 0 (none) or more")

    def check_args(self, args: Mapping[str, Any]) -> None:
        """Raise InvalidTaskError unless `fn(ctx, **args)` would bind."""
        if (self._names is not None and self._required.issubset(args)
                and (self._names.issuperset(args)
                     or (self._any_keyword and self._context_name not in args))):
            return
        try:
            self.signature.bind(None, **args)
        except TypeError as exc:
            raise InvalidTaskError(
                f"args do not fit task {self.name}{self.signature}: {exc}", ) from exc


    def limit_keys(self, args: Mapping[str, Any]) -> tuple[str, str]:
        """The task's concurrency and rate keys for `args` ("" without one), or
        InvalidTaskError naming what the key needs and the arguments lack."""
        return (self._key("concurrency_key", self.concurrency_key, args),
                self._key("rate_key", self.rate_key, args))

    def _key(self, what: str, key: LimitKey | None, args: Mapping[str, Any]) -> str:
        if key is None:
            return ""
        try:
            value = key.format_map(args) if isinstance(key, str) else key(dict(args))
        except KeyError as exc:
            raise InvalidTaskError(f"task {self.name}: {what} {key!r} needs the argument "
                                   f"{exc.args[0]!r}, which the task was not given") from None
        except Exception as exc:  # a positional field, a bad attribute, the function's own
            raise InvalidTaskError(f"task {self.name}: {what} failed on these arguments: "
                                   f"{type(exc).__name__}: {exc}") from None
        if not isinstance(value, str):
            raise InvalidTaskError(f"task {self.name}: {what} must give a string, "
                                   f"got {type(value).__name__}")
        return value


def concurrency_group(name: str, key: str) -> str:
    """What a concurrency limit counts: a task name and its concurrency key. Task names
    hold no ':', so the name is the part before the first one."""
    return f"{name}:c:{key}"


def rate_group(name: str, key: str) -> str:
    """What a token bucket and a 429's hold belong to: a task name and its rate key."""
    return f"{name}:r:{key}"


def group_name(group: str) -> str:
    """The task name of a `concurrency_group` or `rate_group`."""
    return group.partition(":")[0]


_ENCODE = compact_encoder(allow_nan=False)


def encode_json(value: Any, what: str) -> str:
    """`value` as compact JSON, or InvalidTaskError naming `what` when it is not JSON."""
    if value is None:
        return "null"
    try:
        return _ENCODE(value)
    except (TypeError, ValueError) as exc:
        raise InvalidTaskError(f"{what} must be JSON-serialisable: {exc}") from exc
    except RecursionError:
        raise InvalidTaskError(f"{what} must be JSON-serialisable: it contains itself, or is "
                               "nested too deeply") from None


class TaskRegistry:
    """Task definitions by name; plugins add theirs at start and remove them when unloaded."""

    def __init__(self) -> None:
        self._defs: dict[str, TaskDef] = {}

    def add(self, definition: TaskDef) -> Callable[[], None]:
        """Register; return the function that removes it again."""
        if definition.name in self._defs:
            raise InvalidTaskError(f"task {definition.name!r} is already registered")
        self._defs[definition.name] = definition
        return lambda: self.remove(definition.name)

    def remove(self, name: str) -> None:
        self._defs.pop(name, None)

    def get(self, name: str) -> TaskDef:
        try:
            return self._defs[name]
        except KeyError:
            raise UnknownTaskError(f"no task named {name!r} is registered") from None

    def find(self, name: str) -> TaskDef | None:
        return self._defs.get(name)

    def names(self) -> list[str]:
        return sorted(self._defs)
