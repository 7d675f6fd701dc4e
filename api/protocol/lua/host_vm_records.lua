-- KEYS: one host's VM set (vmtask:host-vms:<host>).
-- ARGV: the VM record key prefix, then the fields wanted.
-- Those fields of the host's VM records: its beat's VM watch and counters in one
-- round trip, O(its own VMs).  The records are read, never written, and are named
-- by the set, so they are not declared keys.  A record that is gone is left out.

local found = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local values = redis.call('HMGET', ARGV[1] .. name, unpack(ARGV, 2))
  if values[1] then found[#found + 1] = values end
end
return found
