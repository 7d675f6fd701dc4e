-- KEYS: the host's heartbeat, the task record, the recent-task index.
-- ARGV: now, record TTL seconds, task id, then the record's field/value pairs.
-- One round trip: refuse a host with no live worker, else write the record.
-- (Trimming the index is the workers' periodic job, not the producer's.)

if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[3])
return 1
