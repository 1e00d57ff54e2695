-- members: read or change the pool's membership (which backends, their weight,
-- whether they are draining), atomically, bumping its revision on every change.
--
-- KEYS[1]  lb:{pool}:pool          hash: members_rev (the revision), members_epoch
--                                  (who seeded it), members_seq, members_config (the
--                                  start-up list it came from)
-- KEYS[2]  lb:{pool}:members       hash: backend id -> JSON {url, weight, state}
--                                  (written and read by Python only)
-- KEYS[3]  lb:{pool}:member_order  hash: backend id -> its place in the rotation
-- ARGV[1]  op                      'get'; 'offer' (a caller's copy: taken when Redis has
--                                  none, or an older one); 'replace' (all of it);
--                                  'put' (add or change one); 'remove' (one)
-- ARGV[2..] op's arguments         offer:   rev, epoch, config, id1, json1, id2, json2...
--                                  replace: epoch, config, id1, json1, ...
--                                  put:     expected version, id, json
--                                  remove:  expected version, id
-- Returns  {rev, epoch, config, id1, json1, order1, id2, json2, order2, ...}: the
--          membership after the op; {-1} for 'remove' of an id that is not there;
--          {-2} for 'put' or 'remove' when the version is no longer the expected one
--          (another change came first: read again and decide again); {-3} for a
--          'remove' that would leave the pool empty.
--
-- The version is "<rev>:<epoch>". Every worker and every balancer host passes its
-- version on each pick (pick.lua) and reloads the membership when it differs, so
-- a change is seen at once. A Redis that lost its keys answers 'get' with
-- revision 0 and nothing: the caller then offers its newest copy with that copy's
-- revision, so the count goes on where it was. A balancer whose copy is newer than
-- what Redis holds (a stale copy offered first after a restart) offers its own,
-- which wins: a removal it saw cannot come back. The epoch, new at every offer
-- and replace, tells apart two copies that reached the same revision by
-- different changes.
local op = ARGV[1]

local function version()
    return (redis.call('HGET', KEYS[1], 'members_rev') or '0') .. ':' ..
        (redis.call('HGET', KEYS[1], 'members_epoch') or '')
end

local function snapshot()
    local out = {tonumber(redis.call('HGET', KEYS[1], 'members_rev')) or 0,
                 redis.call('HGET', KEYS[1], 'members_epoch') or '',
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

-- Replace the whole membership with ARGV[first..] (id, json pairs, in order).
local function fill(first, rev, epoch, config)
    redis.call('DEL', KEYS[2], KEYS[3])
    for i = first, #ARGV, 2 do
        put(ARGV[i], ARGV[i + 1])
    end
    redis.call('HSET', KEYS[1], 'members_rev', rev, 'members_epoch', epoch,
               'members_config', config)
end

local stored_rev = tonumber(redis.call('HGET', KEYS[1], 'members_rev')) or 0
local empty = redis.call('EXISTS', KEYS[2]) == 0

if op == 'get' then
    return snapshot()
elseif op == 'offer' then
    local rev = tonumber(ARGV[2])
    if empty or stored_rev < rev then
        fill(5, math.max(rev, 1), ARGV[3], ARGV[4])
    end
    return snapshot()
elseif op == 'replace' then
    fill(4, stored_rev + 1, ARGV[2], ARGV[3])
    return snapshot()
end

if ARGV[2] ~= version() then
    return {-2}
end
if op == 'put' then
    put(ARGV[3], ARGV[4])
elseif op == 'remove' then
    if redis.call('HEXISTS', KEYS[2], ARGV[3]) == 0 then
        return {-1}
    end
    if redis.call('HLEN', KEYS[2]) <= 1 then
        return {-3}
    end
    redis.call('HDEL', KEYS[2], ARGV[3])
    redis.call('HDEL', KEYS[3], ARGV[3])
else
    return redis.error_reply('unknown members op ' .. tostring(op))
end
redis.call('HINCRBY', KEYS[1], 'members_rev', 1)
return snapshot()
