"""The warning an operator reads in the journal for every task that ended badly: a task
that failed for good (`task.failed`: `Fail` raised, an unknown task, a bad result) or went
dead (`task.dead`: its last attempt failed, or its process died during it), with its name,
id and error. One subscriber on the daemon's bus hears every path that ends a task so (an
attempt's ack, a lease taken over after a crash, another daemon's takeover on PostgreSQL
announces it on the daemon that took it over): no part has to remember to log it."""

from __future__ import annotations

from agentd.bus import Bus, Subscription
from agentd.events import Event
from agentd.log import get_logger

_log = get_logger("tasks")


def warn_on_bad_ends(bus: Bus) -> Subscription:
    """Log `task.failed_for_good` or `task.dead` at warning level for each such event."""
    return bus.subscribe("task.failed,task.dead", _warn, name="task-warnings")


def _warn(event: Event) -> None:
    data = event.data
    _log.warning("task.failed_for_good" if event.topic == "task.failed" else "task.dead",
                 task=data.get("name"), task_id=data.get("task_id"), queue=data.get("queue"),
                 attempt=data.get("attempt"), error=data.get("error"))
