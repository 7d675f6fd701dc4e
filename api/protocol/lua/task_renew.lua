-- KEYS: record, lease, the lease deadlines. ARGV: worker identity, lease ms, task id.
-- Renews the lease of a task this worker runs.  A lease that lapsed while the Redis
-- primary was switching (nobody could renew it) is taken again if the record still
-- says this worker runs the task; 0 once the task was judged crashed (or finished).
-- The task's deadline (Redis TIME + lease) moves with its lease.

local holder = redis.call('GET', KEYS[2])
if holder ~= ARGV[1] then
  if holder then return 0 end
  local record = redis.call('HMGET', KEYS[1], 'state', 'worker')
  if record[1] ~= 'STARTED' or record[2] ~= ARGV[1] then return 0 end
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
if KEYS[3] then
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  redis.call('ZADD', KEYS[3], now_ms + tonumber(ARGV[2]), ARGV[3])
end
return 1
