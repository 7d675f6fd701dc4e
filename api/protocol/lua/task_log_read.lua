-- KEYS: a task's record, its log (`lua/task_log.lua`).
-- ARGV: the number of the last entry the reader has (0: none), and how many of the
-- last entries it wants at most ('': all).
-- Returns {} when there is no record; else the number of the first entry returned
-- (entries are numbered 1, 2, ... over the task's life, whatever the cap dropped),
-- then the entries, oldest first.  One read at one instant: what a follower saw
-- and what it asks for next never overlap nor leave a gap.

local record = redis.call('HMGET', KEYS[1], 'state', 'log_dropped')
if not record[1] then return {} end
local dropped = tonumber(record[2] or '0')
local length = redis.call('LLEN', KEYS[2])
local first = math.max(tonumber(ARGV[1]) - dropped, 0)  -- index of the first wanted
if ARGV[2] ~= '' then first = math.max(first, length - tonumber(ARGV[2])) end
local out = {tostring(dropped + first + 1)}
if first < length then
  for _, entry in ipairs(redis.call('LRANGE', KEYS[2], first, -1)) do
    out[#out + 1] = entry
  end
end
return out
