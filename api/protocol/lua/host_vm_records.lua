-- KEYS: one host's VM set (vmtask:host-vms:<host>).
-- ARGV: the VM record key prefix.
-- The host's VM records, field/value pairs each: its beat's VM watch and counters
-- in one round trip, O(its own VMs).  The records are read, never written, and are
-- named by the set, so they are not declared keys.

local found = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local record = redis.call('HGETALL', ARGV[1] .. name)
  if #record > 0 then found[#found + 1] = record end
end
return found
