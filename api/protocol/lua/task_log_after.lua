-- KEYS: a task's log (`lua/task_log.lua`).  ARGV: the number 'n' of the last entry
-- the reader has.  The entries after it (all those still kept), oldest first: the
-- last entry's number says how many were written since, whatever the cap dropped.

local last = redis.call('LINDEX', KEYS[1], -1)
if not last then return {} end
local wanted = cjson.decode(last).n - tonumber(ARGV[1])
if wanted <= 0 then return {} end
return redis.call('LRANGE', KEYS[1], -wanted, -1)
