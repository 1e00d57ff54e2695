-- report: score one upstream attempt, or one health check, and block its backend
-- when the score says so. This file is the scorer: every rule that turns outcomes
-- into scores, blocks and trials.
-- Prelude: lib.lua (end_block), prepended by load_lua.
--
-- KEYS[1]      lb:{pool}:pool      hash: the pool's latency averages (avg_sum,
--                                  avg_weight; all_sum, all_weight), error rate
--                                  (err_sum, err_weight), updated_at, its checks'
--                                  latency average (check_sum, check_weight,
--                                  check_at), blocks_deferred, block_swaps
-- KEYS[2..n+1] lb:{pool}:b:<id>    each backend's hash, in the pool's order
-- ARGV[1]  now                  caller's clock, seconds since the epoch
-- ARGV[2]  index                0-based index of the reported backend in KEYS[2..]
-- ARGV[3]  latency_ms           time to the response head, or to the failure
-- ARGV[4]  outcome              'ok' (any answer below 500), 'http_5xx',
--                               'connect', 'timeout' or 'protocol'
-- ARGV[5]  status               HTTP status, 0 when there was none
-- ARGV[6]  may_block            1 (strategy `scored`) or 0 (keep scores, never block)
-- ARGV[7]  is_check             1 for an active health check's result, 0 for traffic
-- ARGV[8]  request_timeout      ARGV[8..37]: the LB_* settings of the same name,
--                               in the order of their rows in apps/config/table.py
-- ARGV[9]  score_min
-- ARGV[10] score_max
-- ARGV[11] score_threshold
-- ARGV[12] score_half_life_s
-- ARGV[13] avg_tau_s
-- ARGV[14] latency_tau_s
-- ARGV[15] latency_min_samples
-- ARGV[16] latency_ratio
-- ARGV[17] latency_slack_ms
-- ARGV[18] slow_points
-- ARGV[19] slow_max_points
-- ARGV[20] fast_bonus
-- ARGV[21] error_points
-- ARGV[22] error_latency_factor
-- ARGV[23] error_tau_s
-- ARGV[24] error_quiet
-- ARGV[25] success_bonus
-- ARGV[26] relative_credit
-- ARGV[27] block_turns
-- ARGV[28] block_turns_per_point
-- ARGV[29] block_min_s
-- ARGV[30] block_max_s
-- ARGV[31] reoffend_s
-- ARGV[32] check_rise
-- ARGV[33] check_fail_points
-- ARGV[34] trial_error_floor
-- ARGV[35] trial_max
-- ARGV[36] max_blocked_share
-- ARGV[37] min_unblocked
-- Returns  {score, blocked_turns}: the score after this report (as a string,
--          Redis would truncate a number) and the turns of a block it started, or 0.
--
-- Averages are exponentially decayed means: sum and weight both fade by
-- e^(-dt/tau) and each request adds its value and a weight of 1. They follow
-- time, not request count, and several reports at the same instant all count.
-- The time comes from the caller (never Redis TIME); a step backwards, from
-- hosts whose clocks differ, counts as zero.
local now = tonumber(ARGV[1])
local index = tonumber(ARGV[2])
local latency_ms = tonumber(ARGV[3])
local outcome = ARGV[4]
local status = ARGV[5]
local may_block = ARGV[6] == '1'
local is_check = ARGV[7] == '1'
local request_timeout = tonumber(ARGV[8])
local score_min = tonumber(ARGV[9])
local score_max = tonumber(ARGV[10])
local score_threshold = tonumber(ARGV[11])
local score_half_life_s = tonumber(ARGV[12])
local avg_tau_s = tonumber(ARGV[13])
local latency_tau_s = tonumber(ARGV[14])
local latency_min_samples = tonumber(ARGV[15])
local latency_ratio = tonumber(ARGV[16])
local latency_slack_ms = tonumber(ARGV[17])
local slow_points = tonumber(ARGV[18])
local slow_max_points = tonumber(ARGV[19])
local fast_bonus = tonumber(ARGV[20])
local error_points = tonumber(ARGV[21])
local error_latency_factor = tonumber(ARGV[22])
local error_tau_s = tonumber(ARGV[23])
local error_quiet = tonumber(ARGV[24])
local success_bonus = tonumber(ARGV[25])
local relative_credit = tonumber(ARGV[26])
local block_turns = tonumber(ARGV[27])
local block_turns_per_point = tonumber(ARGV[28])
local block_min_s = tonumber(ARGV[29])
local block_max_s = tonumber(ARGV[30])
local reoffend_s = tonumber(ARGV[31])
local check_rise = tonumber(ARGV[32])
local check_fail_points = tonumber(ARGV[33])
local trial_error_floor = tonumber(ARGV[34])
local trial_max = tonumber(ARGV[35])
local max_blocked_share = tonumber(ARGV[36])
local min_unblocked = tonumber(ARGV[37])

