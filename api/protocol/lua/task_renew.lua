-- KEYS: record, lease. ARGV: worker identity, lease ms.
-- Renews the lease of a task this worker runs.  A lease that lapsed while the Redis
-- primary was switching (nobody could renew it) is taken again if the record still
-- says this worker runs the task; 0 once the task was judged crashed (or finished).

local holder = redis.call('GET', KEYS[2])
if holder ~= ARGV[1] then
  if holder then return 0 end
  local record = redis.call('HMGET', KEYS[1], 'state', 'worker')
  if record[1] ~= 'STARTED' or record[2] ~= ARGV[1] then return 0 end
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
