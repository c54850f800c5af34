-- One slot in the shared upstream budget, a sliding window shared by every replica: the start
-- times of the last `count` slots, oldest first, in a list. A slot starts now, or when the
-- count-th most recent start leaves the window, or when a block ends, whichever is latest (the
-- rule `window_start` in quota/upstream.rs states for the memory backend). Reserved ahead when it
-- starts within max_wait: the caller then sleeps the returned delay. So `count` slots start at
-- once from idle and no span of `per` ever holds more than `count` starts, on any replica.
--
-- KEYS[1] window: list of start times (us)   KEYS[2] blocked-until (us)
-- ARGV[1] count   ARGV[2] per (us)   ARGV[3] max wait (us)
-- Returns {0, delay_us} when reserved, {1, delay_us} when the slot would start too late.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local count, per, max_wait = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])

local start = now
local blocked = tonumber(redis.call('GET', KEYS[2]))
if blocked ~= nil and blocked > start then start = blocked end
if redis.call('LLEN', KEYS[1]) >= count then
  local oldest = tonumber(redis.call('LINDEX', KEYS[1], -count))
  if oldest ~= nil and oldest + per > start then start = oldest + per end
end
local delay = start - now
if delay > max_wait then return {1, delay} end
redis.call('RPUSH', KEYS[1], string.format('%.0f', start))
redis.call('LTRIM', KEYS[1], -count, -1)
redis.call('PEXPIRE', KEYS[1], math.ceil((start - now + per) / 1000) + 1000)
return {0, delay}
