"""The Lua scripts behind RedisIndex (semantic_cache/redis.py documents the keys): each write to the index's
bookkeeping runs as one script, so concurrent gateways never evict the same entry twice, never miss an eviction,
and never leave a vector without its bookkeeping or the other way round.

Every script takes ARGV[1] = the key prefix P. Scores (times) travel as the strings Redis and the client wrote,
never through a Lua number (which would keep 14 digits only).
"""

from __future__ import annotations

_COMMON = """
local P = ARGV[1]
local function lru(t) return P .. ':lru:' .. t end
local function by(n) return P .. ':by:' .. n end

-- tenant t's entries changed (it held `before`): file it again under its count and its least recent use
local function refile(t, before)
  if before > 0 then redis.call('ZREM', by(before), t) end
  local n = redis.call('ZCARD', lru(t))
  if n == 0 then
    redis.call('ZREM', P .. ':tenants', t)
    return
  end
  redis.call('ZADD', P .. ':tenants', n, t)
  redis.call('ZADD', by(n), redis.call('ZRANGE', lru(t), 0, 0, 'WITHSCORES')[2], t)
end

-- remove an entry: its vector and its bookkeeping (a member known to P:exp only is just unlinked)
local function drop(member)
  local t = string.match(member, '^[^:]*')
  local scope_key, id = string.match(member, '^(.*)|([^|]*)$')
  redis.call('VREM', P .. ':vs:' .. scope_key, id)  -- an emptied set deletes itself
  redis.call('ZREM', P .. ':exp', member)
  local before = redis.call('ZCARD', lru(t))
  if redis.call('ZREM', lru(t), member) == 1 then
    redis.call('DECR', P .. ':size')
    refile(t, before)
  end
end
"""

# ARGV: P, tenant, scope key, id, FP32 blob, attributes, key expiry (ms), now, entry expiry, quota, max entries,
# sweep batch, evict window
ADD = (
    _COMMON
    + """
local t, scope_key, id = ARGV[2], ARGV[3], ARGV[4]
local vs, member = P .. ':vs:' .. scope_key, scope_key .. '|' .. id
redis.call('VADD', vs, 'FP32', ARGV[5], id, 'Q8', 'SETATTR', ARGV[6])
-- the key lives as long as its longest-lived entry: NX sets a first expiry, GT only ever extends it
redis.call('PEXPIREAT', vs, ARGV[7], 'NX')
redis.call('PEXPIREAT', vs, ARGV[7], 'GT')
redis.call('ZADD', P .. ':exp', ARGV[9], member)
local before = redis.call('ZCARD', lru(t))
redis.call('INCRBY', P .. ':size', redis.call('ZADD', lru(t), ARGV[8], member))  -- ZADD: 1 if new
refile(t, before)
for _, m in ipairs(redis.call('ZRANGEBYSCORE', P .. ':exp', '-inf', ARGV[8], 'LIMIT', 0, ARGV[12])) do
  drop(m)
end
local window = tonumber(ARGV[13])
local quota = tonumber(ARGV[10])
if quota > 0 then  -- step 1: the tenant's own least recently used, down to its quota
  local over = math.min(redis.call('ZCARD', lru(t)) - quota, window)
  if over > 0 then
    for _, m in ipairs(redis.call('ZRANGE', lru(t), 0, over - 1)) do drop(m) end
  end
end
-- step 2: past the cap, the least recently used entry of the largest tenant (a tie: the least recently used)
local excess = math.min(tonumber(redis.call('GET', P .. ':size') or '0') - tonumber(ARGV[11]), window)
for _ = 1, excess do
  local largest = redis.call('ZREVRANGE', P .. ':tenants', 0, 0, 'WITHSCORES')
  if not largest[1] then break end
  local victim = redis.call('ZRANGE', by(tonumber(largest[2])), 0, 0)[1]
  if not victim then break end
  drop(redis.call('ZRANGE', lru(victim), 0, 0)[1])
end
return 0
"""
)

# ARGV: P, tenant, member, now
TOUCH = (
    _COMMON
    + """
local t, member = ARGV[2], ARGV[3]
if redis.call('ZSCORE', lru(t), member) then
  redis.call('ZADD', lru(t), ARGV[4], member)
  refile(t, redis.call('ZCARD', lru(t)))
end
return 0
"""
)

# KEYS: vector sets of the tenant found by SCAN (also those holding entries the bookkeeping never knew);
# ARGV: P, tenant, member prefix ("<tenant>:" or "<tenant>:<model>:"). Returns the entries the sets held.
INVALIDATE = (
    _COMMON
    + """
local t, prefix = ARGV[2], ARGV[3]
local sets = {}
for _, k in ipairs(KEYS) do sets[k] = true end
local before = redis.call('ZCARD', lru(t))
local gone = {}
for _, m in ipairs(redis.call('ZRANGE', lru(t), 0, -1)) do
  if string.sub(m, 1, #prefix) == prefix then
    gone[#gone + 1] = m
    sets[P .. ':vs:' .. string.match(m, '^(.*)|')] = true
  end
end
for i = 1, #gone, 500 do  -- unpack's stack is limited: remove in batches
  local batch = {unpack(gone, i, math.min(i + 499, #gone))}
  redis.call('ZREM', lru(t), unpack(batch))
  redis.call('ZREM', P .. ':exp', unpack(batch))
end
redis.call('DECRBY', P .. ':size', #gone)
refile(t, before)
local held = 0
for k in pairs(sets) do
  held = held + (redis.call('VCARD', k) or 0)
  redis.call('UNLINK', k)
end
return held
"""
)
