-- KEYS: the primary key (vmtask:redis-primary).
-- Notes which primary this is (its replication id: a promoted replica gets a new
-- one) and since when (Redis TIME; 0 for the first primary ever seen, which is no
-- switch); returns the seconds since this primary took over, that time, and the id.
-- The workers' heartbeat calls it, so a failover is noticed even before any task
-- is judged; `task_finish.lua` keeps the same record when it judges a crash.

local replid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)')
local now = tonumber(redis.call('TIME')[1])
local seen = redis.call('HMGET', KEYS[1], 'replid', 'since')
if seen[1] ~= replid then
  -- A change of primary starts the grace; the first sighting ever is no change.
  local since = now
  if not seen[1] then since = 0 end
  redis.call('HSET', KEYS[1], 'replid', replid, 'since', since)
  return {now - since, since, replid}
end
return {now - tonumber(seen[2]), tonumber(seen[2]), replid}
