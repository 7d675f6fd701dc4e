-- KEYS: record. ARGV: the time the message was pushed.
-- The submit's last write, for WAIT to wait for: marks the record enqueued, if this
-- primary has it.  Returns the record's state, or 'MISSING' when a failover lost the
-- record (its message then meets no record at the start gate and never runs).

local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'MISSING' end
redis.call('HSET', KEYS[1], 'enqueued', ARGV[1])
return state
