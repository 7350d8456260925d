-- The queue shared by several daemons (agentd/postgres/tasks.py).

-- Each daemon is a node: registered at start, its heartbeat renewed with its leases, its row
-- removed at a clean stop or, dead, long after its heartbeat stopped.
CREATE TABLE nodes (
    id           text PRIMARY KEY,              -- host:pid:random
    started_at   double precision NOT NULL,
    heartbeat_at double precision NOT NULL,
    version      text NOT NULL
);
CREATE INDEX nodes_heartbeat ON nodes (heartbeat_at);

-- The node whose lease a running task is under.
ALTER TABLE tasks ADD COLUMN lease_node text;
-- SQLite's INTEGER holds what `max_attempts` accepts (up to 2**63 - 1): so do these.
ALTER TABLE tasks ALTER COLUMN attempts TYPE bigint, ALTER COLUMN max_attempts TYPE bigint;

-- Rate limits (`@plugin.task(rate=...)`) shared by every daemon: a token bucket per task
-- name, refilled and spent by the claims, which lock the name first.
CREATE TABLE task_rates (
    name       text PRIMARY KEY,
    tokens     double precision NOT NULL,
    updated_at double precision NOT NULL
);
