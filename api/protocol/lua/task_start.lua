-- uses: task_log
-- KEYS: record, lease, running set.
-- ARGV: now, worker name (host:machine:pid), lease ms, task id, and the worker's
--       Celery node name (Flower's name for it: a crash judged later is told to
--       Flower as that node's).
-- Returns 'BEGUN' only to the one delivery that moved the record out of PENDING;
-- every other delivery (a duplicate, a late copy) gets the state it found.

local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'PENDING' then return state or 'MISSING' end
-- The lease first: a script cut short (a command the user's ACL refuses) must
-- never leave a STARTED record without a lease, which any reader would judge
-- crashed before the worker can record what happened (workers.runtime.execute).
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('HSET', KEYS[1], 'state', 'STARTED', 'started', ARGV[1], 'worker', ARGV[2],
           'node', ARGV[5] or '')
redis.call('HINCRBY', KEYS[1], 'runs', 1)
redis.call('SADD', KEYS[3], ARGV[4])
task_log(KEYS[1], {t = ARGV[1], kind = 'start', worker = ARGV[2]})
return 'BEGUN'
