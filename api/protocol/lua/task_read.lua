-- KEYS: the task record, its lease.
-- Returns the record's field/value pairs, then '1' or '0' for a live lease: every
-- IVMTask2 property at one instant, in one command.

local fields = redis.call('HGETALL', KEYS[1])
fields[#fields + 1] = tostring(redis.call('EXISTS', KEYS[2]))
return fields
