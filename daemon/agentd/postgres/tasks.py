"""`TaskStore` (agentd/taskqueue.py) on PostgreSQL: the queue shared by several daemons.

What differs from one daemon on one SQLite file:

- Claims skip the rows other daemons are claiming (`FOR UPDATE SKIP LOCKED`), so no task
  is claimed twice. A name's concurrency and rate limits hold across daemons: with limited
  names registered, a claim first takes a transaction-level advisory lock per limited name,
  then counts the running rows of its concurrency groups (name and key) and refills and
  spends the token buckets of its rate groups (the `task_rates` table) under it. A 429's
  hold (`task_rates.held_until`) keeps every claim off its rate group's tasks.
- Nodes. Each daemon is a row of `nodes` (registered at start, its heartbeat renewed with
  its leases, removed at a clean stop); a lease carries its node (`lease_node`). Every
  daemon's heartbeat takes back the tasks whose lease lapsed, whoever held it. Leases run on
  the database server's clock, so the hosts' clocks need not agree for them.
- News between daemons, as notifications sent at commit (PostgreSQL sends a notification
  repeated within a transaction once): `agentd_work` (a queue name; empty: every queue)
  after a commit that makes work claimable or frees a limited name's place, `agentd_done`
  (task ids) at final states, for `TaskQueue.wait` on any daemon, and `agentd_cancel`
  (task ids) for a running task's cancel, which the daemon running it acts on. After the
  listening connection is re-opened the queue re-reads what it waits for (`listen`).
- Assignment (push), which saves a claim's round trip on the way from an enqueue to the
  start. A daemon whose claim loop for a queue waits tells the others how many of its
  slots are free (`agentd_idle`, "<node> <queue> <free>") whenever that number changes. A
  daemon enqueueing a due task of an unlimited name inserts it already running under its
  own lease if it has a free slot on that queue, else under the lease of a daemon that
  told of one, and notifies `agentd_assign` ("<origin> <node> <queue> <count> <records>",
  or their ids when the records do not fit): the daemon named starts it at once, or puts
  it back in the queue if its slots filled meanwhile. Only a daemon that hears
  notifications is assigned anything: it holds an advisory lock on its listening
  connection while that is open, and the insert falls back to a queued row (and
  `agentd_work`) when the lock is free. A daemon that dies holding assigned tasks loses
  them to the others when their leases lapse, as with the tasks it claimed ahead.
- Peers. `agentd_nodes` ("up <node>" when a daemon registers, "down <node>" when it stops
  cleanly) and each heartbeat's read of `nodes` keep `peers_alive()`: whether any other
  daemon shares the database, so that a daemon alone sends nothing meant for others (the
  event log's ephemeral events). A dead daemon's row counts until it is forgotten.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, Generic, Literal, NoReturn, TypeVar

from agentd.errors import TaskNotFoundError, TaskStateError, describe
from agentd.log import get_logger
from agentd.store.postgres import PgConnection, PgStore, notify
from agentd.store.text import storable_error
from agentd.taskqueue import (
    CLAIMED_COLUMNS,
    FINAL_SQL,
    INSERT_COLUMNS,
    UNSUCCESSFUL,
    UNSUCCESSFUL_SQL,
    AckWriter,
    ClaimFuture,
    NameLimits,
    QueueFigures,
    TaskRecord,
    TaskStatus,
    limit_budgets,
    node_id,
    pick_within_budgets,
    spend_tokens,
)

_LOG = get_logger("tasks")

V = TypeVar("V")
R = TypeVar("R")

WORK, DONE, CANCEL, NODES = "agentd_work", "agentd_done", "agentd_cancel", "agentd_nodes"
IDLE, ASSIGN = "agentd_idle", "agentd_assign"
_PAYLOAD_MAX = 7000  # bytes of ids per notification (PostgreSQL's limit is 8,000)
# Seconds after its last heartbeat that a dead node's row is removed.
_FORGET_NODE_AFTER = 600.0
# Lock keys of limited names: a namespace for hashtextextended.
_LIMIT_LOCK_SEED = 0x6167656E74
# The lock a daemon holds on its listening connection ('agentd.node:' || its node id):
# assignable only while held.
_NODE_LOCK_SEED = 0x6E6F6465
# Rows one insert assigns at most: their ids must fit one notification.
_ASSIGN_MAX = 300
# Marks the origin of an assignment whose insert was its own transaction: the daemon that
# assigned the tasks to itself starts them as the statement returns (before or after the
# notification comes back: the first of the two starts them).
_STARTS_TOO = "!"

_TASK = "SELECT * FROM tasks WHERE id = $1"
_EXISTS = "SELECT 1 FROM tasks WHERE id = $1"
_STATUS = "SELECT status FROM tasks WHERE id = $1"
_CHILDREN = "SELECT id FROM tasks WHERE parent_id = $1 ORDER BY id"
# Its usage, and whether another daemon runs it (this one's lease lapsed and was taken over).
_USAGE = ("SELECT usage, status = 'running' AND lease_node <> $2 FROM tasks WHERE id = $1 "
          "FOR UPDATE")
_SET_USAGE = "UPDATE tasks SET usage = $1 WHERE id = $2"
_UNNEST = ("unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::float8[], "
           "$7::bigint[], $8::float8[], $9::text[], $10::bigint[], $11::text[], $12::float8[], "
           "$13::text[], $14::text[])")
_INSERT_MANY = f"INSERT INTO tasks ({INSERT_COLUMNS}) SELECT * FROM {_UNNEST} RETURNING id"
# The same, notifying its queues, as one statement (`_Batched`'s lone form).
_INSERT_MANY_NOTIFYING = (
    f"WITH inserted AS (INSERT INTO tasks ({INSERT_COLUMNS}) SELECT * FROM {_UNNEST} RETURNING id, queue), "
    f"notified AS (SELECT count(pg_notify('{WORK}', queue)) FROM (SELECT DISTINCT queue FROM inserted) q) "
    "SELECT id FROM inserted, notified")
_INSERT_KEYED = (f"INSERT INTO tasks ({INSERT_COLUMNS}) "
                 "VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14) "
                 "ON CONFLICT (idempotency_key) DO NOTHING RETURNING id")
_INSERT_CANCELLED = (
    f"INSERT INTO tasks ({INSERT_COLUMNS}, cancel_requested, error, finished_at, expires_at) "
    "VALUES ($1,$2,$3,'cancelled',$4,$5,$6,$7,$8,$9,$10,$11,$12,$13, 1, 'cancelled', $14, $15) "
    "ON CONFLICT (idempotency_key) DO NOTHING RETURNING *")
_BY_KEY = "SELECT * FROM tasks WHERE idempotency_key = $1 FOR UPDATE"
_FREE_KEY = "UPDATE tasks SET idempotency_key = NULL WHERE id = $1"
_BEING_CANCELLED = "SELECT 1 FROM tasks WHERE id = $1 AND cancel_requested <> 0"
_REQUEUE = (
    "UPDATE tasks SET status = 'queued', attempts = 0, run_at = $1, error = NULL, "
    "result = NULL, cancel_requested = 0, finished_at = NULL, expires_at = NULL, "
    f"lease_until = NULL, lease_node = NULL WHERE id = $2 AND status IN {UNSUCCESSFUL_SQL} "
    "RETURNING *")
_FREE_UNSUCCESSFUL_CHILDREN_KEYS = (
    "UPDATE tasks SET idempotency_key = NULL WHERE parent_id = $1 "
    f"AND (status IN {UNSUCCESSFUL_SQL} OR cancel_requested <> 0) AND idempotency_key IS NOT NULL")
_DELETE = f"DELETE FROM tasks WHERE id = $1 AND status IN {FINAL_SQL} RETURNING id"
_PURGE_EXPIRED = f"DELETE FROM tasks WHERE expires_at < $1 AND status IN {FINAL_SQL}"
_PURGE_BUCKETS = "DELETE FROM task_rates WHERE held_until < $1 AND updated_at < $2"
_COUNTS = "SELECT status, count(*) FROM tasks GROUP BY status"
_BY_QUEUE = f"""
SELECT queue, 'queued', count(*), count(*) FILTER (WHERE run_at <= $1),
    min(run_at) FILTER (WHERE run_at <= $1) FROM tasks WHERE status = 'queued' GROUP BY queue
