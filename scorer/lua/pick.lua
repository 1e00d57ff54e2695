-- pick: advance the pool's shared round-robin cursor past blocked backends.
--
-- KEYS[1]      lb:{pool}:pool       hash: cursor, panic_picks (and report's fields)
-- KEYS[2..n+1] lb:{pool}:b:<id>     each backend's hash, in the pool's order
-- ARGV[1]  now             caller's clock, seconds since the epoch
-- ARGV[2]  honour_blocks   1 (strategy `scored`) or 0 (`round_robin`: ignore blocks)
-- Returns  {index, panic}: the 0-based index of the picked backend, and 1 when
--          every backend was blocked and the lowest score was taken instead.
--
-- Rules: the cursor moves one slot at a time. A blocked backend it passes loses
-- one turn and is skipped. A block ends when its turns are used up *and* its
-- minimum end time (block_until) has passed; the backend is then picked at once.
-- When every backend is blocked the request still goes somewhere: to the
-- lowest score, ties broken in cursor order (panic mode), and it is counted.
-- The cursor is stored modulo n, so a change in n keeps it valid.
local now = tonumber(ARGV[1])
local honour_blocks = ARGV[2] == '1'

local n = #KEYS - 1
local last = tonumber(redis.call('HGET', KEYS[1], 'cursor')) or -1

local function take(index, panic)
    redis.call('HSET', KEYS[1], 'cursor', index)
    if panic == 1 then
        redis.call('HINCRBY', KEYS[1], 'panic_picks', 1)
    end
    return {index, panic}
end

if not honour_blocks then
    return take((last + 1) % n, 0)
end

for step = 1, n do
    local index = (last + step) % n
    local key = KEYS[index + 2]
    local block = redis.call('HMGET', key, 'blocked_turns', 'block_until')
    local turns = tonumber(block[1]) or 0
    local block_until = tonumber(block[2]) or 0
    if turns <= 0 and now >= block_until then
        return take(index, 0)
    end
    if turns > 0 then
        redis.call('HSET', key, 'blocked_turns', turns - 1)
    end
end

-- Panic: all blocked. The cursor's own order breaks ties, so equals still rotate.
local best, best_score = nil, nil
for step = 1, n do
    local index = (last + step) % n
    local score = tonumber(redis.call('HGET', KEYS[index + 2], 'score')) or 0
    if best == nil or score < best_score then
        best, best_score = index, score
    end
end
return take(best, 1)
