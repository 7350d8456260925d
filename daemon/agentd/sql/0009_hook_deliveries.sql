-- The delivery ids each inbound hook has taken, so a repeated request (a replay) is
-- refused, across restarts too. A row is kept until a repeat could no longer pass anyway:
-- its signed timestamp leaves the hook's tolerance, or the replay window of the schemes
-- without a timestamp ends. Accepting a hook request deletes the rows past that time.
CREATE TABLE hook_deliveries (
    hook         TEXT NOT NULL,
    delivery_id  TEXT NOT NULL,
    refuse_until REAL NOT NULL,
    PRIMARY KEY (hook, delivery_id)
) WITHOUT ROWID;
CREATE INDEX hook_deliveries_expiry ON hook_deliveries (refuse_until);
