-- KEYS: the primary key (vmtask:redis-primary).
-- Notes which primary this is (its replication id: a promoted replica gets a new
-- one) and since when (Redis TIME); returns the seconds since it was first seen.
-- The workers' heartbeat calls it, so a failover is noticed even before any task
-- is judged; `task_finish.lua` keeps the same record when it judges a crash.

local replid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)')
local now = tonumber(redis.call('TIME')[1])
local seen = redis.call('HMGET', KEYS[1], 'replid', 'since')
if seen[1] ~= replid then
  redis.call('HSET', KEYS[1], 'replid', replid, 'since', now)
  return 0
end
return now - tonumber(seen[2])
