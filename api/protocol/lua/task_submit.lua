-- KEYS: the task record, the recent-task index.
-- ARGV: now, record TTL seconds, task id, then the record's field/value pairs.
-- Sent in one pipeline after an EXISTS of the host's heartbeat, which the producer
-- may only read.  (Trimming the index is the workers' periodic job.)

redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[3])
return 1
