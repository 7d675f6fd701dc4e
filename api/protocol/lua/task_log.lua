-- Not a script of its own: the function of the scripts that say "-- uses: task_log".
-- Appends one entry (field/value pairs: 't' the writer's time, then 'm' a line of
-- text, or 'kind' and the fields of a transition) to the task's log, a stream
-- capped at MAX_LINES entries (`api.protocol.tasklog.MAX_LINES`: the oldest go),
-- and gives the log the record's remaining life, so it expires with the record.
-- The log is named after the record (`keys.task_log`), not a declared key: the
-- scripts that call this keep their keys and arguments.  Through pcall, like the
-- metrics: a user whose ACL lacks the log key still moves the task on, unlogged.
-- Call it after the script's last EXPIRE of the record.

local function task_log(record, ...)
  local MAX_LINES = 1000
  local key = 'vmtask:log:' .. string.sub(record, string.len('vmtask:task:') + 1)
  local added = redis.pcall('XADD', key, 'MAXLEN', MAX_LINES, '*', ...)
  if type(added) == 'table' and added.err then return end
  local ttl = redis.call('PTTL', record)
  if ttl > 0 then
    redis.pcall('PEXPIRE', key, ttl)
  elseif ttl == -1 then
    redis.pcall('PERSIST', key)
  end
end
