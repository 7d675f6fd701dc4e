-- KEYS: the lease deadlines (sorted set, ms of Redis TIME).
-- ARGV: how many ids at most.
-- The ids of running tasks whose lease deadline has passed, oldest first: the only
-- tasks a reaper needs to judge.  O(log N + due), whatever the fleet runs.

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[1]))
