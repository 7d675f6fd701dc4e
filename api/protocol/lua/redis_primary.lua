-- uses: primary_takeover
-- KEYS: the primary key (vmtask:redis-primary).
-- Notes which primary this is and since when (`primary_takeover`); returns the
-- seconds since this primary took over, that time, and its replication id.
-- The workers' heartbeat calls it, so a failover is noticed even before any task
-- is judged; `task_finish.lua` keeps the same record when it judges a crash.

local age, since, replid = primary_takeover(KEYS[1])
return {age, since, replid}
