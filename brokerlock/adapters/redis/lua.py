"""The Lua scripts of the Redis store, each run atomically by the server.

Every timestamp comes from the server's ``TIME``; keys are passed in ``KEYS``, except
the per-waiter signal lists, whose names are built from a prefix in ``ARGV``, and the
presence channels (see ``redis.presence``), which ``PUBSUB NUMSUB`` counts.

A queue member is ``<token>|<presence channel>``, so a script can tell that a waiter
died without another key.

A released name leaves no key behind: its lease hash is deleted, its queue
keys vanish with their last member (or expire), and fences come from one counter for
the whole store, ``max(last fence + 1, server time in µs)``, so no per-name key is
needed to keep a name's fences growing. A per-name fence key that an earlier version
left is honoured once and dropped.
"""

#: Shared by the scripts: liveness, the queue's head (dropping dead and stalled
#: waiters), and a wake-up for the waiter whose turn has come.
QUEUE = """
local function now_us()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function alive(presence)
    if not presence or presence == '' then return true end
    return redis.call('PUBSUB', 'NUMSUB', presence)[2] > 0
end
local function token_of(member) return string.match(member, '^[^|]*') end
-- The next fence of the store (KEYS: its counter, and the name's key of an earlier
-- version, dropped once read).
local function next_fence(store_key, legacy_key, now)
    local legacy = redis.call('GET', legacy_key)
    local fence = math.max(tonumber(redis.call('GET', store_key) or '0') + 1, now)
    if legacy then
        fence = math.max(fence, tonumber(legacy) + 1)
        redis.call('DEL', legacy_key)
    end
    fence = string.format('%.0f', fence)
    redis.call('SET', store_key, fence)
    return fence
end
local function drop(queue, waiting, member)
    redis.call('ZREM', queue, member)
    redis.call('ZREM', waiting, member)
    redis.call('HDEL', queue .. '|want', member)
end
-- The first live waiter and the one after it (either may be nil).
local function head(queue, waiting, now_ms)
    if redis.call('EXISTS', queue) == 0 then return nil, nil end
    local gone = redis.call('ZRANGEBYSCORE', waiting, '-inf', now_ms)
    for _, m in ipairs(gone) do drop(queue, waiting, m) end
    while true do
        local two = redis.call('ZRANGE', queue, 0, 1)
        if not two[1] then return nil, nil end
        if alive(string.sub(two[1], string.len(token_of(two[1])) + 2)) then
            return two[1], two[2]
        end
        drop(queue, waiting, two[1])
    end
end
-- The lock is free and `first` is to take it: it gets `grace` ms to do so, after which
-- it is skipped (stopped) and loses its place. Returns the ms left.
local function hurry(waiting, first, now_ms, grace)
    local deadline = tonumber(redis.call('ZSCORE', waiting, first))
    if deadline > now_ms + grace then
        deadline = now_ms + grace
        redis.call('ZADD', waiting, deadline, first)
    end
    return deadline - now_ms
end
-- A wake-up ('1': look) on `member`'s list, unless something (a grant) is there.
local function ring(signals, member, ttl)
    local key = signals .. token_of(member)
    if redis.call('LLEN', key) == 0 then redis.call('RPUSH', key, '1') end
    redis.call('PEXPIRE', key, ttl)
end
-- The first two live waiters look: the lock changed hands, or the one ahead of them
-- left, and nothing else would tell them when the lease they wait for may end (it
-- expires, or its holder dies, and nobody pushes). Waiters further back are told when
-- they move up to second; all look at least every safety net.
local function nudge(queue, waiting, signals, ttl)
    if redis.call('EXISTS', queue) == 0 then return end
    local first, second = head(queue, waiting, math.floor(now_us() / 1000))
    if first then ring(signals, first, ttl) end
    if second then ring(signals, second, ttl) end
end
local function wake(queue, waiting, signals, ttl, grace)
    if redis.call('EXISTS', queue) == 0 then return end
    local now_ms = math.floor(now_us() / 1000)
    local first, second = head(queue, waiting, now_ms)
    if first then
        hurry(waiting, first, now_ms, tonumber(grace))
        ring(signals, first, ttl)
        -- The second looks too: it takes over if the first stalled past its grace.
        if second then ring(signals, second, ttl) end
    end
end
-- Hand the free lock to the first live waiter that left its request, in this script,
-- and push the lease onto its wake-up list; else wake it (or nobody) as before.
local function grant(lock, fence_key, queue, waiting, signals, ttl, grace, name, fences)
    if redis.call('EXISTS', queue) == 0 then return end
    local now = now_us()
    local first = head(queue, waiting, math.floor(now / 1000))
    if not first then return end
    local want = redis.call('HGET', queue .. '|want', first)
    if not want then return wake(queue, waiting, signals, ttl, grace) end
    local w = cjson.decode(want)
    local token = token_of(first)
    local fence = next_fence(fences, fence_key, now)
    local expires = ''
    if w[1] ~= '' then expires = string.format('%.0f', now + tonumber(w[1]) * 1000) end
    local acquired = string.format('%.0f', now)
    redis.call('HSET', lock, 'name', name, 'token', token, 'fence', fence,
        'acquired_us', acquired, 'expires_us', expires, 'host', w[2], 'pid', w[3],
        'thread', w[4], 'presence', string.sub(first, string.len(token) + 2))
    if w[1] ~= '' then redis.call('PEXPIRE', lock, w[1]) end
    drop(queue, waiting, first)
    local key = signals .. token
    redis.call('DEL', key)
    redis.call('RPUSH', key, fence .. ' ' .. acquired .. ' ' .. expires)
    redis.call('PEXPIRE', key, ttl)
    nudge(queue, waiting, signals, ttl)
end
"""

