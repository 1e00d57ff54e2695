-- pick: advance the pool's shared round-robin cursor and return the next slot.
--
-- KEYS[1]  lb:{pool}:cursor   the cursor: index of the slot picked last
-- ARGV[1]  n                  number of backends in the pool (>= 1)
-- Returns  the 0-based index of the picked backend, in the caller's order.
--
-- The cursor is stored modulo n, so it never grows and a change in n keeps it
-- valid. Running as one script makes read-advance-write atomic across every
-- worker and every balancer host that shares this Redis.
local n = tonumber(ARGV[1])

local last = tonumber(redis.call('GET', KEYS[1]) or '-1')
local picked = (last + 1) % n
redis.call('SET', KEYS[1], picked)
return picked
