-- KEYS: vm record, names set, events stream. ARGV: name, time, stream max length,
-- the DeleteMachine state, the key prefix of the hosts' VM sets (the owner's set is
-- named by the record, so it is not a declared key).

local state = redis.call('HGET', KEYS[1], 'state')
if state ~= ARGV[4] then return state or 'MISSING' end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'name', ARGV[1],
           'host', redis.call('HGET', KEYS[1], 'host'), 'old', state, 'new', '', 'time', ARGV[2])
if ARGV[5] then
  redis.call('SREM', ARGV[5] .. redis.call('HGET', KEYS[1], 'host'), ARGV[1])
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 'OK'
