-- uses: primary_takeover
-- uses: task_metrics
-- uses: task_log
-- KEYS: record, lease, running set, channel, the primary key (read only by a crash
--       judgment), the lease deadlines.
-- ARGV: state, result, error, error description, finished time, percent,
--       retention seconds, task id, only_if_lease_expired ('1' or '0'), output JSON,
--       the grace after a primary switch (seconds; for a crash judgment), the key
--       prefix of the hosts' running sets.
-- The task leaves its host's running set (named by the record's host, so a judge
-- need not know it: not a declared key, like the submit's queue) and the deadlines.

local function forget()
  redis.call('SREM', KEYS[3], ARGV[8])
  if KEYS[6] then redis.call('ZREM', KEYS[6], ARGV[8]) end
  if ARGV[12] then
    local host = redis.call('HGET', KEYS[1], 'host')
    if host then redis.call('SREM', ARGV[12] .. host, ARGV[8]) end
  end
end

local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'STARTED' then
  forget()
  return state or 'MISSING'
end
if ARGV[9] == '1' then
  if redis.call('EXISTS', KEYS[2]) == 1 then return 'LEASED' end
  -- The crash bound counts from the end of a failover: while the primary was
  -- switching no worker could renew its lease, so a lease that lapsed meanwhile is
  -- no crash until the workers have had a whole grace period on this primary.  A
  -- new primary has a new replication id; the first judge to see it starts the clock.
  local age, _, _, switched = primary_takeover(KEYS[5])
  if switched or age < tonumber(ARGV[11]) then return 'LEASED' end
end
local percent = tonumber(redis.call('HGET', KEYS[1], 'percent') or '0')
if tonumber(ARGV[6]) > percent then percent = tonumber(ARGV[6]) end
task_metrics(KEYS[1], ARGV[2], ARGV[5])  -- before the first write of the end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'result', ARGV[2], 'error', ARGV[3],
           'error_description', ARGV[4], 'finished', ARGV[5], 'percent', percent,
           'output', ARGV[10])
redis.call('DEL', KEYS[2])
forget()
redis.call('EXPIRE', KEYS[1], ARGV[7])
task_log(KEYS[1], {t = ARGV[5], kind = 'end', state = ARGV[1], result = ARGV[2], error = ARGV[3],
                   text = ARGV[4], judged = ARGV[9]}, ARGV[7])
redis.call('PUBLISH', KEYS[4], 'done')
return 'OK'
