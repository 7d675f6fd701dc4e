-- The final switch of a task that is cancelable until then: from here it is not.
-- KEYS: the task record.  Returns 1 once sealed (cancelable reads '0'), or 0 when a
-- cancel was requested first (the task must then stop and leave no trace).

if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return 0 end
redis.call('HSET', KEYS[1], 'cancelable', '0')
return 1
