-- KEYS: VM records.  ARGV: the fields wanted, the first one always present ('name').
-- Those fields of each record (an empty list for a record that is gone), in order:
-- a listing of many VMs in one reply that the client parses in C, rather than one
-- command (and one Python reply object) per VM, and only the fields a listing
-- shows (not a running VM's console password).  Read only.

local found = {}
for i, key in ipairs(KEYS) do
  local values = redis.call('HMGET', key, unpack(ARGV))
  if values[1] then found[i] = values else found[i] = {} end
end
return found
