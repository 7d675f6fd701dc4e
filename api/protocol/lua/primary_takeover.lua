-- Not a script of its own: the function of the scripts that say "-- uses: primary_takeover".
-- Notes which Redis primary this is (its replication id: a promoted replica gets a
-- new one) and since when (Redis TIME; 0 for the first primary ever seen, which is
-- no switch).  Returns the seconds since this primary took over, that time, its
-- replication id, and whether this very call noticed a switch.

local function primary_takeover(key)
  local replid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)')
  local now = tonumber(redis.call('TIME')[1])
  local seen = redis.call('HMGET', key, 'replid', 'since')
  if seen[1] ~= replid then
    local since = now
    if not seen[1] then since = 0 end
    redis.call('HSET', key, 'replid', replid, 'since', since)
    return now - since, since, replid, seen[1] ~= false
  end
  return now - tonumber(seen[2]), tonumber(seen[2]), replid, false
end
