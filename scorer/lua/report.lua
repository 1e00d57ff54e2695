-- report: record the outcome of one upstream attempt on its backend.
--
-- KEYS[1]  lb:{pool}:b:<backend id>   hash of the backend's counters
-- ARGV[1]  now          caller's clock, seconds since the epoch (float)
-- ARGV[2]  latency_ms   time to the response head, or to the failure (float)
-- ARGV[3]  outcome      'ok' (any HTTP answer below 500), 'http_5xx',
--                       'connect', 'timeout' or 'protocol'
-- ARGV[4]  status       HTTP status, or 0 when there was none
-- Returns  the backend's request count after this report.
--
-- The time comes from the caller, never from Redis TIME, so tests can drive a
-- fake clock and the same script runs on fakeredis.
local now = ARGV[1]
local latency_ms = ARGV[2]
local outcome = ARGV[3]
local status = ARGV[4]

redis.call('HINCRBY', KEYS[1], 'outcome:' .. outcome, 1)
redis.call('HSET', KEYS[1],
    'last_seen', now,
    'last_latency_ms', latency_ms,
    'last_outcome', outcome,
    'last_status', status)
return redis.call('HINCRBY', KEYS[1], 'requests', 1)
