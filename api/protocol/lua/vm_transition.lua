-- KEYS: vm record, events stream. ARGV: allowed states (comma-separated ints),
-- new state, time, stream max length, and optionally the host the record must name
-- (a host's own watch: a VM that moved away meanwhile is not its to change).
-- Returns {outcome, old state}; outcome OK, MISSING, REFUSED or ELSEWHERE.

local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'MISSING', ''} end
if ARGV[5] and ARGV[5] ~= '' and redis.call('HGET', KEYS[1], 'host') ~= ARGV[5] then
  return {'ELSEWHERE', state}
end
local allowed = false
for s in string.gmatch(ARGV[1], '[^,]+') do
  if s == state then allowed = true end
end
if not allowed then return {'REFUSED', state} end
if state ~= ARGV[2] then
  redis.call('HSET', KEYS[1], 'state', ARGV[2], 'changed', ARGV[3])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*',
             'name', redis.call('HGET', KEYS[1], 'name'),
             'host', redis.call('HGET', KEYS[1], 'host'),
             'old', state, 'new', ARGV[2], 'time', ARGV[3])
end
return {'OK', state}
