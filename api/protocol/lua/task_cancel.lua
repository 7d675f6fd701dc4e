-- uses: task_metrics
-- uses: task_log
-- KEYS: record, channel.
-- ARGV: finished time, retention seconds, the Cancelled result, E_ABORT,
--       '1' to revoke a queued task even if its operation is not cancelable
--       (Celery's revoke: a task that never started is safe to drop), the task id,
--       the key prefix of the hosts' PENDING indexes (the record names the host).

local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'MISSING' end
if state ~= 'PENDING' and state ~= 'STARTED' then return 'COMPLETE' end
local cancelable = redis.call('HGET', KEYS[1], 'cancelable') == '1'
if state == 'PENDING' and (cancelable or ARGV[5] == '1') then
  task_metrics(KEYS[1], ARGV[3], ARGV[1])
  redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'state', 'REVOKED', 'result', ARGV[3],
             'error', ARGV[4], 'error_description', 'Cancelled before it started',
             'finished', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  local host = redis.call('HGET', KEYS[1], 'host')
  if ARGV[7] and host then redis.call('ZREM', ARGV[7] .. host, ARGV[6]) end
  task_log(KEYS[1], {t = ARGV[1], kind = 'end', state = 'REVOKED', result = ARGV[3],
                     error = ARGV[4], text = 'Cancelled before it started'}, ARGV[2])
  redis.call('PUBLISH', KEYS[2], 'done')
  return 'REVOKED'
end
if not cancelable then return 'NOT_CANCELABLE' end
redis.call('HSET', KEYS[1], 'cancel_requested', '1')
task_log(KEYS[1], {t = ARGV[1], kind = 'cancel'})
redis.call('PUBLISH', KEYS[2], 'cancel')
return 'REQUESTED'
