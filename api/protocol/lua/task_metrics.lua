-- Not a script of its own: the function of the scripts that say "-- uses: task_metrics".
-- Counts a task that just ended into the metrics hash (`keys.METRICS`), which the
-- exporter (`api.exporter`) reads whole in one command: so a scrape never reads a
-- task record, however long the history.  Call it before the script's first write
-- (a runtime error must leave nothing half-done); the increments go through pcall,
-- so a user whose ACL lacks the metrics key still ends its tasks, only uncounted.
-- Fields (tab-separated): total<op><host><result>, and for a task that started,
-- bucket<kind><op><host><le> (one bucket per observation, not cumulative) and
-- sum<kind><op><host>, where kind is "duration" (finished - started) or "wait"
-- (started - created: the time in the queue).  BUCKETS is `api.exporter.BUCKETS`.

local function task_metrics(record, result, finished)
  local METRICS = 'vmtask:metrics'
  local BUCKETS = {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                   600, 1800, 3600, 7200, 21600}
  local f = redis.call('HMGET', record, 'name', 'host', 'created', 'started')
  local labels = (f[1] or '') .. '\t' .. (f[2] or '')
  redis.pcall('HINCRBY', METRICS, 'total\t' .. labels .. '\t' .. result, 1)
  local function observe(kind, seconds)
    -- Clocks of different machines (producer, worker) may disagree a little.
    if seconds < 0 then seconds = 0 end
    local le = '+Inf'
    for _, bound in ipairs(BUCKETS) do
      if seconds <= bound then le = tostring(bound); break end
    end
    redis.pcall('HINCRBY', METRICS, 'bucket\t' .. kind .. '\t' .. labels .. '\t' .. le, 1)
    redis.pcall('HINCRBYFLOAT', METRICS, 'sum\t' .. kind .. '\t' .. labels,
                string.format('%.6f', seconds))
  end
  local started, ended = tonumber(f[4] or ''), tonumber(finished)
  if started and ended then
    observe('duration', ended - started)
    local created = tonumber(f[3] or '')
    if created then observe('wait', started - created) end
  end
end
