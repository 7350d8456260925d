"""What SQLite itself costs per task in the queue's processing loop, outside the daemon.

    python3 bench/queue_sql_cost.py [--tasks 20000] [--batch 32] [--events final|all]
                                    [--drop-index NAME ...]

Builds agentd's schema (its own migrations) in a temporary file with the driver agentd.db
uses, queues `--tasks` rows, then replays the processing loop's statements as the daemon
issues them in one transaction per batch: the claim (one UPDATE ... WHERE id IN (SELECT
... on tasks_claim) RETURNING of `--batch` rows), the batch's acks (an UPDATE ... FROM
(VALUES ...) of many rows), the event log's rows (many per INSERT; by default one per
task, its final event; `--events all`: queued, started and final), and the commit
(synchronous = NORMAL, WAL). `--batch` 32 is about what a transaction holds with 8 workers
and claim-ahead (`tasks_per_transaction` in queue_bench.py's figures).
Prints µs per task for each part, so a schema change (e.g. `--drop-index tasks_running`)
can be weighed before it is made.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from importlib import resources
from pathlib import Path

from agentd.eventlog import INSERT_EVENTS
from agentd.jsontext import lenient_encoder
from agentd.store.driver import plain_driver
from agentd.store.writer import execute_rows
from agentd.taskqueue import ACK_ROW, ACK_STATEMENT, CLAIMED_COLUMNS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=32, help="tasks per transaction")
    parser.add_argument("--events", choices=("final", "all"), default="final",
                        help="event-log rows per task: the final event (default) or all three")
    parser.add_argument("--drop-index", action="append", default=[], metavar="NAME")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="agentd-sqlcost-") as tmp:
        figures = measure(Path(tmp) / "t.db", args)
    print(json.dumps({"bench": "queue_sql_cost", "tasks": args.tasks, "batch": args.batch,
                      "events": args.events, "dropped": args.drop_index, **figures}))


def measure(path: Path, args: argparse.Namespace) -> dict[str, float]:
    conn = plain_driver.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")  # as the daemon: checkpoints are its own
    migrations = sorted(resources.files("agentd").joinpath("sql").iterdir(), key=lambda f: f.name)
    for migration in migrations:
        if migration.name.endswith(".sql"):
            conn.executescript(migration.read_text())
    for name in args.drop_index:
        conn.execute(f"DROP INDEX {name}")
    now = time.time()
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO tasks (queue, name, args, status, priority, run_at, max_attempts, created_at) "
        "VALUES ('default', 'bench.noop', '{}', 'queued', 0, ?, 3, ?)", [(now, now)] * args.tasks)
    conn.execute("COMMIT")
    encode = lenient_encoder()
    spent = {"claim": 0.0, "ack": 0.0, "event_log": 0.0, "commit": 0.0}
    event_id, done, batches = 10**15, 0, 0
    topics = ("task.succeeded",)
    if args.events == "all":
        topics = ("task.queued", "task.started", "task.succeeded")
    while done < args.tasks:
        conn.execute("BEGIN")
        t0 = time.perf_counter()
        claim = conn.cursor()
        claim.row_factory = None
        ids = [row[0] for row in claim.execute(
            "UPDATE tasks SET status = 'running', attempts = attempts + 1, started_at = ?, "
            "lease_until = ? WHERE id IN (SELECT id FROM tasks INDEXED BY tasks_claim "
            "WHERE status = 'queued' AND queue = ? AND run_at <= ? "
            f"ORDER BY priority DESC, run_at, id LIMIT ?) RETURNING {CLAIMED_COLUMNS}",
            (now, now + 60, "default", time.time(), args.batch)).fetchall()]
        t1 = time.perf_counter()
        execute_rows(conn, ACK_STATEMENT, ACK_ROW,
                     [("succeeded", "null", None, now, now + 3600, task_id) for task_id in ids])
        t2 = time.perf_counter()
        rows = []
        for task_id in ids:
            for topic in topics:
                event_id += 1
                data = {"task_id": task_id, "name": "bench.noop", "queue": "default", "status": topic[5:]}
                rows.append((event_id, topic, now, encode(data), str(task_id), None, 1))
        execute_rows(conn, INSERT_EVENTS, "(?,?,?,?,?,?,?)", rows)
        t3 = time.perf_counter()
        conn.execute("COMMIT")
        t4 = time.perf_counter()
        for part, seconds in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            spent[part] += seconds
        done += len(ids)
        batches += 1
        if batches % 500 == 0:  # the daemon checkpoints once the WAL passes 4 MB
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    conn.close()
    per_task = {f"{part}_us": round(seconds / args.tasks * 1e6, 1) for part, seconds in spent.items()}
    return {**per_task, "total_us": round(sum(spent.values()) / args.tasks * 1e6, 1)}


if __name__ == "__main__":
    main()
