-- KEYS: vm record, events stream[, a live migration's transfer hash].  ARGV: source
-- host, destination host, allowed states (comma-separated ints), time, stream max
-- length, the key prefix of the hosts' VM sets (the VM leaves the source's set
-- for the destination's with the move).
-- The move, a migrated VM's fenced change of owner: the record names the destination
-- only if it still names the source, the VM is still in a state that moves and,
-- live, the source has not taken the guest back (vm_move_abort.lua).
if KEYS[3] and redis.call('HGET', KEYS[3], 'abort') == '1' then return 'ABORTED' end
local host = redis.call('HGET', KEYS[1], 'host')
if not host then return 'MISSING' end
if host ~= ARGV[1] then return 'MOVED' end
local state = redis.call('HGET', KEYS[1], 'state')
local allowed = false
for s in string.gmatch(ARGV[3], '[^,]+') do
  if s == state then allowed = true end
end
if not allowed then return 'REFUSED' end
redis.call('HSET', KEYS[1], 'host', ARGV[2], 'changed', ARGV[4])
if ARGV[6] then
  local name = redis.call('HGET', KEYS[1], 'name')
  redis.call('SREM', ARGV[6] .. ARGV[1], name)
  redis.call('SADD', ARGV[6] .. ARGV[2], name)
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*',
           'name', redis.call('HGET', KEYS[1], 'name'), 'host', ARGV[2],
           'old', state, 'new', state, 'time', ARGV[4])
return 'OK'
