-- The gateway gave up waiting for an admission (its deadline passed) and refused or decided the
-- request without Redis: undo exactly what that admission charged, whenever it runs.
-- When admit.lua ran first, its record (KEYS[6]) says what it charged: the arrival times go back
-- by the intervals it added, the daily counts of the same day down by one, its lease is removed,
-- and the record is deleted (so a second refund changes nothing). When there is no record, the
-- admission has not run yet (or never will): the tombstone (KEYS[7]) makes it void when it does.
--
-- KEYS[1..5] as in admit.lua: team GCRA, team leases, operation GCRA, operation daily, team daily
-- KEYS[6] the admission's record   KEYS[7] the admission's tombstone
-- ARGV[1] admission id (the lease id)   ARGV[2] lifetime of the tombstone (ms)
-- Returns 1 when charges were undone, 0 when the tombstone was set.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local r = redis.call('HMGET', KEYS[6], 'd', 'tr', 'or', 'od', 'td', 'l')
local day = tonumber(r[1])
if day == nil then
  redis.call('SET', KEYS[7], '1', 'PX', ARGV[2])
  return 0
end

-- An arrival time moves back by the interval the admission added; at or before now it means
-- "idle", the same as no key.
local function give_back(key, interval)
  if interval == nil or interval <= 0 then return end
  local tat = tonumber(redis.call('GET', key))
  if tat == nil then return end
  tat = tat - interval
  if tat <= now then
    redis.call('DEL', key)
  else
    redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  end
end
give_back(KEYS[1], tonumber(r[2]))
give_back(KEYS[3], tonumber(r[3]))

-- A daily count goes down only on the day it was raised (HSET keeps the key's expiry).
local function uncount(key)
  local h = redis.call('HMGET', key, 'd', 'n')
  local n = tonumber(h[2])
  if tonumber(h[1]) == day and n ~= nil and n > 0 then
    redis.call('HSET', key, 'n', string.format('%.0f', n - 1))
  end
end
if r[4] then uncount(KEYS[4]) end
if r[5] then uncount(KEYS[5]) end
if r[6] then redis.call('ZREM', KEYS[2], ARGV[1]) end

redis.call('DEL', KEYS[6])
return 1
