"""The Lua scripts of the Redis store, each run atomically by the server.

Every timestamp comes from the server's ``TIME``; keys are passed in ``KEYS``, except
the per-waiter signal lists, whose names are built from a prefix in ``ARGV``.
"""

#: Shared by the scripts: drop waiters whose deadline passed (they died or stalled),
#: and hand a wake-up to the waiter now at the head of the queue.
QUEUE = """
local function now_us()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function head(queue, alive, now_ms)
    local gone = redis.call('ZRANGEBYSCORE', alive, '-inf', now_ms)
    for _, t in ipairs(gone) do
        redis.call('ZREM', queue, t)
        redis.call('ZREM', alive, t)
    end
    return redis.call('ZRANGE', queue, 0, 0)[1]
end
-- The lock is free and `first` is to take it: it gets `grace` ms to do so, after which
-- it is skipped (dead, or stopped) and loses its place. Returns the ms left.
local function hurry(alive, first, now_ms, grace)
    local deadline = tonumber(redis.call('ZSCORE', alive, first))
    if deadline > now_ms + grace then
        deadline = now_ms + grace
        redis.call('ZADD', alive, deadline, first)
    end
    return deadline - now_ms
end
local function wake(queue, alive, signals, ttl, grace)
    local now_ms = math.floor(now_us() / 1000)
    local first = head(queue, alive, now_ms)
    if first then
        hurry(alive, first, now_ms, tonumber(grace))
        local key = signals .. first
        if redis.call('LLEN', key) == 0 then redis.call('RPUSH', key, '1') end
        redis.call('PEXPIRE', key, ttl)
    end
end
"""

# KEYS: lock, fence, queue, alive. Returns the lease's {fence, acquired, expires}; nil
# if held; {ms} if free but another waiter is first, with the ms it has left to take it.
# A newcomer (not queued) and a queued waiter that is
# not at the head both find the lock taken while anyone waits ahead of them.
ACQUIRE = QUEUE + """
local held = redis.call('HGET', KEYS[1], 'token')
if held then
    if held ~= ARGV[1] then return false end
    -- Our own lease: this is a retry of a call whose reply was lost.
    return redis.call('HMGET', KEYS[1], 'fence', 'acquired_us', 'expires_us')
end
local now = now_us()
local first = head(KEYS[3], KEYS[4], math.floor(now / 1000))
if first and first ~= ARGV[1] then
    return {tostring(hurry(KEYS[4], first, math.floor(now / 1000), tonumber(ARGV[7])))}
end
if first then
    redis.call('ZREM', KEYS[3], ARGV[1])
    redis.call('ZREM', KEYS[4], ARGV[1])
end
local fence = math.max(tonumber(redis.call('GET', KEYS[2]) or '0') + 1, now)
fence = string.format('%.0f', fence)
redis.call('SET', KEYS[2], fence)
local expires = ''
if ARGV[2] ~= '' then expires = string.format('%.0f', now + tonumber(ARGV[2]) * 1000) end
local acquired = string.format('%.0f', now)
redis.call('HSET', KEYS[1], 'name', ARGV[3], 'token', ARGV[1], 'fence', fence,
    'acquired_us', acquired, 'expires_us', expires,
    'host', ARGV[4], 'pid', ARGV[5], 'thread', ARGV[6])
if ARGV[2] ~= '' then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return {fence, acquired, expires}
"""

# KEYS: queue, alive. ARGV: token, patience ms. NX keeps a waiter's place on refresh.
ENQUEUE = QUEUE + """
local now = now_us()
redis.call('ZADD', KEYS[1], 'NX', now, ARGV[1])
redis.call('ZADD', KEYS[2], math.floor(now / 1000) + tonumber(ARGV[2]), ARGV[1])
for _, key in ipairs(KEYS) do
    if redis.call('PTTL', key) < tonumber(ARGV[2]) + 1000 then
        redis.call('PEXPIRE', key, tonumber(ARGV[2]) + 1000)
    end
end
"""

# KEYS: lock, queue, alive. ARGV: token, signal key prefix, signal ttl. A waiter that
# gives up passes the wake-up on, so the queue behind it never stalls.
LEAVE = QUEUE + """
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then wake(KEYS[2], KEYS[3], ARGV[2], ARGV[3], ARGV[4]) end
"""

# KEYS: lock, queue, alive. An expired lease's key is already gone, so "token matches"
# also means "still live".
RELEASE = QUEUE + """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
wake(KEYS[2], KEYS[3], ARGV[2], ARGV[3], ARGV[4])
return 1
"""

FORCE_RELEASE = QUEUE + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('DEL', KEYS[1])
wake(KEYS[2], KEYS[3], ARGV[2], ARGV[3], ARGV[4])
return 1
"""

EXTEND = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return false end
local expires = ''
if ARGV[2] ~= '' then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
    expires = string.format('%.0f', now + tonumber(ARGV[2]) * 1000)
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
    redis.call('PERSIST', KEYS[1])
end
redis.call('HSET', KEYS[1], 'expires_us', expires)
return redis.call('HGETALL', KEYS[1])
"""
