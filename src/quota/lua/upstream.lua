-- One slot in the shared upstream budget (GCRA, shared by every replica), reserved ahead when it
-- starts within max_wait: the caller then sleeps the returned delay. A block set from the
-- upstream's own "nothing remaining" answer holds every slot back until it ends.
--
-- KEYS[1] budget GCRA arrival time   KEYS[2] blocked-until (us)
-- ARGV[1] interval (us)   ARGV[2] burst   ARGV[3] max wait (us)
-- Returns {0, delay_us} when reserved, {1, delay_us} when the slot would start too late.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, burst, max_wait = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])

local start = now
local blocked = tonumber(redis.call('GET', KEYS[2]))
if blocked ~= nil and blocked > start then start = blocked end
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < start then tat = start end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if allow_at < start then allow_at = start end
local delay = allow_at - now
if delay > max_wait then return {1, delay} end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat),
  'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {0, delay}
