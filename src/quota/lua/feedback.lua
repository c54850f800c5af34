-- The upstream said nothing remains in its window: hold the shared budget until it ends.
-- KEYS[1] blocked-until (us)   ARGV[1] block length (us)
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local len = tonumber(ARGV[1])
local until_us = now + len
local cur = tonumber(redis.call('GET', KEYS[1]))
if cur == nil or cur < until_us then
  redis.call('SET', KEYS[1], string.format('%.0f', until_us), 'PX', math.ceil(len / 1000) + 1)
end
return 1
