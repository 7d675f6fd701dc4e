-- KEYS: the task record, the recent-task index, the host's PENDING index.
-- ARGV: now, record TTL seconds, task id, the host's heartbeat key, the count N of
-- record field/value items, those N items, then the task's message as the Redis
-- commands kombu would send for it: (command, queue key or channel, value) triples.
-- Nothing is written unless the host is live; then the record, its index entry and
-- the message appear at once, so no worker can pop a message whose record is not
-- there yet, and a refused submit leaves nothing behind.  The heartbeat and the
-- queue are not declared keys: the producer user may only read the one and only
-- write the other, while a declared key needs both.
-- (Trimming the index is the workers' periodic job.)

local n = tonumber(ARGV[5])
local first_command = 6 + n
for i = first_command, #ARGV, 3 do
  local command = ARGV[i]
  if command ~= 'lpush' and command ~= 'pexpire' and command ~= 'publish' then
    return redis.error_reply('ERR vmtask submit: not a publish command: ' .. command)
  end
end
-- A submit re-sent after a lost reply (redis-py retries) finds its record: the
-- message went with it, and a second copy could start the task again.
if redis.call('EXISTS', KEYS[1]) == 1 then return 2 end
if redis.call('EXISTS', ARGV[4]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 6, 5 + n))
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[3])
if KEYS[3] then redis.call('ZADD', KEYS[3], ARGV[1], ARGV[3]) end
for i = first_command, #ARGV, 3 do
  redis.call(string.upper(ARGV[i]), ARGV[i + 1], ARGV[i + 2])
end
return 1
