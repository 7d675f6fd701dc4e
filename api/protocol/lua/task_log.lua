-- Not a script of its own: the function of the scripts that say "-- uses: task_log".
-- Appends one entry to the task's log (`api.protocol.tasklog`): a list of JSON
-- objects, each with 'n' (its number: 1, 2, ... for the task's whole life, so a
-- follower asks for what came after the last it printed), 't' (the writer's time)
-- and 'm' (a line of text), or 'kind' and the fields of a transition.  The list is
-- capped at MAX_LINES entries (`api.protocol.tasklog.MAX_LINES`: the oldest go) and
-- gets the record's remaining life, so it expires with the record.
-- The log is named after the record (`keys.task_log`), not a declared key: the
-- scripts that call this keep their keys and arguments.  Through pcall, like the
-- metrics: a user whose ACL lacks the log key still moves the task on, unlogged.
-- Call it after the script's last EXPIRE of the record.

local function task_log(record, entry)
  local MAX_LINES = 1000
  local key = 'vmtask:log:' .. string.sub(record, string.len('vmtask:task:') + 1)
  local last = redis.pcall('LINDEX', key, -1)
  if type(last) == 'table' then return end  -- refused (ACL) or not a list
  entry.n = 1
  if last then entry.n = cjson.decode(last).n + 1 end
  redis.pcall('RPUSH', key, cjson.encode(entry))
  if entry.n > MAX_LINES then redis.pcall('LTRIM', key, -MAX_LINES, -1) end
  local ttl = redis.call('PTTL', record)
  if ttl > 0 then
    redis.pcall('PEXPIRE', key, ttl)
  elseif ttl == -1 then
    redis.pcall('PERSIST', key)
  end
end