local pool_key = KEYS[1]
local key = KEYS[index + 2]
local failed = outcome ~= 'ok'

local function num(value) return tonumber(value) or 0 end
local function fade(dt, tau) return math.exp(-dt / tau) end
-- Blocked from report.lua's block until pick.lua finds it over.
local function is_blocked(backend_key)
    return redis.call('HGET', backend_key, 'in_block') == '1'
end
local function clamp(value) return math.min(math.max(value, score_min), score_max) end
local function ratio(sum, weight) return num(weight) > 0 and num(sum) / num(weight) or 0 end
-- Slow against an average: past both the ratio and the slack. The one bar for
-- requests, trials and health checks alike.
local function is_slow(latency, average)
    return average > 0 and latency > math.max(average * latency_ratio, average + latency_slack_ms)
end

-- Whether a passing check is slow against the other backends' passing checks, not
-- against traffic: a /health that pings a database may be slower than cached
-- traffic everywhere. Leave-one-out: the pool's average holds every backend's
-- checks and this backend's its own (both fading with avg_tau_s), so the others'
-- are the difference; a slow backend's own checks cannot pull its bar up. While
-- the others' checks weigh less than latency_min_samples (and 1), as with no
-- other backend, there is nothing to compare with: never slow. Adds this check
-- to both averages.
local function judge_check(own_sum, own_weight, own_at)
    local p = redis.call('HMGET', pool_key, 'check_sum', 'check_weight', 'check_at')
    local pool_fade = fade(math.max(0, now - num(p[3])), avg_tau_s)
    local own_fade = fade(math.max(0, now - num(own_at)), avg_tau_s)
    local pool_sum, pool_weight = num(p[1]) * pool_fade, num(p[2]) * pool_fade
    own_sum, own_weight = num(own_sum) * own_fade, num(own_weight) * own_fade
    local others_weight = pool_weight - own_weight
    local slow = others_weight >= math.max(latency_min_samples, 1)
        and is_slow(latency_ms, math.max(0, pool_sum - own_sum) / others_weight)
    redis.call('HSET', pool_key, 'check_sum', pool_sum + latency_ms,
               'check_weight', pool_weight + 1, 'check_at', math.max(num(p[3]), now))
    redis.call('HSET', key, 'check_lat_sum', own_sum + latency_ms,
               'check_lat_weight', own_weight + 1, 'check_at', math.max(num(own_at), now))
    return slow
end

-- Trials in a row a blocked backend must pass: its recent error rate over the
-- pool's (at least trial_error_floor), rounded up, within [1, trial_max]. One
-- for a backend erring no more than the pool; more the more it errs.
local function trials_needed(error_rate, pool_error_rate)
    local times = error_rate / math.max(pool_error_rate, trial_error_floor)
    return math.min(trial_max, math.max(1, math.ceil(times - 1e-9)))
end

