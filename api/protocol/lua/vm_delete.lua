-- KEYS: vm record, names set, events stream. ARGV: name, time, stream max length,
-- the DeleteMachine state.

local state = redis.call('HGET', KEYS[1], 'state')
if state ~= ARGV[4] then return state or 'MISSING' end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'name', ARGV[1],
           'host', redis.call('HGET', KEYS[1], 'host'), 'old', state, 'new', '', 'time', ARGV[2])
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 'OK'