UNION ALL SELECT queue, 'running', count(*), 0, NULL FROM tasks WHERE status = 'running' GROUP BY queue
UNION ALL SELECT queue, status, count(*), 0, NULL FROM tasks
    WHERE error IS NOT NULL AND status IN {UNSUCCESSFUL_SQL} GROUP BY queue, status
"""
_DESCENDANTS = """
WITH RECURSIVE tree(id) AS (
    SELECT $1::bigint UNION SELECT tasks.id FROM tasks JOIN tree ON tasks.parent_id = tree.id
) SELECT id FROM tree
"""
_CANCEL_QUEUED = (
    "UPDATE tasks SET status = 'cancelled', cancel_requested = 1, finished_at = $1, "
    "expires_at = $2, error = 'cancelled' WHERE id = ANY($3::bigint[]) "
    "AND status IN ('queued', 'waiting') RETURNING *")
# A waiting task's wait ends with it: no timer or event wakes it.
_CLOSE_CANCELLED_WAITS = ("DELETE FROM task_waits WHERE resolved_at IS NULL "
                          "AND task_id = ANY($1::bigint[])")
_CANCEL_RUNNING = ("UPDATE tasks SET cancel_requested = 1 WHERE id = ANY($1::bigint[]) "
                   "AND status = 'running' RETURNING id")
_CANCELS_AMONG = "SELECT id FROM tasks WHERE cancel_requested <> 0 AND id = ANY($1::bigint[])"

# -- the workers' statements
_ACK = ("UPDATE tasks SET status = v.status, result = v.result, error = v.error, "
        "finished_at = v.finished_at, expires_at = v.expires_at, lease_until = NULL, "
        "lease_node = NULL FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], "
        "$5::float8[], $6::bigint[]) AS v(status, result, error, finished_at, expires_at, id) "
        "WHERE tasks.id = v.id AND tasks.status = 'running' AND tasks.lease_node = $7 "
        "RETURNING tasks.id, tasks.name")
# A claim leaves out the tasks of the limit groups blocked ($3: a group's kind is in its
# string, agentd/taskdef.py) and of the rate groups a 429 holds back.
_NOT_BLOCKED = ("AND NOT (name || ':c:' || concurrency_key = ANY($3::text[])) "
                "AND NOT (name || ':r:' || rate_key = ANY($3::text[])) "
                "AND name || ':r:' || rate_key NOT IN (SELECT name FROM task_rates WHERE held_until > $2)")
_DUE = (f"FROM tasks WHERE status = 'queued' AND queue = $1 AND run_at <= $2 {_NOT_BLOCKED} "
        "ORDER BY priority DESC, run_at, id FOR UPDATE SKIP LOCKED LIMIT $4")
_HELD_UNTIL = "(SELECT min(held_until) FROM task_rates WHERE held_until > $2)"
# Leases are written and compared on the database server's clock, the one clock every daemon
# shares: with each daemon's own, a host whose clock ran ahead by more than two thirds of a
# lease took over live tasks, and one running behind renewed leases that others saw lapsed.
_SERVER_NOW = "extract(epoch FROM clock_timestamp())"
_CLAIM_SET = ("UPDATE tasks SET status = 'running', attempts = attempts + 1, started_at = $5, "
              f"lease_until = {_SERVER_NOW} + $6::float8, lease_node = $7")
# What an assignment's notification carries of each task (`_assigned_record`): the daemon
# named starts it from that, without reading it, unless they are too many or too big for
# one notification (then only their ids, and it reads them).
_ASSIGNED_FIELDS = ("id, queue, name, args, priority, run_at, max_attempts, timeout, correlation_id, "
                    "created_at, started_at")
_PAYLOAD_LIMIT = 7999  # PostgreSQL's limit is 8,000 bytes
# `_INSERT_MANY_NOTIFYING` with some rows assigned ($15: the node per row, NULL for a queued
# row; $16 their start, $17 the lease, $18 this node): a row whose rate group a 429 holds
# back (`_HOLD`), or whose node does not hold its lock (not listening, or gone), is
# inserted queued instead. The CTE `targets` runs a
# volatile function, so it is evaluated once per row, and its CASE tries the lock only for
# the assigned rows.
_INSERT_ASSIGNING = (
    "WITH targets AS (SELECT u.*, CASE WHEN u.node IS NULL THEN NULL "
    "WHEN EXISTS (SELECT 1 FROM task_rates r WHERE r.name = u.name || ':r:' || u.rate_key "
    "AND r.held_until > $16::float8) THEN NULL "
    "WHEN pg_try_advisory_xact_lock_shared(hashtextextended('agentd.node:' || u.node, "
    f"{_NODE_LOCK_SEED})) THEN NULL ELSE u.node END AS target FROM "
    "unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::float8[], "
    "$7::bigint[], $8::float8[], $9::text[], $10::bigint[], $11::text[], $12::float8[], "
    "$13::text[], $14::text[], $15::text[]) AS u(queue, name, args, status, priority, run_at, "
    "max_attempts, timeout, idempotency_key, parent_id, correlation_id, created_at, "
    "concurrency_key, rate_key, node)), "
    f"inserted AS (INSERT INTO tasks ({INSERT_COLUMNS}, attempts, started_at, lease_until, lease_node) "
    "SELECT queue, name, args, CASE WHEN target IS NULL THEN status ELSE 'running' END, priority, "
    "run_at, max_attempts, timeout, idempotency_key, parent_id, correlation_id, created_at, "
    "concurrency_key, rate_key, CASE WHEN target IS NULL THEN 0 ELSE 1 END, "
    "CASE WHEN target IS NOT NULL THEN $16::float8 END, "
    f"CASE WHEN target IS NOT NULL THEN {_SERVER_NOW} + $17::float8 END, target FROM targets "
    f"RETURNING {_ASSIGNED_FIELDS}, lease_node), "
    f"notified AS (SELECT count(pg_notify('{WORK}', queue)) FROM "
    "(SELECT DISTINCT queue FROM inserted WHERE lease_node IS NULL) q), "
    f"assigned AS (SELECT count(pg_notify('{ASSIGN}', CASE WHEN octet_length(head || records) "
    f"<= {_PAYLOAD_LIMIT} THEN head || records ELSE head || ids END)) FROM (SELECT "
    "$18 || ' ' || lease_node || ' ' || queue || ' ' || count(*) || ' ' AS head, "
    "string_agg(id::text, ',') AS ids, "
    f"json_agg(json_build_array({_ASSIGNED_FIELDS}))::text AS records "
    "FROM inserted WHERE lease_node IS NOT NULL GROUP BY lease_node, queue) a) "
    "SELECT id, lease_node FROM inserted, notified, assigned")
# `_INSERT_ASSIGNING` for one row, assigned ($15 its node): simpler to plan (sessions plan
# each statement anew, `_SESSION_SETTINGS`), which saves a third of the enqueue's time.
_INSERT_ASSIGNED_ONE = (
    f"WITH inserted AS (INSERT INTO tasks ({INSERT_COLUMNS}, attempts, started_at, lease_until, "
    "lease_node) SELECT $1, $2, $3, CASE WHEN t.target IS NULL THEN $4 ELSE 'running' END, $5, $6, "
    "$7, $8, $9, $10, $11, $12, $13, $14, CASE WHEN t.target IS NULL THEN 0 ELSE 1 END, "
    "CASE WHEN t.target IS NOT NULL THEN $16::float8 END, "
    f"CASE WHEN t.target IS NOT NULL THEN {_SERVER_NOW} + $17::float8 END, t.target FROM "
    "(SELECT CASE WHEN EXISTS (SELECT 1 FROM task_rates WHERE name = $2 || ':r:' || $14 "
    "AND held_until > $16::float8) THEN NULL WHEN pg_try_advisory_xact_lock_shared("
    f"hashtextextended('agentd.node:' || $15::text, {_NODE_LOCK_SEED})) THEN NULL "
    "ELSE $15::text END AS target) t "
    f"RETURNING {_ASSIGNED_FIELDS}, lease_node) "
    f"SELECT id, lease_node, CASE WHEN lease_node IS NULL THEN pg_notify('{WORK}', queue) ELSE "
    f"pg_notify('{ASSIGN}', CASE WHEN octet_length(head || record) <= {_PAYLOAD_LIMIT} "
    "THEN head || record ELSE head || id END) END FROM (SELECT *, $18 || ' ' || lease_node || ' ' "
    f"|| queue || ' 1 ' AS head, json_build_array(json_build_array({_ASSIGNED_FIELDS}))::text "
    "AS record FROM inserted) i")
_HOLD_NODE_LOCK = "SELECT pg_advisory_lock(hashtextextended($1, $2))"
_ASSIGNED = (f"SELECT {CLAIMED_COLUMNS}, started_at FROM tasks WHERE id = ANY($1::bigint[]) "
             "AND status = 'running' AND lease_node = $2")
_SEND = "SELECT pg_notify($1, $2)"
# A claim and, when it took fewer than asked, the next run_at among the rows left (one
# statement, one round trip): every row carries it, and a claim that took none is one row
# of NULLs but for it. Its CTEs share one snapshot, where the claimed rows are still queued.
_CLAIM = (
    f"WITH claimed AS ({_CLAIM_SET} WHERE id IN (SELECT id {_DUE}) RETURNING {CLAIMED_COLUMNS}), "
    "next AS (SELECT CASE WHEN (SELECT count(*) FROM claimed) < $4 THEN least((SELECT min(run_at) "
    f"FROM tasks WHERE status = 'queued' AND queue = $1 {_NOT_BLOCKED} "
    f"AND id NOT IN (SELECT id FROM claimed)), {_HELD_UNTIL}) END AS next_at) "
    "SELECT claimed.*, next.next_at FROM next LEFT JOIN claimed ON true")
_CANDIDATES = f"SELECT id, name, concurrency_key, rate_key {_DUE}"
_CLAIM_PICKED = (f"{_CLAIM_SET.replace('$5', '$1').replace('$6', '$2').replace('$7', '$3')} "
                 f"WHERE id = ANY($4::bigint[]) AND status = 'queued' RETURNING {CLAIMED_COLUMNS}")
_NEXT_DUE = (f"SELECT least((SELECT min(run_at) FROM tasks WHERE status = 'queued' AND queue = $1 "
             f"{_NOT_BLOCKED}), {_HELD_UNTIL})")
_LOCK_NAMES = ("SELECT pg_advisory_xact_lock(hashtextextended('agentd.limit:' || name, $2)) "
               "FROM unnest($1::text[]) AS name")
_RUNNING_BY_GROUP = ("SELECT name || ':c:' || concurrency_key, count(*) FROM tasks "
                     "WHERE status = 'running' AND name = ANY($1::text[]) GROUP BY 1")
_BUCKETS = ("SELECT name, tokens, updated_at, held_until FROM task_rates "
            "WHERE split_part(name, ':', 1) = ANY($1::text[])")
_SET_BUCKETS = ("INSERT INTO task_rates (name, tokens, updated_at) SELECT b.name, b.tokens, $3 "
                "FROM unnest($1::text[], $2::float8[]) AS b(name, tokens) ON CONFLICT (name) "
                "DO UPDATE SET tokens = excluded.tokens, updated_at = excluded.updated_at")
_HOLD = ("INSERT INTO task_rates (name, tokens, updated_at, held_until) VALUES ($1, 0, $2, $2) "
         "ON CONFLICT (name) DO UPDATE SET held_until = GREATEST(task_rates.held_until, excluded.held_until)")
_REQUEUE_ATTEMPT = (
    "UPDATE tasks SET status = CASE WHEN cancel_requested <> 0 THEN 'cancelled' ELSE 'queued' END, "
    "run_at = $1, error = CASE WHEN cancel_requested <> 0 THEN 'cancelled' ELSE $2::text END, "
    "finished_at = CASE WHEN cancel_requested <> 0 THEN $3::float8 END, "
    "expires_at = CASE WHEN cancel_requested <> 0 THEN $4::float8 END, "
    "lease_until = NULL, lease_node = NULL, "
    "attempts = attempts - CASE WHEN cancel_requested <> 0 THEN 0 ELSE $5::bigint END "
    "WHERE id = $6 AND status = 'running' AND lease_node = $7 RETURNING status, queue, name")
_UNCLAIM = ("UPDATE tasks SET status = 'queued', attempts = attempts - 1, started_at = NULL, "
            "lease_until = NULL, lease_node = NULL WHERE status = 'running' "
            "AND id = ANY($1::bigint[]) AND lease_node = $2 RETURNING queue")
_RENEW = (f"UPDATE tasks SET lease_until = {_SERVER_NOW} + $1::float8, lease_node = $2 "
          "WHERE id = ANY($3::bigint[]) "
          "AND status = 'running' AND (lease_node = $2 OR lease_node IS NULL)")
_TAKEN_OVER = ("SELECT id FROM tasks WHERE id = ANY($1::bigint[]) AND status = 'running' "
               "AND lease_node <> $2")
_LAPSED = ("SELECT id, attempts, max_attempts, cancel_requested FROM tasks "
           f"WHERE status = 'running' AND lease_until < {_SERVER_NOW} AND NOT (id = ANY($1::bigint[])) "
           "FOR UPDATE SKIP LOCKED")
_RECLAIM = ("UPDATE tasks SET status = $1, error = $2, lease_until = NULL, lease_node = NULL, "
            "run_at = $3, finished_at = $4, expires_at = $5 WHERE id = $6 RETURNING *")
_NODE = ("INSERT INTO nodes (id, started_at, heartbeat_at, version) VALUES ($1, $2, $3, $4) "
         "ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at")
_FORGET_DEAD_NODES = "DELETE FROM nodes WHERE heartbeat_at < $1"
_FORGET_NODE = "DELETE FROM nodes WHERE id = $1"
_PEERS = "SELECT id FROM nodes WHERE id <> $1"
_LIVE_NODES = ("SELECT id, started_at, heartbeat_at, version FROM nodes WHERE heartbeat_at >= $1 "
               "ORDER BY started_at, id")


class _SharedFuture(asyncio.Future[R]):
    """A batch's future, which no single waiter can cancel (as the SQLite writer's)."""

    def cancel(self, msg: Any = None) -> bool:
        return False


class _Batched(Generic[V, R]):
    """Values added between two transactions, written by one op in the next one (as
    `BatchedWrite` on SQLite): the single enqueues, the acks."""

    def __init__(self, store: PgStore,
                 write_values: Callable[[PgConnection, list[V]], Awaitable[list[R]]],
                 lone_values: Callable[[PgConnection, list[V]], Awaitable[list[R]]] | None = None
                 ) -> None:
        self._store = store
        self._write_values = write_values
        self._lone_values = lone_values  # the same as one statement (see `PgStore.write`)
        self._values: list[V] = []
        self._future: asyncio.Future[list[R]] | None = None
        store.add_rider(self._ride)

    def add(self, value: V) -> asyncio.Future[list[R]]:
        if self._future is None:
            self._future = _SharedFuture(loop=asyncio.get_running_loop())
        self._store.request_flush()
        self._values.append(value)
        return self._future

    async def submit(self, value: V) -> R:
        position = len(self._values)
        return (await self.add(value))[position]

    def _ride(self) -> None:
        if self._future is None:
            return
        values, self._values = self._values, []
        future, self._future = self._future, None
        write_values, lone_values = self._write_values, self._lone_values

        async def op(conn: PgConnection) -> list[R]:
            return await write_values(conn, values)

        async def lone(conn: PgConnection) -> list[R]:
            assert lone_values is not None
            return await lone_values(conn, values)

        self._store.join_batch(op, future, lone=None if lone_values is None else lone)


class PgTasks:
    """`TaskStore` on a `PgStore`; see the module docstring."""

    # A transaction costs round trips, planning and a WAL flush, a millisecond or more:
    # claims of short tasks take up to 16 times the workers ahead (pg_bench, bench/README.md).
    default_claim_ahead = 16

    def __init__(self, store: PgStore) -> None:
        self.store = store
        self.node_id = node_id()
        self._started_at = time.time()
        self._version = ""
        self._single_inserts: _Batched[tuple[Any, ...], int] = _Batched(
            store, self._insert_singles, partial(self._insert_singles, lone=True))
        self.insert_one = self._single_inserts.submit
        # Claims are taken in rounds of their own, beside the batch in flight (see
        # `join_claims`): a claim waited for the acks and events before it to commit.
        self._claim_riders: list[Callable[[], None]] = []
        self._claim_round_due = False
        # The limited names as of the last claim: an ack of one wakes every daemon's claims.
        self._limited: frozenset[str] = frozenset()
        # The other daemons' nodes; None while unknown (not read yet, or news lost while the
        # listening connection was away): then they are assumed alive.
        self._peers: set[str] | None = None
        self._peers_watchers: list[Callable[[], None]] = []
        self._node_news_heard = 0
        self._peers_reread: asyncio.Task[None] | None = None
        # Assignment (see the module docstring). `[tasks] lease` as of the last claim round
        # (None before the first: the limited names are not known yet, nothing is assigned).
        self._lease: float | None = None
        # Per queue, the other daemons' free slots as they told them, less what was
        # assigned to them since; this daemon's own free slots, and what it last told.
        self._idle: dict[str, dict[str, int]] = {}
        self._own_free: dict[str, int] = {}
        self._told: dict[str, int] = {}
        self._take_assigned: Callable[[list[TaskRecord]], None] | None = None
        # Tasks this daemon assigned itself, started on one of the two news of their insert
        # (`_first_to_take`) and waiting for the other.
        self._taken_here: set[int] = set()
        # The assigned tasks being read (their notification had only ids), and the cancels
        # of running tasks heard meanwhile, by read.
        self._assigned_reads: dict[asyncio.Task[None], set[int]] = {}
        self.assigned_out = 0  # tasks this daemon assigned (itself included)
        self.assigned_in = 0  # tasks assigned to this daemon (by itself included)
        store.on_listener_open(_HOLD_NODE_LOCK, f"agentd.node:{self.node_id}", _NODE_LOCK_SEED)

    @property
    def engine(self) -> PgStore:
        return self.store

    def add_claim_rider(self, rider: Callable[[], None]) -> None:
        """Call `rider()` at each claim round (the workers' claims join it), not at each
        write batch: see `join_claims`."""
        self._claim_riders.append(rider)

    def request_claims(self) -> None:
        """Take a claim round soon: two loop turns later, so that the claims asked for
        meanwhile share it (as a write batch does)."""
        if not self._claim_round_due:
            self._claim_round_due = True
            loop = asyncio.get_running_loop()
            loop.call_soon(loop.call_soon, self._claim_round)

    def _claim_round(self) -> None:
        self._claim_round_due = False
        for rider in self._claim_riders:
            rider()

    @property
    def closed(self) -> bool:
        return self.store.closed

    def listen(self, *, work: Callable[[str | None], None], done: Callable[[Sequence[int]], None],
               cancel: Callable[[Sequence[int]], None], reconnect: Callable[[], None]) -> None:
        self.store.listen(WORK, lambda payload: work(payload or None))
        # A daemon's own final states and cancels were acted on where it made them (its
        # waiters woken after the task's final event, its running task cancelled once).
        self.store.listen(DONE, partial(self._heard, done))
        self.store.listen(CANCEL, partial(self._heard, cancel))
        self.store.listen(CANCEL, self._cancel_news)
        self.store.listen(NODES, self._node_news)
        self.store.listen(IDLE, self._idle_news)
        self.store.listen(ASSIGN, self._assign_news)
        self.store.on_reconnect(self._forget_peers)
        self.store.on_reconnect(self._relearn_idle)
        self.store.on_reconnect(reconnect)

    def peers_alive(self) -> bool:
        """Whether another daemon may share the database (see the module docstring)."""
        return self._peers is None or bool(self._peers)

    def on_peers_changed(self, callback: Callable[[], None]) -> None:
        """Call `callback` each time `peers_alive()` changes its answer."""
        self._peers_watchers.append(callback)

    def _set_peers_to(self, peers: set[str] | None) -> None:
        alive = self.peers_alive()
        self._peers = peers
        if self.peers_alive() != alive:
            for callback in self._peers_watchers:
                callback()

    def _node_news(self, payload: str) -> None:
        self._node_news_heard += 1
        change, _, node = payload.partition(" ")
        if node == self.node_id:
            return
        if change == "up":
            self._tell_all()  # it has not heard of this daemon's free slots
        else:
            for free in self._idle.values():
                free.pop(node, None)
        peers = self._peers
        if peers is None:
            return
        self._set_peers_to(peers | {node} if change == "up" else peers - {node})

    def _forget_peers(self) -> None:
        """News of nodes was lost while the listening connection was away (or it opened after
        the start's read): unknown, so taken as alive, until read again, at once."""
        self._set_peers_to(None)
        if self._peers_reread is None or self._peers_reread.done():
            self._peers_reread = asyncio.get_running_loop().create_task(
                self._reread_peers(), name="read-peers")

    async def _reread_peers(self) -> None:
        heard = self._node_news_heard
        try:
            rows = await self.store.read(_PEERS, (self.node_id,))
        except Exception as exc:  # the store is away again: the next heartbeat reads them
            _LOG.warning("tasks.peers_unread", error=describe(exc))
            return
        self._set_peers({row[0] for row in rows}, heard)

    async def _read_peers(self, conn: PgConnection) -> None:
        heard = self._node_news_heard
        self._set_peers({row[0] for row in await conn.fetch(_PEERS, self.node_id)}, heard)

    def _set_peers(self, found: set[str], heard: int) -> None:
        """Set the peers from the table as read when `heard` news had come; a daemon heard
        of during the read is kept (the read may not see its row), one heard gone is
        forgotten at the next read."""
        if self._node_news_heard != heard and self._peers is not None:
            found |= self._peers
        self._set_peers_to(found)

    def _heard(self, act: Callable[[Sequence[int]], None], payload: str) -> None:
        origin, _, ids = payload.partition(" ")
        if origin != self.node_id:
            act([int(part) for part in ids.split(",") if part])

    # -- assignment (see the module docstring) ------------------------------------------------

    def on_assigned(self, take: Callable[[list[TaskRecord]], None]) -> None:
        """Call `take(records)` when tasks are assigned to this daemon (by another, or by
        itself): they run under this node's lease already (a record's `cancel_requested`
        may be set)."""
        self._take_assigned = take

    def peers_free(self, queue: str) -> dict[str, int]:
        """The other daemons' free slots of `queue` as this one knows them (node → slots):
        the daemons it may assign that queue's tasks to."""
        return dict(self._idle.get(queue, {}))

    def slots_free(self, queue: str, free: int) -> None:
        """This daemon's free slots of `queue` now (its claim loop calls this each time it
        waits): the other daemons are told when the number differs from what they were
        told last, once this daemon hears notifications (before, nothing is assigned to it)."""
        self._own_free[queue] = free
        if free != self._told.get(queue, 0) and self.store.listening.is_set() and self.peers_alive():
            self._tell(queue, free)

    def claiming(self, queue: str) -> None:
        """Assign nothing to this daemon's own slots of `queue` until `slots_free` (the others
        are not told: what they assign meanwhile is ordered by nothing anyway, and a slot
        found full puts it back)."""
        self._own_free[queue] = 0

    def _tell(self, queue: str, free: int) -> None:
        if self.store.closed:
            return
        self._told[queue] = free
        self._send(IDLE, f"{self.node_id} {queue} {free}").add_done_callback(
            partial(self._told_or_not, queue))

    def _send(self, channel: str, payload: str) -> asyncio.Future[None]:
        """Notify `channel` now, in a statement of its own beside the writes in flight."""

        async def op(conn: PgConnection) -> None:
            await conn.execute(_SEND, channel, payload)

        return self.store.write_alone(op, one_statement=True)

    def _told_or_not(self, queue: str, sent: asyncio.Future[None]) -> None:
        """A notification of free slots that failed is logged, and sent again at the next
        change: meanwhile the others may assign to this daemon what it then puts back."""
        error = None if sent.cancelled() else sent.exception()
        if error is not None:
            self._told.pop(queue, None)
            _LOG.warning("tasks.idle_untold", error=describe(error))

    def _tell_all(self) -> None:
        """Tell every free slot again: to a daemon that has just come up, or after this one's
        listening connection was away (the others stopped assigning to it meanwhile)."""
        if self.store.listening.is_set():
            for queue, free in self._own_free.items():
                if free:
                    self._tell(queue, free)

    def _relearn_idle(self) -> None:
        """The listening connection (re-)opened: what others told meanwhile was not heard.
        Forget it, tell this daemon's free slots, and ask the others for theirs (an "up"
        makes each tell again)."""
        self._idle.clear()
        self._taken_here.clear()  # their notifications were lost with the connection
        self._tell_all()
        if not self.store.closed:
            self._send(NODES, f"up {self.node_id}").add_done_callback(_asked_or_not)

    def _idle_news(self, payload: str) -> None:
        node, queue, free = payload.split(" ")
        if node == self.node_id:
            return
        if int(free) > 0:
            self._idle.setdefault(queue, {})[node] = int(free)
        else:
            self._idle.get(queue, {}).pop(node, None)

    def _assign_news(self, payload: str) -> None:
        origin, node, queue, count, body = payload.split(" ", 4)
        if node != self.node_id:
            if origin.rstrip(_STARTS_TOO) != self.node_id:  # it counted its own as it made them
                self._spend_slots(queue, node, int(count))
            return
        # Its own insert, alone in its transaction, starts them too as it returns.
        mine = origin == f"{self.node_id}{_STARTS_TOO}"
        if body[0] == "[":
            records = [record for record in map(_assigned_record, json.loads(body))
                       if not mine or self._first_to_take(record.id)]
            if records:
                self._took(records)
            return
        task_ids = [task_id for task_id in map(int, body.split(","))
                    if not mine or self._first_to_take(task_id)]
        if task_ids:
            reading = asyncio.get_running_loop().create_task(self._read_assigned(task_ids),
                                                             name="read-assigned")
            self._assigned_reads[reading] = set()
            reading.add_done_callback(self._assigned_reads.pop)

    def _first_to_take(self, task_id: int) -> bool:
        """A task this daemon assigned itself is started by whichever comes first: its
        insert's result or its notification (either may); whether this is the first."""
        if task_id in self._taken_here:
            self._taken_here.discard(task_id)
            return False
        self._taken_here.add(task_id)
        return True

    def _took(self, records: list[TaskRecord]) -> None:
        self.assigned_in += len(records)
        if records:
            queue = records[0].queue
            self._told[queue] = max(0, self._told.get(queue, 0) - len(records))
        if self._take_assigned is not None:
            self._take_assigned(records)

    async def _read_assigned(self, task_ids: list[int]) -> None:
        """Read assigned tasks whose notification had only their ids, and take them, with the
        cancels heard meanwhile (the row read may predate one). If the read fails their
        leases lapse and other daemons take them over."""
        try:
            rows = await self.store.read(_ASSIGNED, (task_ids, self.node_id))
        except Exception as exc:
            _LOG.warning("tasks.assigned_unread", task_ids=task_ids, error=describe(exc))
            return
        reading = asyncio.current_task()
        assert reading is not None
        cancelled = self._assigned_reads.get(reading, set())
        records = [TaskRecord.claimed(values[:-1], values[-1]) for values in rows]
        for record in records:
            record.cancel_requested = record.cancel_requested or record.id in cancelled
        self._took(records)

    def _cancel_news(self, payload: str) -> None:
        """A running task's cancel (from any daemon, this one too): noted for the reads of
        assigned tasks in flight."""
        if self._assigned_reads:
            ids = {int(part) for part in payload.partition(" ")[2].split(",") if part}
            for heard in self._assigned_reads.values():
                heard.update(ids)

    def _spend_slots(self, queue: str, node: str, count: int) -> None:
        free = self._idle.get(queue)
        if free is not None and node in free:
            left = free[node] - count
            if left > 0:
                free[node] = left
            else:
                del free[node]

    def _assign(self, prepared: list[tuple[Any, ...]]) -> list[str | None] | None:
        """The node each row is assigned to (None: queued), or None if no row is. Only a due
        task of an unlimited name: to this daemon while it has a free slot of the queue,
        else to the daemon that told of the most free slots."""
        if self._lease is None:
            return None
        now = time.time()
        targets: list[str | None] = []
        assigned = 0
        for values in prepared:
            queue, name, run_at = values[0], values[1], values[5]
            own, free = self._own_free.get(queue), self._idle.get(queue)
            if not (own or free) or assigned == _ASSIGN_MAX or run_at > now or name in self._limited:
                targets.append(None)
                continue
            if own:
                node = self.node_id
                self._own_free[queue] = own - 1
            else:
                assert free is not None
                node = max(free, key=free.__getitem__)
                self._spend_slots(queue, node, 1)
            targets.append(node)
            assigned += 1
        return targets if assigned else None

    async def _insert_singles(self, conn: PgConnection, prepared: list[tuple[Any, ...]], *,
                              lone: bool = False) -> list[int]:
        """The single enqueues of a tick (`insert_one`), some maybe assigned (`_assign`); as
        one statement if `lone`."""
        targets = self._assign(prepared)
        if targets is None:
            return await (_insert_many_notifying if lone else _insert_many)(conn, prepared)
        started_at = time.time()
        origin = f"{self.node_id}{_STARTS_TOO}" if lone else self.node_id
        if len(prepared) == 1:
            rows = await conn.fetch(_INSERT_ASSIGNED_ONE, *prepared[0], targets[0], started_at,
                                    self._lease, origin)
        else:
            columns = [list(column) for column in zip(*prepared, strict=True)]
            rows = sorted(await conn.fetch(_INSERT_ASSIGNING, *columns, targets, started_at,
                                           self._lease, origin), key=_first)
        mine: list[TaskRecord] = []
        for target, values, row in zip(targets, prepared, rows, strict=True):
            if row[1] == self.node_id and lone:
                mine.append(_inserted_record(row[0], values, started_at))
            if row[1] is not None:
                self.assigned_out += 1
            elif target is not None and target != self.node_id:
                for free in self._idle.values():  # it does not hear notifications now
                    free.pop(target, None)
        mine = [record for record in mine if self._first_to_take(record.id)]
        if mine:  # committed: the statement was its own transaction
            self._took(mine)
        return [row[0] for row in rows]

    # -- the queue's --------------------------------------------------------------------------

    def insert(self, prepared: list[tuple[Any, ...]], windows: list[float], now: float,
               ttl: float, alongside: Callable[[Any], object] | None) -> Awaitable[list[Any]]:
        async def op(conn: PgConnection) -> list[Any]:
            return await _insert_tasks(conn, prepared, windows, now, ttl)

        async def last(conn: PgConnection) -> None:
            assert alongside is not None
            written = alongside(conn)
            if inspect.isawaitable(written):
                await written

        # `alongside` (an event's row: it takes the event counter) runs at the end of the
        # transaction, after every write's op: see agentd/postgres/events.py.
        return self.store.write(op, last=None if alongside is None else last)

    async def get(self, task_id: int) -> TaskRecord | None:
        row = await self.store.read_one(_TASK, (task_id,))
        return None if row is None else TaskRecord.from_row(row)

    async def add_usage(self, task_id: int, usage: Mapping[str, int]) -> dict[str, int]:
        node = self.node_id

        async def op(conn: PgConnection) -> dict[str, int]:
            row = await conn.fetchrow(_USAGE, task_id, node)
            if row is None:
                raise TaskNotFoundError(f"no task with id {task_id}")
            totals: dict[str, int] = {} if row[0] is None else json.loads(row[0])
            if row[1]:  # its lease lapsed and passed to another daemon: not counted
                _LOG.warning("task.lease_lost", task_id=task_id, write="usage")
                return totals
            for key, count in usage.items():
                totals[key] = totals.get(key, 0) + int(count)
            await conn.execute(_SET_USAGE, json.dumps(totals), task_id)
            return totals

        return await self.store.write(op)

    async def children(self, task_id: int) -> list[int]:
        return [row[0] for row in await self.store.read(_CHILDREN, (task_id,))]

    async def descendants(self, task_id: int) -> list[int]:
        rows = await self.store.read(_DESCENDANTS, (task_id,))
        return [row[0] for row in rows if row[0] != task_id]

    async def list_tasks(self, status: TaskStatus | None, name: str | None, queue: str | None,
                   before_id: int | None, limit: int) -> list[TaskRecord]:
        clauses: list[str] = []
        params: list[Any] = []
        if status in UNSUCCESSFUL:
            clauses.append("error IS NOT NULL")  # the tasks_unsuccessful index's condition
        for column, value in (("status", status), ("name", name), ("queue", queue),
                              ("id <", before_id)):
            if value is not None:
                params.append(value)
                clauses.append(f"{column} {'' if '<' in column else '='} ${len(params)}")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        params.append(limit)
        rows = await self.store.read(
            f"SELECT * FROM tasks {where} ORDER BY id DESC LIMIT ${len(params)}", tuple(params))
        return [TaskRecord.from_row(row) for row in rows]

    async def counts(self) -> dict[TaskStatus, int]:
        return {row[0]: row[1] for row in await self.store.read(_COUNTS) if row[1]}

    async def by_queue(self, now: float) -> list[QueueFigures]:
        return [QueueFigures(*row) for row in await self.store.read(_BY_QUEUE, (now,))]

    async def cancel(self, task_id: int, now: float, ttl: float) -> tuple[list[TaskRecord], list[int]]:
        async def op(conn: PgConnection) -> tuple[list[Any], list[int]]:
            if await conn.fetchval(_EXISTS, task_id) is None:
                raise TaskNotFoundError(f"no task with id {task_id}")
            tree = [row[0] for row in await conn.fetch(_DESCENDANTS, task_id)]
            ended = await conn.fetch(_CANCEL_QUEUED, now, now + ttl, tree)
            if ended:
                await conn.execute(_CLOSE_CANCELLED_WAITS, [row["id"] for row in ended])
            running = [row[0] for row in await conn.fetch(_CANCEL_RUNNING, tree)]
            _notify_ids(DONE, [row["id"] for row in ended], self.node_id)
            _notify_ids(CANCEL, running, self.node_id)
            return ended, running

        ended, running = await self.store.write(op)
        return [TaskRecord.from_row(row) for row in ended], running

    async def requeue(self, task_id: int, now: float) -> TaskRecord:
        async def op(conn: PgConnection) -> Any:
            row = await conn.fetchrow(_REQUEUE, now, task_id)
            if row is None:
                await _raise_state(conn, task_id, "requeue", "dead, failed or cancelled")
            await conn.execute(_FREE_UNSUCCESSFUL_CHILDREN_KEYS, task_id)
            _notify(WORK, [row["queue"]])
            return row

        return TaskRecord.from_row(await self.store.write(op))

    async def delete(self, task_id: int) -> None:
        async def op(conn: PgConnection) -> None:
            if await conn.fetchval(_DELETE, task_id) is None:
                await _raise_state(conn, task_id, "delete", "finished")

        await self.store.write(op)

    async def purge_expired(self, now: float, idle_before: float) -> int:
        async def op(conn: PgConnection) -> int:
            await conn.execute(_PURGE_BUCKETS, now, idle_before)
            status: str = await conn.execute(_PURGE_EXPIRED, now)
            return int(status.rpartition(" ")[2])

        return await self.store.write(op)

    async def cancels_among(self, task_ids: list[int]) -> list[int]:
        return [row[0] for row in await self.store.read(_CANCELS_AMONG, (task_ids,))]

    # -- the workers' -------------------------------------------------------------------------

    def acks(self) -> AckWriter:
        """An ack applies only while this node holds the task's lease: once it lapsed and
        another daemon took the task over, the late ack is dropped (its id returned)."""
        limited, node = self._limited_names, self.node_id

        async def write_acks(conn: PgConnection, acks: list[tuple[Any, ...]]) -> list[int]:
            columns = list(zip(*acks, strict=True))
            errors = [None if error is None else storable_error(error) for error in columns[2]]
            rows = await conn.fetch(_ACK, columns[0], columns[1], errors, columns[3], columns[4],
                                    columns[5], node)
            _notify_ids(DONE, [row[0] for row in rows], self.node_id)
            if not limited().isdisjoint(row[1] for row in rows):
                _notify(WORK, [""])  # a limited name's place is free
            if len(rows) == len(acks):
                return []
            written = {row[0] for row in rows}
            return [task_id for task_id in columns[5] if task_id not in written]

        return _Batched(self.store, write_acks)

    def _limited_names(self) -> frozenset[str]:
        return self._limited

    def join_claims(self, claims: dict[str, ClaimFuture], size: Callable[[str], int],
                    running: Callable[[], dict[str, int]],
                    limits: Callable[[], NameLimits], lease: float) -> None:
        named = limits()
        self._limited = frozenset(named)
        self._lease = lease
        node = self.node_id
        for queue, future in claims.items():
            wanted = size(queue)

            async def op(conn: PgConnection, queue: str = queue,
                         wanted: int = wanted) -> tuple[list[TaskRecord], float | None]:
                return await _claim(conn, queue=queue, wanted=wanted, limits=named, lease=lease,
                                    node=node)

            # Run at once, beside the acks and events in flight rather than after them:
            # nothing of this daemon's must precede it (it takes committed rows), and
            # whatever acts on its rows waits for it. Without limited names it is one
            # statement; limited names are counted and charged in a transaction of several.
            self.store.write_alone(op, future, one_statement=not named)

    def requeue_attempt(self, *, task_id: int, run_at: float, error: str | None,
                        undo_attempt: int, finished_at: float, expires_at: float,
                        hold: str | None = None) -> Awaitable[Literal["queued", "cancelled", "lost"]]:
        if error is not None:
            error = storable_error(error)
        node = self.node_id

        async def op(conn: PgConnection) -> Literal["queued", "cancelled", "lost"]:
            row = await conn.fetchrow(_REQUEUE_ATTEMPT, run_at, error, finished_at, expires_at,
                                      undo_attempt, task_id, node)
            if row is None:  # the lease lapsed and another daemon took the task over
                return "lost"
            if hold is not None:
                await conn.execute(_HOLD, hold, run_at)
            status: Literal["queued", "cancelled"] = row["status"]
            if status == "cancelled":
                _notify_ids(DONE, [task_id], self.node_id)
            _notify(WORK, ["" if row["name"] in self._limited else row["queue"]])
            return status

        return self.store.write(op)

    def unclaim(self, task_ids: list[int]) -> Awaitable[None]:
        """Only the rows whose lease this node still holds: one taken over by another daemon
        meanwhile is that daemon's to run."""
        node = self.node_id

        async def op(conn: PgConnection) -> None:
            rows = await conn.fetch(_UNCLAIM, task_ids, node)
            _notify(WORK, {row[0] for row in rows})

        return self.store.write(op)

    async def renew_and_reclaim(self, running: list[int], lease_until: float, ttl: float,
                                expired_only: bool) -> list[TaskRecord]:
        """Other daemons run the rows this one does not hold: only those whose lease lapsed
        are orphans, at start too (`expired_only` is ignored)."""
        node, started_at, version = self.node_id, self._started_at, self._version

        async def op(conn: PgConnection) -> list[Any]:
            now = time.time()
            await conn.execute(_NODE, node, started_at, now, version)
            await conn.execute(_FORGET_DEAD_NODES, now - _FORGET_NODE_AFTER)
            await self._read_peers(conn)
            if running:
                await conn.execute(_RENEW, lease_until - now, node, running)
            changed = []
            for row in await conn.fetch(_LAPSED, running):
                if row["cancel_requested"]:
                    status, error = "cancelled", "cancelled"
                elif row["attempts"] >= row["max_attempts"]:
                    status = "dead"
                    error = (f"the process died during attempt {row['attempts']} of "
                             f"{row['max_attempts']}")
                else:
                    status, error = "queued", f"the process died during attempt {row['attempts']}"
                final = status != "queued"
                changed.append(await conn.fetchrow(
                    _RECLAIM, status, error, now, now if final else None,
                    now + ttl if final else None, row["id"]))
            if changed:
                ended = [row["id"] for row in changed if row["status"] != "queued"]
                _notify_ids(DONE, ended, self.node_id)
                _notify(WORK, [""])  # requeued, or a limited name's place freed
            return changed

        return [TaskRecord.from_row(row) for row in await self.store.write(op)]

    async def taken_over(self, task_ids: list[int]) -> list[int]:
        if not task_ids:
            return []
        return [row[0] for row in await self.store.read(_TAKEN_OVER, (task_ids, self.node_id))]

    async def start_node(self, version: str) -> None:
        self._started_at, self._version = time.time(), version
        node, started_at = self.node_id, self._started_at

        async def op(conn: PgConnection) -> None:
            await conn.execute(_NODE, node, started_at, started_at, version)
            notify(NODES, f"up {node}")
            await self._read_peers(conn)

        await self.store.write(op)

    async def stop_node(self) -> None:
        node = self.node_id
        if self._peers_reread is not None:
            self._peers_reread.cancel()

        async def op(conn: PgConnection) -> None:
            await conn.execute(_FORGET_NODE, node)
            notify(NODES, f"down {node}")

        await self.store.write(op)

    async def live_nodes(self, within: float) -> list[dict[str, Any]]:
        rows = await self.store.read(_LIVE_NODES, (time.time() - within,))
        return [{"id": row["id"], "started_at": row["started_at"], "heartbeat_at": row["heartbeat_at"],
                 "version": row["version"], "this": row["id"] == self.node_id} for row in rows]


# -- ops ---------------------------------------------------------------------------------------


async def _insert_many(conn: PgConnection, prepared: list[tuple[Any, ...]]) -> list[int]:
    """Rows without idempotency keys, in one statement; their ids in order (an identity
    hands out increasing ids in the order the rows are inserted)."""
    rows = await conn.fetch(_INSERT_MANY, *(list(column) for column in zip(*prepared, strict=True)))
    _notify(WORK, {values[0] for values in prepared})
    return sorted(row[0] for row in rows)


async def _insert_many_notifying(conn: PgConnection, prepared: list[tuple[Any, ...]]) -> list[int]:
    """`_insert_many` as one statement."""
    rows = await conn.fetch(_INSERT_MANY_NOTIFYING,
                            *(list(column) for column in zip(*prepared, strict=True)))
    return sorted(row[0] for row in rows)


async def _insert_tasks(conn: PgConnection, prepared: list[tuple[Any, ...]], windows: list[float],
                        now: float, ttl: float) -> list[Any]:
    """As `taskqueue._insert_tasks`: per row, its new id, or the row as stored when it is not
    a new queued task (a key's existing task, or a child of a parent being cancelled, stored
    cancelled). A key is taken through its UNIQUE index (`ON CONFLICT DO NOTHING`), so two
    daemons enqueueing one key at once make one task: the second waits for the first's
    commit and then finds its row."""
    if len(prepared) > 1 and all(values[8] is None and values[9] is None for values in prepared):
        return await _insert_many(conn, prepared)
    out: list[Any] = []
    queues: set[str] = set()
    for values, window in zip(prepared, windows, strict=True):
        key, parent_id = values[8], values[9]
        cancelled = (parent_id is not None
                     and await conn.fetchval(_BEING_CANCELLED, parent_id) is not None)
        while True:
            if cancelled:
                stored = await conn.fetchrow(_INSERT_CANCELLED, *values[:3], *values[4:], now, now + ttl)
                if stored is not None:  # no daemon waits on an id not yet handed out
                    out.append(stored)
                    break
            else:
                task_id = await conn.fetchval(_INSERT_KEYED, *values)
                if task_id is not None:
                    queues.add(values[0])
                    out.append(task_id)
                    break
            existing = await conn.fetchrow(_BY_KEY, key)
            if existing is None:
                continue  # deleted since the conflict: insert again
            if existing["created_at"] >= now - window:
                out.append(existing)
                break
            # Past its window the key is free again; the old task keeps its history.
            await conn.execute(_FREE_KEY, existing["id"])
    _notify(WORK, queues)
    return out


async def _claim(conn: PgConnection, *, queue: str, wanted: int, limits: NameLimits, lease: float,
                 node: str) -> tuple[list[TaskRecord], float | None]:
    """As `taskqueue.claim`, across daemons: rows being claimed elsewhere are skipped, and
    limited names are counted in the database under a lock per name (see the module
    docstring). Idempotent: a batch's failure runs it again from the database's state."""
    now = time.time()
    if not limits:
        rows = await conn.fetch(_CLAIM, queue, now, [], wanted, now, lease, node)
        records = [TaskRecord.claimed(values[:-1], now) for values in rows if values[0] is not None]
        records.sort(key=_claim_order)
        return records, rows[0][-1]
    blocked, budgets, tokens, frees_at = await _limit_budgets(conn, limits, now)
    candidates = await conn.fetch(_CANDIDATES, queue, now, list(blocked),
                                  wanted + (len(budgets) + 1) * wanted)
    spent: dict[str, int] = {}
    rate_spent: dict[str, int] = {}
    picked = pick_within_budgets(candidates, wanted, limits, budgets, spent=spent,
                                 rate_spent=rate_spent)
    refill_at = spend_tokens(limits, tokens, rate_spent, now)
    if refill_at is not None:
        frees_at = refill_at if frees_at is None else min(frees_at, refill_at)
    rows = await conn.fetch(_CLAIM_PICKED, now, lease, node, picked) if picked else []
    if rate_spent:
        await conn.execute(_SET_BUCKETS, list(rate_spent), [tokens[group] for group in rate_spent], now)
    records = [TaskRecord.claimed(values, now) for values in rows]
    records.sort(key=_claim_order)
    if len(records) == wanted:
        return records, None
    exhausted = blocked | {group for group, left in budgets.items() if left <= 0}
    next_at: float | None = await conn.fetchval(_NEXT_DUE, queue, now, list(exhausted))
    if frees_at is not None:
        next_at = frees_at if next_at is None else min(frees_at, next_at)
    return records, next_at


async def _limit_budgets(conn: PgConnection, limits: NameLimits,
                         now: float) -> tuple[set[str], dict[str, int], dict[str, float], float | None]:
    """Lock the limited names (in one order, so claims never deadlock on them); then, as
    `limit_budgets`, from the running rows of their concurrency groups and their buckets."""
    names = sorted(limits)
    await conn.execute(_LOCK_NAMES, names, _LIMIT_LOCK_SEED)
    running = {row[0]: row[1] for row in await conn.fetch(_RUNNING_BY_GROUP, names)}
    rated = [name for name in names if limits[name][1] is not None]
    buckets = await conn.fetch(_BUCKETS, rated) if rated else []
    return limit_budgets(limits, running, buckets, now)


def _claim_order(record: TaskRecord) -> tuple[int, float, int]:
    return -record.priority, record.run_at, record.id


async def _raise_state(conn: PgConnection, task_id: int, action: str, allowed: str) -> NoReturn:
    status = await conn.fetchval(_STATUS, task_id)
    if status is None:
        raise TaskNotFoundError(f"no task with id {task_id}")
    raise TaskStateError(f"cannot {action} task {task_id}: it is {status}, not {allowed}")


def _first(row: Sequence[Any]) -> Any:
    return row[0]


def _inserted_record(task_id: int, values: tuple[Any, ...], started_at: float) -> TaskRecord:
    """The record of a row inserted assigned, from its prepared `values` (`INSERT_COLUMNS`)."""
    (queue, name, args, _, priority, run_at, max_attempts, timeout, _, _, correlation_id,
     created_at, _, _) = values
    return _assigned_record([task_id, queue, name, args, priority, run_at, max_attempts, timeout,
                             correlation_id, created_at, started_at])


def _assigned_record(values: Sequence[Any]) -> TaskRecord:
    """The record of a task inserted assigned, from its `_ASSIGNED_FIELDS` (as a notification
    carries them): the rest is what an inserted row holds (one attempt, no key, no parent,
    no cancel)."""
    (task_id, queue, name, args, priority, run_at, max_attempts, timeout, correlation_id,
     created_at, started_at) = values
    return TaskRecord.claimed((task_id, queue, name, args, priority, run_at, 1, max_attempts,
                               timeout, None, None, correlation_id, 0, None, created_at, None),
                              started_at)


def _asked_or_not(sent: asyncio.Future[None]) -> None:
    """A request for the others' free slots that failed is only logged: until they tell
    again, this daemon assigns them nothing."""
    error = None if sent.cancelled() else sent.exception()
    if error is not None:
        _LOG.warning("tasks.idle_unasked", error=describe(error))


def _notify(channel: str, payloads: Iterable[str]) -> None:
    """Notify `channel` once per payload at commit (a repeated one is sent once)."""
    notify(channel, *payloads)


def _notify_ids(channel: str, ids: list[int], origin: str) -> None:
    """Notify task ids, comma-separated after the node that sends them (`origin ids`), as
    few notifications as fit."""
    payloads: list[str] = []
    current: list[str] = []
    size = 0
    for task_id in ids:
        text = str(task_id)
        if size + len(text) + 1 > _PAYLOAD_MAX:
            payloads.append(",".join(current))
            current, size = [], 0
        current.append(text)
        size += len(text) + 1
    if current:
        payloads.append(",".join(current))
    _notify(channel, [f"{origin} {ids}" for ids in payloads])