-- A trial's answer (a request pick.lua sent a blocked backend whose checks
-- passed), judged like traffic: failed, or slow against the pool's yardstick,
-- it fails, and the block stays until checks pass again. A pass short of
-- trials_needed offers the next trial at once; the last ends the block, even an
-- escalated one, with a slow start. Returns whether the block ended.
local function judge_trial(sample, yardstick, error_rate, pool_error_rate)
    if failed or is_slow(sample, yardstick) then
        redis.call('HSET', key, 'trial', 0, 'trial_streak', 0, 'check_ok_streak', 0)
        redis.call('HINCRBY', key, 'trials_failed', 1)
        return false
    end
    redis.call('HINCRBY', key, 'trials_passed', 1)
    local passed = num(redis.call('HGET', key, 'trial_streak')) + 1
    if passed < trials_needed(error_rate, pool_error_rate) then
        redis.call('HSET', key, 'trial', 1, 'trial_streak', passed)
        return false
    end
    end_block(key, now)
    return true
end

local score, smoothed, yardstick, error_rate, blocked_now
if is_check then
    -- A health check's result. A failure counts against the backend like a
    -- failed request (check_fail_points and its error rate), even with no
    -- traffic; a pass earns nothing, but check_rise passes in a row offer a
    -- blocked backend a trial: pick.lua sends it one request (half-open). A
    -- pass slow against the other backends' checks is recorded as 'slow' and
    -- breaks the row, as "in a row" means: it neither costs nor earns points.
    local c = redis.call('HMGET', key, 'score', 'updated_at', 'err_sum', 'err_weight',
                         'check_ok_streak', 'in_block', 'trial', 'trial_at', 'lat_sum',
                         'lat_weight', 'check_lat_sum', 'check_lat_weight', 'check_at')
    local updated_at = num(c[2])
    local dt = math.max(0, now - updated_at)
    local err_fade = fade(dt, error_tau_s)
    local err_sum, err_weight = num(c[3]) * err_fade, num(c[4]) * err_fade
    local streak = num(c[5])
    blocked_now = c[6] == '1'
    score = num(c[1]) * 0.5 ^ (dt / score_half_life_s)
    local check_outcome = outcome
    if failed then
        score = clamp(score + check_fail_points)
        err_sum, err_weight, streak = err_sum + 1, err_weight + 1, 0
    elseif judge_check(c[11], c[12], c[13]) then
        check_outcome, streak = 'slow', 0
    else
        streak = streak + 1
        local trial_stale = c[7] == '2' and now - num(c[8]) > request_timeout
        if blocked_now and streak >= check_rise and (c[7] ~= '2' or trial_stale) then
            redis.call('HSET', key, 'trial', 1)
        end
    end
    redis.call('HSET', key, 'score', score, 'updated_at', math.max(updated_at, now),
               'err_sum', err_sum, 'err_weight', err_weight, 'check_ok_streak', streak,
               'last_check', now, 'last_check_outcome', check_outcome)
    redis.call('HINCRBY', key, failed and 'checks_failed' or 'checks_passed', 1)
    if not failed then
        return {tostring(score), 0}
    end
    local p = redis.call('HMGET', pool_key, 'all_sum', 'all_weight')
    smoothed, yardstick = ratio(c[9], c[10]), ratio(p[1], p[2])
    error_rate = err_weight > 0 and err_sum / err_weight or 0
