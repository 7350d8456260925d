"""The Dramatiq application queue_bench.py measures: the Redis broker at `BENCH_REDIS_URL`.

Every key it creates starts with `BENCH_REDIS_NS` (the driver deletes exactly those).
Imported both by the producer (peer_driver.py) and by Dramatiq's worker
(`dramatiq peer_dramatiq --processes 1 --threads 8`). Results are stored (Redis result
backend, push-notified) only for the dispatch workload, where `BENCH_RESULTS=1`.
"""

import os
import time

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware
from tracker import TRACKER

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
NAMESPACE = os.environ.get("BENCH_REDIS_NS", "agentd-bench-dramatiq")
RESULTS = os.environ.get("BENCH_RESULTS") == "1"

broker = RedisBroker(url=URL, namespace=NAMESPACE)
backend = None
if RESULTS:
    from dramatiq.results import Results
    from dramatiq.results.backends import RedisBackend

    backend = RedisBackend(url=URL, namespace=NAMESPACE + "-results")
    broker.add_middleware(Results(backend=backend))


class Track(Middleware):
    def after_worker_boot(self, broker, worker):
        TRACKER.ready()

    def before_process_message(self, broker, message):
        TRACKER.started()

    def after_process_message(self, broker, message, *, result=None, exception=None):
        TRACKER.finished(exception is None)

    def after_skip_message(self, broker, message):
        TRACKER.finished(False)


broker.add_middleware(Track())
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="bench", max_retries=0)
def noop():
    return None


def _stamp(t0):
    """Seconds from `t0` (a `time.time()` taken just before the enqueue) to now."""
    return time.time() - t0


stamp = dramatiq.actor(_stamp, actor_name="stamp", queue_name="bench", max_retries=0,
                       **({"store_results": True} if RESULTS else {}))
