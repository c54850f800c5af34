-- All quota checks for one request, decided and spent atomically (one EVALSHA, one round trip).
-- Nothing is spent unless every check passes. Times are Redis server microseconds (TIME), so
-- replicas with skewed clocks agree. Large numbers are written with %.0f: Lua's default number
-- formatting keeps 14 digits and epoch microseconds have 16.
--
-- KEYS[1] team GCRA arrival time      KEYS[2] team concurrency leases (ZSET id -> expiry)
-- KEYS[3] operation GCRA arrival time KEYS[4] operation daily counter (HASH d = day, n = used)
-- KEYS[5] team daily counter (HASH d = day, n = used)
-- KEYS[6] this admission's record (HASH of what it charged, see below)
-- KEYS[7] this admission's tombstone (set by refund.lua when it came first)
-- ARGV[1] team interval (us, 0 = no team rate)     ARGV[2] team burst
-- ARGV[3] concurrency cap (0 = none)  ARGV[4] admission id (also the lease id)  ARGV[5] lease TTL (ms)
-- ARGV[6] operation interval (us, 0 = none)        ARGV[7] operation burst
-- ARGV[8] operation daily quota (-1 = none)         ARGV[9] team daily quota (-1 = none)
-- ARGV[10] lifetime of the admission's record (ms)
-- KEYS[8..] and ARGV[11..], in pairs: concurrency leases this replica has given back since its
-- last call (lease key, lease id), removed before anything else
-- Returns {status, retry_us, team_tat, op_tat, daily_used, in_use, until_midnight_us, now, day,
--          team_daily_used}
-- with status 0 admitted, 1 rate, 2 daily, 3 concurrency, 4 void (the gateway gave up on this
-- admission and its refund came first: nothing is read or spent); the state after the request
-- when it was admitted, before it when refused.
--
-- An admission that spends writes KEYS[6]: `tr` / `or` the team / operation interval added to
-- the arrival times, `d` the day, `od` / `td` 1 when the operation / team daily count was
-- raised, `l` 1 when a lease was taken. refund.lua undoes exactly that.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local DAY = 86400000000

for i = 8, #KEYS do
  redis.call('ZREM', KEYS[i], ARGV[i + 3])
end

if redis.call('EXISTS', KEYS[7]) == 1 then
  return {4, 0, 0, 0, 0, 0, 0, now, 0, 0}
end

local team_t, team_b = tonumber(ARGV[1]), tonumber(ARGV[2])
local cap, lease_ttl = tonumber(ARGV[3]), tonumber(ARGV[5])
local op_t, op_b = tonumber(ARGV[6]), tonumber(ARGV[7])
local daily = tonumber(ARGV[8])
local team_daily = tonumber(ARGV[9])

local function tat_of(key)
  local v = tonumber(redis.call('GET', key))
  if v == nil or v < now then return now end
  return v
end

-- microseconds until one more request conforms (0 = now)
local function wait_for(tat, interval, burst)
  local w = tat + interval - burst * interval - now
  if w < 0 then return 0 end
  return w
end

local rate_wait = 0
local team_tat, op_tat = now, now
if team_t > 0 then
  team_tat = tat_of(KEYS[1])
  rate_wait = wait_for(team_tat, team_t, team_b)
end
if op_t > 0 then
  op_tat = tat_of(KEYS[3])
  local w = wait_for(op_tat, op_t, op_b)
  if w > rate_wait then rate_wait = w end
end

local day = math.floor(now / DAY)
local until_midnight = (day + 1) * DAY - now
local function used_today(key)
  local h = redis.call('HMGET', key, 'd', 'n')
  if tonumber(h[1]) == day then return tonumber(h[2]) or 0 end
  return 0
end
local used, team_used = 0, 0
if daily >= 0 then used = used_today(KEYS[4]) end
if team_daily >= 0 then team_used = used_today(KEYS[5]) end

local in_use = 0
if cap > 0 then
  -- leases of crashed replicas (or never released) come back when they expire
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', string.format('%.0f', now))
  in_use = redis.call('ZCARD', KEYS[2])
end

local status, retry = 0, 0
if (daily >= 0 and used >= daily) or (team_daily >= 0 and team_used >= team_daily) then
  status, retry = 2, until_midnight
elseif rate_wait > 0 then
  status, retry = 1, rate_wait
elseif cap > 0 and in_use >= cap then
  status, retry = 3, 1000000
end

if status == 0 then
  if team_t > 0 then
    team_tat = team_tat + team_t
    redis.call('SET', KEYS[1], string.format('%.0f', team_tat),
      'PX', math.ceil((team_tat - now) / 1000) + 1000)
  end
  if op_t > 0 then
    op_tat = op_tat + op_t
    redis.call('SET', KEYS[3], string.format('%.0f', op_tat),
      'PX', math.ceil((op_tat - now) / 1000) + 1000)
  end
  -- a daily counter outlives its day by an hour, for clock skew between replicas' decisions
  local function spend_day(key, n)
    redis.call('HSET', key, 'd', string.format('%.0f', day), 'n', string.format('%.0f', n))
    redis.call('EXPIREAT', key, string.format('%.0f', (day + 1) * 86400 + 3600))
  end
  if daily >= 0 then
    used = used + 1
    spend_day(KEYS[4], used)
  end
  if team_daily >= 0 then
    team_used = team_used + 1
    spend_day(KEYS[5], team_used)
  end
  if cap > 0 then
    redis.call('ZADD', KEYS[2], string.format('%.0f', now + lease_ttl * 1000), ARGV[4])
    redis.call('PEXPIRE', KEYS[2], string.format('%.0f', lease_ttl + 1000))
    in_use = in_use + 1
  end
  local record = {'d', string.format('%.0f', day)}
  if team_t > 0 then table.insert(record, 'tr'); table.insert(record, ARGV[1]) end
  if op_t > 0 then table.insert(record, 'or'); table.insert(record, ARGV[6]) end
  if daily >= 0 then table.insert(record, 'od'); table.insert(record, '1') end
  if team_daily >= 0 then table.insert(record, 'td'); table.insert(record, '1') end
  if cap > 0 then table.insert(record, 'l'); table.insert(record, '1') end
  redis.call('HSET', KEYS[6], unpack(record))
  redis.call('PEXPIRE', KEYS[6], ARGV[10])
end

return {status, retry, team_tat, op_tat, used, in_use, until_midnight, now, day, team_used}
