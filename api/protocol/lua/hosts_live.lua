-- KEYS: none.
-- ARGV: the known-hosts set, the heartbeat key prefix.
-- Every known host whose heartbeat is live, with that heartbeat: name, value,
-- name, value...  One round trip however many hosts (O(known hosts) inside Redis:
-- a listing of the fleet is the fleet's size).  Read only; no key is declared,
-- because the producer user may only read these (a declared key needs both).

local found = {}
for _, name in ipairs(redis.call('SMEMBERS', ARGV[1])) do
  local beat = redis.call('GET', ARGV[2] .. name)
  if beat then
    found[#found + 1] = name
    found[#found + 1] = beat
  end
end
return found
