-- KEYS: record, channel. ARGV: percent. Only ever raises the percentage.

if redis.call('HGET', KEYS[1], 'state') ~= 'STARTED' then return 0 end
local current = tonumber(redis.call('HGET', KEYS[1], 'percent') or '0')
local new = tonumber(ARGV[1])
if new <= current then return 0 end
redis.call('HSET', KEYS[1], 'percent', ARGV[1])
redis.call('PUBLISH', KEYS[2], 'progress')
return 1
