-- KEYS: record, channel. ARGV: finished time, retention seconds, the Cancelled result, E_ABORT.

local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'MISSING' end
if state ~= 'PENDING' and state ~= 'STARTED' then return 'COMPLETE' end
if redis.call('HGET', KEYS[1], 'cancelable') ~= '1' then return 'NOT_CANCELABLE' end
redis.call('HSET', KEYS[1], 'cancel_requested', '1')
if state == 'PENDING' then
  redis.call('HSET', KEYS[1], 'state', 'REVOKED', 'result', ARGV[3],
             'error', ARGV[4], 'error_description', 'Cancelled before it started',
             'finished', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('PUBLISH', KEYS[2], 'done')
  return 'REVOKED'
end
redis.call('PUBLISH', KEYS[2], 'cancel')
return 'REQUESTED'
