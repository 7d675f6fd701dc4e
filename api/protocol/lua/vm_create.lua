-- KEYS: vm record, names set, the owning host's VM set. ARGV: name, then the
-- record's field/value pairs.

if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SADD', KEYS[2], ARGV[1])
if KEYS[3] then redis.call('SADD', KEYS[3], ARGV[1]) end
return 1
