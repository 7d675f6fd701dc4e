-- KEYS: vm record. ARGV: allowed states (comma-separated ints), then the changed
-- field/value pairs.  Returns {outcome, state}: the change lands only while the VM
-- is in an allowed state, so it can never slip in under a start.

local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'MISSING', ''} end
for s in string.gmatch(ARGV[1], '[^,]+') do
  if s == state then
    if #ARGV > 1 then redis.call('HSET', KEYS[1], unpack(ARGV, 2)) end
    return {'OK', state}
  end
end
return {'REFUSED', state}