# KEYS: lock, fence, queue, waiting, our wake-up list, the store's fences. ARGV: token, ttl ms, name, host,
# pid, thread, grace ms, presence, member, patience ms, queued ('1': wait in the queue if
# not taken), the request for a direct hand-over (JSON: ttl ms, host, pid, thread),
# signal key prefix, signal ttl.
# Returns the lease's {fence, acquired, expires} (strings), or four integers:
# {0, ms left on the live holder's lease (-1: no ttl), position, now} when held,
# {1, ms the waiter ahead has left to take it, position, now} when another's turn,
# {2, 0, 0, now} when our own presence is gone. Position: 1 first in line, 2 second, 3
# later (or not queued); now: the server's clock in ms, which a waiter uses to tell a
# grant that ran out before it read it. A newcomer never takes the lock while anyone
# lives in the queue.
ACQUIRE = QUEUE + """
local now = now_us()
local now_ms = math.floor(now / 1000)
local member = ARGV[9]
local function queue_up()
    if ARGV[11] ~= '1' then return 3 end
    local patience = tonumber(ARGV[10])
    if redis.call('ZADD', KEYS[3], 'NX', now, member) == 1 then
        -- (Re)joining: a grant leaves the queue and pushes the lease in one script, so a
        -- lease on our list now is one that ended before we popped it (else the lock
        -- would be ours, above). Left there, our next BLPOP would take it as the lock.
        redis.call('DEL', KEYS[5])
    end
    redis.call('ZADD', KEYS[4], now_ms + patience, member)
    local want = KEYS[3] .. '|want'
    redis.call('HSET', want, member, ARGV[12])
    for _, k in ipairs({KEYS[3], KEYS[4], want}) do
        if redis.call('PTTL', k) < patience + 1000 then
            redis.call('PEXPIRE', k, patience + 1000)
        end
    end
    local first, second = head(KEYS[3], KEYS[4], now_ms)
    if first == member then return 1 end
    if second == member then return 2 end
    return 3
end
local held = redis.call('HMGET', KEYS[1], 'token', 'presence')
if held[1] then
    if held[1] == ARGV[1] then
        -- Our own lease: this is a retry of a call whose reply was lost.
        return redis.call('HMGET', KEYS[1], 'fence', 'acquired_us', 'expires_us')
    end
    if alive(held[2]) then
        local position = queue_up()
        return {0, redis.call('PTTL', KEYS[1]), position, now_ms}
    end
end
if not alive(ARGV[8]) then return {2, 0, 0, now_ms} end
local first = head(KEYS[3], KEYS[4], now_ms)
if first and first ~= member then
    local position = queue_up()
    -- Free, and `first`'s turn: nothing may have told it (a holder that died, a lease
    -- that ran out), so wake it; it has `grace` ms to take the lock.
    ring(ARGV[13], first, ARGV[14])
    return {1, hurry(KEYS[4], first, now_ms, tonumber(ARGV[7])), position, now_ms}
end
local fence = next_fence(KEYS[6], KEYS[2], now)
local expires = ''
if ARGV[2] ~= '' then expires = string.format('%.0f', now + tonumber(ARGV[2]) * 1000) end
local acquired = string.format('%.0f', now)
if held[1] then redis.call('DEL', KEYS[1]) end
redis.call('HSET', KEYS[1], 'name', ARGV[3], 'token', ARGV[1], 'fence', fence,
    'acquired_us', acquired, 'expires_us', expires,
    'host', ARGV[4], 'pid', ARGV[5], 'thread', ARGV[6], 'presence', ARGV[8])
if ARGV[2] ~= '' then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if first then
    -- We took it from the head of the queue: the next two learn of the new lease.
    drop(KEYS[3], KEYS[4], member)
    nudge(KEYS[3], KEYS[4], ARGV[13], ARGV[14])
end
return {fence, acquired, expires}
"""

