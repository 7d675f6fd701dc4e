-- KEYS: vm record, a live migration's transfer hash, the destination's wake list.
-- ARGV: source host.
-- The source's way back from a live migration: it may run the guest again only if
-- the destination has not taken the VM over, and from then on it never will
-- (vm_move.lua refuses once 'abort' is set).  One script, so the two cannot cross.
if redis.call('HGET', KEYS[1], 'host') ~= ARGV[1] then return 'MOVED' end
redis.call('HSET', KEYS[2], 'abort', '1')
redis.call('RPUSH', KEYS[3], 'abort')
return 'ABORTED'
