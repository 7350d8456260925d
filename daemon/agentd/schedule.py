"""What a schedule is: its trigger (interval, cron, date), its action (a task or an event)
and its policies, validated from any source (plugin, agentd.toml, HTTP) with errors that
name the field and the value. APScheduler 3 computes the fire times; nothing else of it is
used (its job stores are synchronous and pickle jobs)."""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from agentd.errors import InvalidScheduleError
from agentd.events import validate_topic

CatchUp = Literal["skip", "once", "all"]
Overlap = Literal["allow", "skip", "queue_one", "cancel_previous"]
CATCH_UP = ("skip", "once", "all")
OVERLAP = ("allow", "skip", "queue_one", "cancel_previous")

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
# The longest duration: ten years, what the HTTP API's numbers allow. A longer jitter made
# every fire's task due past the queue's last run_at, so every fire failed.
MAX_DURATION = 10 * 366 * 86_400.0
# The shortest interval, as the text form's "1ms": a schedule every microsecond had every
# one of the fires in its grace period on time, tens of millions a pass, and the scheduler
# never got past it (nor to any other schedule).
MIN_INTERVAL = 0.001


def parse_duration(value: object, field_name: str) -> float:
    """Seconds from `30`, `"30s"`, `"30m"`, `"1h30m"`, `"2d"`, `"500ms"`."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.replace(" ", "")
        parts = _DURATION_PART.findall(text)
        if "".join(n + u for n, u in parts) != text:
            raise InvalidScheduleError(
                f"{field_name}: {value!r} is not a duration like '30s', '30m', '1h30m' or '2d'")
        seconds = sum(float(n) * _UNIT[u] for n, u in parts)
    else:
        raise InvalidScheduleError(f"{field_name}: expected a duration such as '30m', got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidScheduleError(f"{field_name}: must be a positive duration, got {value!r}")
    if seconds > MAX_DURATION:
        raise InvalidScheduleError(f"{field_name}: must be at most ten years, got {value!r}")
    return seconds


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """A schedule's definition. Exactly one of every / cron / at; exactly one of task / event."""

    id: str
    every: float | None = None
    cron: str | None = None
    at: float | None = None
    timezone: str = "UTC"
    task: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    event: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    catch_up: CatchUp = "once"
    catch_up_limit: int = 10
    grace: float = 60.0
    overlap: Overlap = "allow"
    jitter: float = 0.0
    pause_after_failures: int = 0
    queue: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def trigger(self) -> IntervalTrigger | CronTrigger | DateTrigger:
        zone = ZoneInfo(self.timezone)
        if self.every is not None:
            # Anchored at the epoch, so the fire times are the same across restarts.
            start = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
            return IntervalTrigger(seconds=self.every, start_date=start, timezone=zone)
        if self.cron is not None:
            return CronTrigger.from_crontab(self.cron, timezone=zone)
        return DateTrigger(run_date=dt.datetime.fromtimestamp(self.at or 0, dt.UTC), timezone=zone)

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], default_id: str | None = None) -> ScheduleSpec:
        """Validate a schedule given as a mapping (TOML table, JSON body, decorator kwargs).

        Raises:
            InvalidScheduleError: naming the field and the bad value.
        """
        known = {f for f in cls.__dataclass_fields__} | {"name"}
        unknown = sorted(set(table) - known)
        if unknown:
            listed = ", ".join(sorted(known - {"name"}))
            raise InvalidScheduleError(f"unknown field(s): {', '.join(unknown)}; known: {listed}")
        values: dict[str, Any] = {}
        schedule_id = table.get("id", table.get("name", default_id))
        if not isinstance(schedule_id, str) or not _ID.fullmatch(schedule_id):
            raise InvalidScheduleError(
                f"id: {schedule_id!r} must be letters, digits, '_', '.', '-' (at most 128)")
        values["id"] = schedule_id
        triggers = [k for k in ("every", "cron", "at") if table.get(k) is not None]
        if len(triggers) != 1:
            raise InvalidScheduleError("give exactly one trigger: every, cron or at")
        timezone = table.get("timezone", "UTC")
        if not isinstance(timezone, str):
            raise InvalidScheduleError(f"timezone: expected a name such as 'Europe/Paris', got {timezone!r}")
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise InvalidScheduleError(f"timezone: {timezone!r} is not a known time zone") from None
        values["timezone"] = timezone
        if "every" in triggers:
            values["every"] = parse_duration(table["every"], "every")
            if values["every"] < MIN_INTERVAL:
                raise InvalidScheduleError(f"every: must be at least 1 ms, got {table['every']!r}")
        elif "cron" in triggers:
            values["cron"] = _check_cron(table["cron"], timezone)
        else:
            values["at"] = _parse_at(table["at"], timezone)
        _action(table, values)
        _policies(table, values)
        spec = cls(**values)
        try:  # a trigger of dates Python cannot hold (year 0, a billion days) fails here, not later
            spec.trigger().get_next_fire_time(None, dt.datetime.now(dt.UTC))
        except (OverflowError, ValueError, OSError) as exc:
            raise InvalidScheduleError(
                f"{triggers[0]}: {table[triggers[0]]!r} is out of the range of dates ({exc})") from None
        return spec


