-- uses: task_log
-- KEYS: record, lease, running set, the host's running set, the lease deadlines,
--       the host's PENDING index.
-- ARGV: now, worker name (host:machine:pid), lease ms, task id, and the worker's
--       Celery node name (Flower's name for it: a crash judged later is told to
--       Flower as that node's).
-- Returns 'BEGUN' only to the one delivery that moved the record out of PENDING;
-- every other delivery (a duplicate, a late copy) gets the state it found.
-- The host's running set and the deadline (Redis TIME + lease) are kept here, with
-- the lease, so a host counts its own tasks and a reaper reads only due leases.

local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'PENDING' then return state or 'MISSING' end
if KEYS[6] then redis.call('ZREM', KEYS[6], ARGV[4]) end
-- The lease first: a script cut short (a command the user's ACL refuses) must
-- never leave a STARTED record without a lease, which any reader would judge
-- crashed before the worker can record what happened (workers.runtime.execute).
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('HSET', KEYS[1], 'state', 'STARTED', 'started', ARGV[1], 'worker', ARGV[2],
           'node', ARGV[5] or '')
redis.call('HINCRBY', KEYS[1], 'runs', 1)
redis.call('SADD', KEYS[3], ARGV[4])
if KEYS[4] then redis.call('SADD', KEYS[4], ARGV[4]) end
if KEYS[5] then
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  redis.call('ZADD', KEYS[5], now_ms + tonumber(ARGV[3]), ARGV[4])
end
task_log(KEYS[1], {t = ARGV[1], kind = 'start', worker = ARGV[2]})
return 'BEGUN'
