-- checker: take or keep the pool's health-checker lock.
--
-- KEYS[1]  lb:{pool}:checker   the lock: the holder's id, expiring after ttl_ms
-- ARGV[1]  owner               this checker's id (host:pid:random)
-- ARGV[2]  ttl_ms              how long the lock outlives its last renewal
-- Returns  1 when `owner` holds the lock now (taken or renewed), else 0.
--
-- Exactly one checker per pool, whatever the number of workers and balancer
-- hosts: the holder renews the lock every interval; if it dies, the lock
-- expires (Redis's own clock) and the next worker to ask takes over.
local owner = ARGV[1]
local ttl_ms = tonumber(ARGV[2])

local holder = redis.call('GET', KEYS[1])
if holder == owner then
    redis.call('PEXPIRE', KEYS[1], ttl_ms)
    return 1
end
if not holder then
    redis.call('SET', KEYS[1], owner, 'PX', ttl_ms)
    return 1
end
return 0
