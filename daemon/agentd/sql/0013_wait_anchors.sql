-- Open event waits are matched against an event in the table, not in memory (agentd/waits.py):
-- 100,000 waiting tasks held 110 MB of Python objects (1.1 kB a wait) and slowed every
-- full garbage collection. An event is looked up by its topic patterns and the anchors of
-- its data fields: a wait's anchor is its match's first scalar field, name and value as
-- JSON (`["order", 3]`), or '' (checked against every event of its pattern).
ALTER TABLE task_waits ADD COLUMN anchor TEXT;
-- The open event waits written before this have no anchor computed: checked against every
-- event of their pattern, as the ones without a scalar field to match.
UPDATE task_waits SET anchor = '' WHERE kind = 'event' AND resolved_at IS NULL;
CREATE INDEX task_waits_events ON task_waits (topic, anchor) WHERE resolved_at IS NULL AND kind = 'event';
