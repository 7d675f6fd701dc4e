-- uses: task_metrics
-- uses: task_log
-- KEYS: record, channel.
-- ARGV: finished time, retention seconds, the Cancelled result, E_ABORT, description,
--       the task id, the key prefix of the hosts' PENDING indexes (the record names
--       the host, so it is not a declared key).
-- A submit whose record and message no replica acknowledged takes its task back,
-- if no worker has started it: the start gate then drops the message, wherever it is.

local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'PENDING' then return state or 'MISSING' end
task_metrics(KEYS[1], ARGV[3], ARGV[1])
redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'state', 'REVOKED', 'result', ARGV[3],
           'error', ARGV[4], 'error_description', ARGV[5], 'finished', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
local host = redis.call('HGET', KEYS[1], 'host')
if ARGV[7] and host then redis.call('ZREM', ARGV[7] .. host, ARGV[6]) end
task_log(KEYS[1], {t = ARGV[1], kind = 'end', state = 'REVOKED', result = ARGV[3],
                   error = ARGV[4], text = ARGV[5]}, ARGV[2])
redis.call('PUBLISH', KEYS[2], 'done')
return 'WITHDRAWN'
