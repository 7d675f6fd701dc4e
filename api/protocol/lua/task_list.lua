-- KEYS: the recent-task index.
-- ARGV: the task record key prefix, the state wanted ('' for any), the host wanted
-- ('' for any), how many ids to return at most, how many index entries to look at.
-- The newest tasks whose record matches, newest first.  The filter runs beside the
-- records, so a selective filter over a long history costs one round trip rather
-- than a read of every record it passes over.  Records are read, never written
-- (they are not declared keys: a producer may read them).

local wanted_state, wanted_host = ARGV[2], ARGV[3]
local limit, horizon = tonumber(ARGV[4]), tonumber(ARGV[5])
local found = {}
local page = 1000
for start = 0, horizon - 1, page do
  local ids = redis.call('ZREVRANGE', KEYS[1], start, math.min(start + page, horizon) - 1)
  for _, id in ipairs(ids) do
    local fields = redis.call('HMGET', ARGV[1] .. id, 'state', 'host')
    if fields[1] and (wanted_state == '' or fields[1] == wanted_state)
        and (wanted_host == '' or fields[2] == wanted_host) then
      found[#found + 1] = id
      if #found >= limit then return found end
    end
  end
  if #ids < page then break end
end
return found
