-- KEYS: the known-hosts set.
-- ARGV: the heartbeat key prefix.
-- Every known host whose heartbeat is live, with that heartbeat: name, value,
-- name, value...  One round trip however many hosts (O(known hosts) inside Redis:
-- a listing of the fleet is the fleet's size).  The heartbeats are read, never
-- written, so they are not declared keys (the producer may only read them).

local found = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local beat = redis.call('GET', ARGV[1] .. name)
  if beat then
    found[#found + 1] = name
    found[#found + 1] = beat
  end
end
return found
