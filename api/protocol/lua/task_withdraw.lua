-- uses: task_metrics
-- uses: task_log
-- KEYS: record, channel.
-- ARGV: finished time, retention seconds, the Cancelled result, E_ABORT, description.
-- A submit whose record and message no replica acknowledged takes its task back,
-- if no worker has started it: the start gate then drops the message, wherever it is.

local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'PENDING' then return state or 'MISSING' end
task_metrics(KEYS[1], ARGV[3], ARGV[1])
redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'state', 'REVOKED', 'result', ARGV[3],
           'error', ARGV[4], 'error_description', ARGV[5], 'finished', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
task_log(KEYS[1], {t = ARGV[1], kind = 'end', state = 'REVOKED', result = ARGV[3],
                   error = ARGV[4], text = ARGV[5]}, ARGV[2])
redis.call('PUBLISH', KEYS[2], 'done')
return 'WITHDRAWN'