else
    -- 1. The pool's yardsticks. `avg`: its latency over successful requests,
    --    which prices a failure (below). `yardstick`: its latency over every
    --    request as entered, failures at their price, which each backend's
    --    smoothed latency is judged against: a backend failing and answering as
    --    fast as the pool's average breaks even. And the pool's error rate.
    local p = redis.call('HMGET', pool_key, 'avg_sum', 'avg_weight', 'all_sum', 'all_weight',
                         'err_sum', 'err_weight', 'updated_at')
    local pool_dt = math.max(0, now - num(p[7]))
    local avg_fade, pool_err_fade = fade(pool_dt, avg_tau_s), fade(pool_dt, error_tau_s)
    local avg_sum, avg_weight = num(p[1]) * avg_fade, num(p[2]) * avg_fade
    if not failed then
        avg_sum, avg_weight = avg_sum + latency_ms, avg_weight + 1
    end
    local avg = avg_weight > 0 and avg_sum / avg_weight or latency_ms

    -- 2. What this request counts as: its latency, or for a failure at least
    --    error_latency_factor x max(avg, slack), so a fast error never looks fast.
    local sample = latency_ms
    if failed then
        sample = math.max(latency_ms, error_latency_factor * math.max(avg, latency_slack_ms))
    end
    local all_sum = num(p[3]) * avg_fade + sample
    local all_weight = num(p[4]) * avg_fade + 1
    yardstick = all_sum / all_weight
    local pool_err_sum = num(p[5]) * pool_err_fade + (failed and 1 or 0)
    local pool_err_weight = num(p[6]) * pool_err_fade + 1
    local pool_error_rate = pool_err_sum / pool_err_weight
    redis.call('HSET', pool_key, 'avg_sum', avg_sum, 'avg_weight', avg_weight,
               'all_sum', all_sum, 'all_weight', all_weight,
               'err_sum', pool_err_sum, 'err_weight', pool_err_weight,
               'updated_at', math.max(num(p[7]), now))

    -- 3. The backend's smoothed latency and recent error rate.
    local b = redis.call('HMGET', key, 'score', 'updated_at', 'lat_sum', 'lat_weight',
                         'err_sum', 'err_weight', 'log_lat_sum', 'log_sq_sum', 'log_weight')
    local updated_at = num(b[2])
    local dt = math.max(0, now - updated_at)
    local lat_fade, err_fade = fade(dt, latency_tau_s), fade(dt, error_tau_s)
    local lat_sum = num(b[3]) * lat_fade + sample
    -- Its mean in logs too, and their spread (read by pick.lua for shares): a
    -- geometric mean, which a rare spike moves little, and how sure it is. A 4xx
    -- stays out of it: it says nothing of how fast the backend serves, and a
    -- backend answering every request with a fast 404 must not set the bar that
    -- cuts every healthy backend's share.
    local log_lat_sum, log_sq_sum = num(b[7]) * lat_fade, num(b[8]) * lat_fade
    local log_weight = num(b[9]) * lat_fade
    if failed or (tonumber(status) or 0) < 400 then
        local log_sample = math.log(math.max(sample, 0.01))
        log_lat_sum, log_sq_sum = log_lat_sum + log_sample, log_sq_sum + log_sample ^ 2
        log_weight = log_weight + 1
    end
    local lat_weight = num(b[4]) * lat_fade + 1
    local err_sum = num(b[5]) * err_fade + (failed and 1 or 0)
    local err_weight = num(b[6]) * err_fade + 1
    smoothed = lat_sum / lat_weight
    error_rate = err_sum / err_weight

    -- 4. Points. The old score first fades toward 0 with time. (A blocked
    --    backend keeps scoring, from requests in flight or panic picks, so panic
    --    mode can rank it; pick.lua zeroes the score when the block ends.)
    blocked_now = is_blocked(key)
    score = num(b[1]) * 0.5 ^ (dt / score_half_life_s)
    if failed then
        score = score + error_points
    else
        -- A success earns what it is worth against the pool: with pool error rate
        -- r, error_points x r/(1-r), so a backend failing as often as the pool
        -- breaks even and a better one gains. Nothing in a healthy pool (r = 0).
        score = score - relative_credit * error_points * pool_error_rate / (1 - pool_error_rate)
        if error_rate < error_quiet then
            score = score - success_bonus
        end
    end
    if lat_weight >= latency_min_samples and yardstick > 0 then
        -- Slower means past both the ratio and the slack, for the smoothed latency
        -- (a trend, not noise) and for this request too, so a lone spike is paid
        -- for once, not on every request until the smoothing forgets it.
        if is_slow(smoothed, yardstick) and is_slow(sample, yardstick) then
            score = score + math.min(slow_points * (smoothed / yardstick - 1), slow_max_points)
        elseif not failed and smoothed < yardstick then
            score = score - fast_bonus
        end
    end
    score = clamp(score)

    redis.call('HSET', key, 'score', score, 'updated_at', math.max(updated_at, now),
               'lat_sum', lat_sum, 'lat_weight', lat_weight, 'log_lat_sum', log_lat_sum,
               'log_sq_sum', log_sq_sum, 'log_weight', log_weight,
               'err_sum', err_sum, 'err_weight', err_weight,
               'last_seen', now, 'last_latency_ms', latency_ms,
               'last_outcome', outcome, 'last_status', status)
    redis.call('HINCRBY', key, 'requests', 1)
    redis.call('HINCRBY', key, 'outcome:' .. outcome, 1)

    -- The answer to a trial (trial = 2) is judged like traffic, above.
    if blocked_now and redis.call('HGET', key, 'trial') == '2'
            and judge_trial(sample, yardstick, error_rate, pool_error_rate) then
        return {tostring(score), 0}
    end
