-- Token buckets, all or nothing: take one token from each bucket in KEYS,
-- or from none when one of them is empty.
-- ARGV: per bucket, its refill rate (tokens/second) and capacity.
-- Returns {1} when taken, else {0, seconds until possible (string), index (1-based)}.
-- Time is the server's, so every worker and replica shares one clock.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local levels = {}
local wait, empty = 0, 0
for i = 1, #KEYS do
  local rate = tonumber(ARGV[2 * i - 1])
  local capacity = tonumber(ARGV[2 * i])
  local state = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local tokens = tonumber(state[1])
  local ts = tonumber(state[2])
  if tokens == nil or ts == nil then
    tokens, ts = capacity, now
  end
  tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
  levels[i] = tokens
  if tokens < 1 and (1 - tokens) / rate > wait then
    wait, empty = (1 - tokens) / rate, i
  end
end
if empty > 0 then
  return {0, tostring(wait), empty}
end
for i = 1, #KEYS do
  local rate = tonumber(ARGV[2 * i - 1])
  local capacity = tonumber(ARGV[2 * i])
  redis.call('HSET', KEYS[i], 'tokens', tostring(levels[i] - 1), 'ts', tostring(now))
  -- Gone once it would be full again: an idle client costs nothing.
  redis.call('PEXPIRE', KEYS[i], math.ceil(capacity / rate * 1000) + 1000)
end
return {1}