# KEYS: lock, fence, queue, waiting, the store's fences. ARGV: member, signal key
# prefix, signal ttl, grace, name. A waiter that gives up passes the lock or the wake-up
# on, so the queue behind it never stalls; one that was handed the lock as it gave up
# releases it.
LEAVE = QUEUE + """
drop(KEYS[3], KEYS[4], ARGV[1])
local held = redis.call('HMGET', KEYS[1], 'token', 'presence')
if held[1] == token_of(ARGV[1]) then redis.call('DEL', KEYS[1]); held = {} end
if not held[1] or not alive(held[2]) then
    grant(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[2], ARGV[3], ARGV[4], ARGV[5], KEYS[5])
else
    -- Still held: the waiters that moved up learn when the lease may end.
    nudge(KEYS[3], KEYS[4], ARGV[2], ARGV[3])
end
"""

# KEYS: lock, fence, queue, waiting, the store's fences. ARGV: token, signal key
# prefix, signal ttl, grace, name. An expired lease's key is already gone, so "token matches" also means
# "unexpired"; a lease whose presence ended was free for the taking meanwhile, so it
# counts as lost too. The first live waiter gets the lock in this script.
RELEASE = QUEUE + """
local held = redis.call('HMGET', KEYS[1], 'token', 'presence')
if held[1] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
grant(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[2], ARGV[3], ARGV[4], ARGV[5], KEYS[5])
if alive(held[2]) then return 1 end
return 0
"""

FORCE_RELEASE = QUEUE + """
local held = redis.call('HMGET', KEYS[1], 'token', 'presence')
if not held[1] then return 0 end
redis.call('DEL', KEYS[1])
wake(KEYS[2], KEYS[3], ARGV[2], ARGV[3], ARGV[4])
if alive(held[2]) then return 1 end
return 0
"""

_ALIVE = """
local function alive(presence)
    if not presence or presence == '' then return true end
    return redis.call('PUBSUB', 'NUMSUB', presence)[2] > 0
end
"""

EXTEND = _ALIVE + """
local held = redis.call('HMGET', KEYS[1], 'token', 'presence')
if held[1] ~= ARGV[1] or not alive(held[2]) then return false end
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

# KEYS: lock. The lease if its holder lives, else nothing.
READ = _ALIVE + """
if not alive(redis.call('HGET', KEYS[1], 'presence')) then return {} end
return redis.call('HGETALL', KEYS[1])
"""
