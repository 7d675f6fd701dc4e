-- Not a script of its own: the function of the scripts that say "-- uses: task_log".
-- Appends one entry to the task's log (`api.protocol.tasklog`): a list of JSON
-- objects, each with 't' (the writer's time) and 'm' (a line of text), or 'kind'
-- and the fields of a transition.  The list keeps the last MAX_LINES entries
-- (`api.protocol.tasklog.MAX_LINES`); the record counts those dropped
-- ('log_dropped'), so every entry keeps its number for a follower
-- (`lua/task_log_read.lua`).  The log lives as long as the record: ``ttl`` (seconds)
-- when the caller just set the record's, else the record's remaining life.
-- The log is named after the record (`keys.task_log`), not a declared key: the
-- scripts that call this keep their keys and arguments.  Through pcall, like the
-- metrics: a user whose ACL lacks the log key still moves the task on, unlogged.
-- Cheap on purpose (it runs in every task's start and finish): no read of the list.

local function task_log(record, entry, ttl)
  local MAX_LINES, MAX_LINE_BYTES = 1000, 1024
  -- A long failure description is clipped like the worker's lines, never inside a
  -- UTF-8 character (the reader decodes strictly).
  if entry.text and string.len(entry.text) > MAX_LINE_BYTES then
    entry.text = string.gsub(string.sub(entry.text, 1, MAX_LINE_BYTES - 3),
                             '[\192-\255][\128-\191]*$', '') .. '...'
  end
  local key = 'vmtask:log:' .. string.sub(record, string.len('vmtask:task:') + 1)
  local length = redis.pcall('RPUSH', key, cjson.encode(entry))
  if type(length) ~= 'number' then return end  -- refused (ACL) or not a list
  if length > MAX_LINES then
    redis.pcall('LTRIM', key, length - MAX_LINES, -1)
    redis.pcall('HINCRBY', record, 'log_dropped', length - MAX_LINES)
  end
  if ttl then
    redis.pcall('EXPIRE', key, ttl)
    return
  end
  local left = redis.call('PTTL', record)
  if left > 0 then
    redis.pcall('PEXPIRE', key, left)
  elseif left == -1 then
    redis.pcall('PERSIST', key)
  end
end
