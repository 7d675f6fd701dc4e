-- uses: task_log
-- KEYS: record, channel.
-- ARGV: worker identity, then (time, text) pairs: lines the running operation wrote.
-- Written only while the record says this worker runs the task: a worker that was
-- judged crashed (stopped, then woken) adds nothing after the crash line.  Followers
-- (`vmtask task log -f`) are woken by a 'log' message on the task's channel.

local record = redis.call('HMGET', KEYS[1], 'state', 'worker')
if record[1] ~= 'STARTED' or record[2] ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 2 do
  task_log(KEYS[1], {t = ARGV[i], m = ARGV[i + 1]})
end
redis.call('PUBLISH', KEYS[2], 'log')
return 1
