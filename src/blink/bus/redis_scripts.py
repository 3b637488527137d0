"""The Lua scripts RedisBus runs (each one round trip, atomic on the Redis server): submit and publish."""

# KEYS: pool, resp, state, target (a replica's direct stream, or the pool again). ARGV: group, max_pending,
# request, ttl_ms. The group is made with the stream (id 0: requests sent before any replica came are delivered).
# Idempotent: a request whose state key exists was queued already (sent again after a dropped connection).
# The request goes to the target if that stream exists (its replica made it and no claimer has emptied and
# deleted it since the replica stopped), else to the pool. Returns the entry id, or nil when the pool's backlog is
# full.
SUBMIT = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 'queued' end
local pending = nil
if redis.call('EXISTS', KEYS[1]) == 1 then
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == ARGV[1] then pending = info['pending'] end
  end
end
if pending == nil then
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
  pending = 0
end
if redis.call('XLEN', KEYS[1]) - pending >= tonumber(ARGV[2]) then return false end
redis.call('DEL', KEYS[2])
redis.call('SET', KEYS[3], 'open', 'PX', ARGV[4])
local stream = KEYS[1]
if KEYS[4] ~= KEYS[1] and redis.call('EXISTS', KEYS[4]) == 1 then stream = KEYS[4] end
return redis.call('XADD', stream, '*', 'm', ARGV[3])
"""

# KEYS: resp, state. ARGV: mode ("event" or "overflow"), stream_events, ttl_ms, event, is_finished, token.
# Returns 1 appended, 0 refused (the response is not open), -1 full: the caller then appends the slow_consumer
# Finished in "overflow" mode, which only the first of concurrent publishers manages. Idempotent: each publish has
# its own token, kept in its entry; the same publish sent again (after a dropped connection) finds it last (unless
# its reader consumed and deleted it in between: only possible if the first send ran, which a connection closed
# before the send rules out).
PUBLISH = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if last then
  for i = 1, #last[2], 2 do
    if last[2][i] == 'p' and last[2][i + 1] == ARGV[6] then return 1 end
  end
end
if redis.call('GET', KEYS[2]) ~= 'open' then return 0 end
if ARGV[1] == 'event' and redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[2]) then return -1 end
redis.call('XADD', KEYS[1], '*', 'm', ARGV[4], 'p', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if ARGV[1] == 'overflow' then
  redis.call('SET', KEYS[2], 'overflow', 'PX', ARGV[3])
  return 0
end
redis.call('SET', KEYS[2], ARGV[5] == '1' and 'finished' or 'open', 'PX', ARGV[3])
return 1
"""
