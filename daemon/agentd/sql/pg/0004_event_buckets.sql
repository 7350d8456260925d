-- Events of a persistence rule with limits of its own ([events] persistence
-- "news.new=ring ring_size=500") carry the rule's bucket, 2 or more, in `durable` (0 and 1
-- stay the default ring and durable classes). The sweep counts and ages each bucket apart.
CREATE INDEX events_kept ON events (durable, id) WHERE durable >= 2;