def _check_cron(expr: object, timezone: str) -> str:
    if not isinstance(expr, str):
        raise InvalidScheduleError(f"cron: expected 5 fields such as '*/5 * * * *', got {expr!r}")
    try:
        CronTrigger.from_crontab(expr, timezone=ZoneInfo(timezone))
    except ValueError as exc:
        raise InvalidScheduleError(f"cron: {expr!r} is not a valid expression: {exc}") from None
    return expr


def _parse_at(value: object, timezone: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value)
        except ValueError:
            raise InvalidScheduleError(f"at: {value!r} is not an ISO 8601 date and time") from None
    else:
        raise InvalidScheduleError(f"at: expected an ISO 8601 date and time, got {value!r}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=ZoneInfo(timezone))
    return moment.timestamp()


def _action(table: Mapping[str, Any], values: dict[str, Any]) -> None:
    task, event = table.get("task"), table.get("event")
    if (task is None) == (event is None):
        raise InvalidScheduleError("give exactly one action: task (with args) or event (with data)")
    if task is not None:
        if table.get("data"):
            raise InvalidScheduleError("data: a task schedule passes args to its task, not data")
        if not isinstance(task, str) or not task:
            raise InvalidScheduleError(f"task: expected a task name, got {task!r}")
        values["task"] = task
        args = table.get("args", {})
        if not isinstance(args, dict):
            raise InvalidScheduleError(f"args: expected an object, got {args!r}")
        values["args"] = dict(args)
        queue = table.get("queue")
        if queue is not None and not isinstance(queue, str):
            raise InvalidScheduleError(f"queue: expected a queue name, got {queue!r}")
        values["queue"] = queue
    else:
        for field_name in ("args", "queue"):
            if table.get(field_name):
                raise InvalidScheduleError(
                    f"{field_name}: an event schedule publishes its event with data; it has no "
                    f"{field_name}")
        try:
            values["event"] = validate_topic(event)
        except ValueError as exc:
            raise InvalidScheduleError(f"event: {exc}") from None
        data = table.get("data", {})
        if not isinstance(data, dict):
            raise InvalidScheduleError(f"data: expected an object, got {data!r}")
        values["data"] = dict(data)


def _policies(table: Mapping[str, Any], values: dict[str, Any]) -> None:
    for name, choices in (("catch_up", CATCH_UP), ("overlap", OVERLAP)):
        if name in table:
            if table[name] not in choices:
                raise InvalidScheduleError(
                    f"{name}: expected one of {', '.join(choices)}, got {table[name]!r}")
            values[name] = table[name]
    for name in ("grace", "jitter"):
        if name in table:
            values[name] = parse_duration(table[name], name)
    for name, minimum in (("catch_up_limit", 1), ("pause_after_failures", 0)):
        if name in table:
            value = table[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise InvalidScheduleError(f"{name}: expected a whole number >= {minimum}, got {value!r}")
            values[name] = value