end

-- 5. Block: at the threshold, for turns growing with the excess, at least
--    block_min_s; twice as long (capped) for a backend that reoffends soon
--    after its last block. Never beyond the pool's cap on blocked backends.
if not may_block or score < score_threshold or blocked_now then
    return {tostring(score), 0}
end
local n = #KEYS - 1
local blocked = 0
for i = 2, n + 1 do
    if is_blocked(KEYS[i]) then blocked = blocked + 1 end
end
local cap = math.min(math.floor(max_blocked_share * n + 1e-9), n - min_unblocked)
if blocked >= cap then
    -- The cap is full. If a blocked backend is doing better than this one (a
    -- lower smoothed latency, failures priced in), end its block early and
    -- block this one instead: the backends left serving must be the best.
    local best_key, best_smoothed = nil, smoothed
    for i = 2, n + 1 do
        if KEYS[i] ~= key and is_blocked(KEYS[i]) then
            local other = redis.call('HMGET', KEYS[i], 'lat_sum', 'lat_weight')
            local other_smoothed = num(other[2]) > 0 and num(other[1]) / num(other[2]) or 0
            if other_smoothed < best_smoothed then
                best_key, best_smoothed = KEYS[i], other_smoothed
            end
        end
    end
    if best_key == nil then
        redis.call('HINCRBY', pool_key, 'blocks_deferred', 1)
        return {tostring(score), 0}
    end
    end_block(best_key)  -- cut short: no slow start
    redis.call('HINCRBY', pool_key, 'block_swaps', 1)
end

local last = redis.call('HMGET', key, 'block_until', 'block_level')
local level = 0
if num(last[1]) > 0 and now - num(last[1]) < reoffend_s then
    level = num(last[2]) + 1
end
-- The factor doubles per reoffence, capped so that the time stays within
-- block_max_s; with no minimum time there is nothing to escalate.
local factor = 1
if block_min_s > 0 then
    factor = math.min(2 ^ level, math.max(1, block_max_s / block_min_s))
end
local turns = math.ceil((block_turns + (score - score_threshold) * block_turns_per_point) * factor)
local reason = string.format(
    'score %.1f reached %g: last %s, error rate %.0f%%, latency %.0f ms vs pool %.0f ms',
    score, score_threshold, outcome, error_rate * 100, smoothed, yardstick)
-- A block starts clean: no trial and no passing checks from before it, so only
-- fresh checks offer one.
redis.call('HSET', key, 'in_block', 1, 'score', 0, 'blocked_turns', turns,
           'block_until', now + block_min_s * factor, 'block_level', level,
           'last_block_at', now, 'block_reason', reason,
           'trial', 0, 'trial_streak', 0, 'check_ok_streak', 0)
redis.call('HINCRBY', key, 'blocks', 1)
return {tostring(score), turns}
