"""agentd's own metrics (agentd/metrics.py) beside prometheus_client: what one increment and
one observation cost on a hot path, and what writing a scrape costs.

    PYTHONPATH=daemon python3 bench/metrics_bench.py [--series 300]

prometheus_client is a benchmark extra (`pip install -e '.[bench]'`). The hot-path figures
are what the daemon's parts do: a labelled counter incremented (a task's name and outcome;
agentd: a `collections.Counter` keyed by label values; prometheus_client:
`Counter.labels(...).inc()`, and with the child looked up once, as a caller could cache it
for fixed labels) and a labelled histogram observed. The scrape writes `--series` counter
series and a tenth as many histograms of 14 buckets. Prints one JSON line, and a markdown
table on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from collections import Counter
from collections.abc import Callable

from agentd.metrics import RUN_BUCKETS, Exposition, Histograms

REPEAT = 5


def best_ns(statement: Callable[[], object], number: int) -> float:
    """The best of REPEAT runs of `number` calls, in ns per call."""
    return min(timeit.repeat(statement, number=number, repeat=REPEAT)) / number * 1e9


def own(series: int) -> dict[str, float]:
    counts: Counter[tuple[str, str]] = Counter()
    run = Histograms(RUN_BUCKETS)
    key = ("task.succeeded", "hello.greet")
    labels = ("hello.greet",)

    def increment() -> None:
        counts[key] += 1

    def observe() -> None:
        run.observe(labels, 0.0123)

    figures = {"increment_ns": best_ns(increment, 200_000), "observe_ns": best_ns(observe, 200_000)}
    for number in range(series):
        counts["task.succeeded", f"task{number}"] += number
    for number in range(series // 10):
        run.observe((f"task{number}",), number / 10)

    def scrape() -> None:
        out = Exposition()
        out.counter("agentd_tasks_succeeded_total", "Tasks that succeeded.", ("task",),
                    {(name,): value for (_, name), value in counts.items()})
        out.histogram("agentd_task_run_seconds", "Attempts' run time.", ("task",), run.by_labels)
        out.text()

    figures["scrape_us"] = best_ns(scrape, 50) / 1000
    return figures


def client(series: int) -> dict[str, float]:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest
    from prometheus_client import Counter as PCounter

    registry = CollectorRegistry()
    succeeded = PCounter("agentd_tasks_succeeded", "Tasks that succeeded.", ["task"], registry=registry)
    run = Histogram("agentd_task_run_seconds", "Attempts' run time.", ["task"],
                    buckets=RUN_BUCKETS, registry=registry)
    child = succeeded.labels("hello.greet")

    def increment() -> None:
        succeeded.labels("hello.greet").inc()

    def increment_cached() -> None:
        child.inc()

    def observe() -> None:
        run.labels("hello.greet").observe(0.0123)

    figures = {"increment_ns": best_ns(increment, 200_000),
               "increment_cached_child_ns": best_ns(increment_cached, 200_000),
               "observe_ns": best_ns(observe, 200_000)}
    for number in range(series):
        succeeded.labels(f"task{number}").inc(number)
    for number in range(series // 10):
        run.labels(f"task{number}").observe(number / 10)
    figures["scrape_us"] = best_ns(lambda: generate_latest(registry), 50) / 1000
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=300, help="counter series in the scrape")
    args = parser.parse_args()
    results = {"series": args.series, "agentd": own(args.series), "prometheus_client": client(args.series)}
    print(json.dumps(results))
    print(f"| ({args.series} counter series, {args.series // 10} histograms) | agentd | prometheus_client |",
          file=sys.stderr)
    print("|---|---:|---:|", file=sys.stderr)
    theirs = results["prometheus_client"]
    print(f"| labelled counter +1 | {results['agentd']['increment_ns']:.0f} ns | "
          f"{theirs['increment_ns']:.0f} ns ({theirs['increment_cached_child_ns']:.0f} ns, child cached) |",
          file=sys.stderr)
    print(f"| labelled histogram observe | {results['agentd']['observe_ns']:.0f} ns | "
          f"{theirs['observe_ns']:.0f} ns |", file=sys.stderr)
    print(f"| scrape written | {results['agentd']['scrape_us']:.0f} µs | {theirs['scrape_us']:.0f} µs |",
          file=sys.stderr)


if __name__ == "__main__":
    main()
