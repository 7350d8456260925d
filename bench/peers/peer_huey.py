"""The Huey application queue_bench.py measures: SqliteHuey on the file `BENCH_HUEY_DB`.

Imported both by the producer (peer_driver.py) and by Huey's consumer
(`huey_consumer peer_huey.huey -k thread -w 8`). Defaults everywhere else.
"""

import os
import time

from huey import SqliteHuey
from huey.signals import SIGNAL_COMPLETE, SIGNAL_ERROR, SIGNAL_EXECUTING
from tracker import TRACKER

huey = SqliteHuey("bench", filename=os.environ.get("BENCH_HUEY_DB", "bench-huey.db"))


@huey.task()
def noop():
    return None


@huey.task()
def stamp(t0):
    """Seconds from `t0` (a `time.time()` taken just before the enqueue) to now."""
    return time.time() - t0


@huey.signal(SIGNAL_EXECUTING)
def _executing(signal, task):
    TRACKER.started()


@huey.signal(SIGNAL_COMPLETE)
def _complete(signal, task):
    TRACKER.finished(True)


@huey.signal(SIGNAL_ERROR)
def _error(signal, task, exc=None):
    TRACKER.finished(False)


@huey.on_startup()
def _ready():
    TRACKER.ready()
