-- members: read or change the pool's membership (which backends, their weight,
-- whether they are draining), atomically, bumping its revision on every change.
--
-- KEYS[1]  lb:{pool}:pool          hash: members_rev (the revision), members_seq,
--                                  members_config (the start-up list it came from)
-- KEYS[2]  lb:{pool}:members       hash: backend id -> JSON {url, weight, state}
--                                  (written and read by Python only)
-- KEYS[3]  lb:{pool}:member_order  hash: backend id -> its place in the rotation
-- ARGV[1]  op                      'get'; 'seed' (fill an empty membership);
--                                  'replace' (all of it); 'put' (add or change
--                                  one); 'remove' (one)
-- ARGV[2..] op's arguments         seed, replace: config, id1, json1, id2, json2...
--                                  (in order); put: id, json; remove: id
-- Returns  {rev, config, id1, json1, order1, id2, json2, order2, ...}: the
--          membership after the op; {-1} for 'remove' of an id that is not there.
--
-- Every worker and every balancer host reads the revision on each pick and
-- reloads the membership when it changed, so a change is seen at once. A Redis
-- that lost its keys answers 'get' with revision 0 and nothing: the caller then
-- seeds it from its last known copy.
local op = ARGV[1]

local function snapshot()
    local out = {tonumber(redis.call('HGET', KEYS[1], 'members_rev')) or 0,
                 redis.call('HGET', KEYS[1], 'members_config') or ''}
    local all = redis.call('HGETALL', KEYS[2])
    for i = 1, #all, 2 do
        out[#out + 1] = all[i]
        out[#out + 1] = all[i + 1]
        out[#out + 1] = tonumber(redis.call('HGET', KEYS[3], all[i])) or 0
    end
    return out
end

local function put(id, member)
    if redis.call('HEXISTS', KEYS[3], id) == 0 then
        redis.call('HSET', KEYS[3], id, redis.call('HINCRBY', KEYS[1], 'members_seq', 1))
    end
    redis.call('HSET', KEYS[2], id, member)
end

if op == 'get' then
    return snapshot()
elseif op == 'seed' or op == 'replace' then
    if op == 'replace' or redis.call('EXISTS', KEYS[2]) == 0 then
        redis.call('DEL', KEYS[2], KEYS[3])
        for i = 3, #ARGV, 2 do
            put(ARGV[i], ARGV[i + 1])
        end
        redis.call('HSET', KEYS[1], 'members_config', ARGV[2])
        redis.call('HINCRBY', KEYS[1], 'members_rev', 1)
    end
    return snapshot()
elseif op == 'put' then
    put(ARGV[2], ARGV[3])
    redis.call('HINCRBY', KEYS[1], 'members_rev', 1)
    return snapshot()
elseif op == 'remove' then
    if redis.call('HDEL', KEYS[2], ARGV[2]) == 0 then
        return {-1}
    end
    redis.call('HDEL', KEYS[3], ARGV[2])
    redis.call('HINCRBY', KEYS[1], 'members_rev', 1)
    return snapshot()
end
return redis.error_reply('unknown members op ' .. tostring(op))
