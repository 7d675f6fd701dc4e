-- KEYS: the host's heartbeat, the host's live workers (sorted set by expiry).
-- ARGV: this worker's identity, now (seconds).
-- A worker that stops withdraws only its own presence: the host's heartbeat goes
-- only when no other live worker of the host remains.

redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])
if redis.call('ZCARD', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
