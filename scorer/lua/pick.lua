-- pick: advance the pool's shared round-robin cursor past blocked backends.
-- Prelude: lib.lua (end_block), prepended by load_lua.
--
-- KEYS[1]      lb:{pool}:pool       hash: cursor, panic_picks, over_cap_picks, the retry
--                                   budget's counts (req_sum, retry_sum, budget_at),
--                                   retries_denied, the shares kept (shares, shares_left,
--                                   shares_version)
-- KEYS[2..n+1] lb:{pool}:b:<id>     each backend's hash, in the pool's order
-- ARGV[1]  now                 caller's clock, seconds since the epoch
-- ARGV[2]  honour_blocks       1 (strategy `scored`) or 0 (`round_robin`: ignore blocks)
-- ARGV[3]  flags               one character per backend, or empty for all '.':
--                              '.' eligible, 'b' busy (at the caller's in-flight cap:
--                              passed over like a blocked one), 'x' excluded (already
--                              tried by this request: never picked)
-- ARGV[4]  is_retry            1 when this pick is for a retry, else 0
-- ARGV[5]  retry_budget        retries allowed as a share of recent requests...
-- ARGV[6]  retry_budget_min    ...plus this many
-- ARGV[7]  retry_budget_tau_s  time constant of the recent request and retry counts
-- ARGV[8]  check_interval_s    the health checker's interval (0: no active checks)
-- ARGV[9]  slow_start_s        time a backend back from a block takes to ramp up to
--                              its full share
-- ARGV[10] share_band_ratio    a backend within this much above the fastest...
-- ARGV[11] share_band_ms       ...or this many ms (the wider) keeps a full share
-- ARGV[12] share_min_samples   a share follows latency only on this much weight
-- ARGV[13] share_noise_z       the bar widens by this many standard errors
-- ARGV[14] share_power         beyond the bar, a share is (bar / latency)^power; 0: off
-- ARGV[15] share_floor         ...and at least this
-- ARGV[16] weights             comma-separated weight per backend, '' for all 1:
--                              a backend of weight w is picked w times in a row
--                              per turn of the cursor; weight 0 is never picked
-- ARGV[17] known_version       the membership version ("<rev>:<epoch>", members.lua)
--                              the caller's keys and flags are built from
-- Returns  {index, panic, members_rev}: the 0-based index of the picked backend, 1 when
--          every candidate was blocked and the lowest score was taken instead
--          (when only busy ones were left, one is taken over its cap: not
--          panic); {-1, 0} when a retry is refused: over budget, or no
--          unblocked, idle backend left that this request has not tried.
--          {-2, 0, members_rev} when the membership changed since known_version
--          (members.lua), nothing picked: the caller reloads and asks again, so
--          no request ever goes by an old membership (to a drained backend, say).
--
-- Rules: the cursor moves one slot at a time. A blocked backend (in_block = 1)
-- it passes loses one turn and is skipped. A block ends when the cursor reaches
-- the backend with its turns used up *and* its minimum end time (block_until)
-- passed: its score restarts from 0 and it is picked at once. A blocked backend
-- whose health checks passed (trial = 1, set by report.lua) gets one trial
-- request instead (report.lua judges it, and may offer the next).
-- Shares: a backend's share per turn is 1, or less when its smoothed latency
-- (from report.lua, failures priced in) is past the bar that the fastest unblocked
-- backend sets (shares below); a backend back from a block ramps its share up
-- over slow_start_s, and the two multiply. A share below 1 is carried by a
-- fractional credit: each pass adds the share, a whole credit buys one pick, so
-- every worker and host sees the same deterministic sequence. A backend skipped
-- for its share is still taken before the cursor gives up (its credit then owes).
-- When every candidate is blocked or busy the request still goes somewhere: to
-- a busy unblocked backend if there is one, else a blocked one; the lowest
-- score first, ties broken in cursor order (panic mode), and it is counted.
-- The cursor is stored modulo n, so a change in n keeps it valid.
local now = tonumber(ARGV[1])
local honour_blocks = ARGV[2] == '1'
local flags = ARGV[3]
local is_retry = ARGV[4] == '1'
local retry_budget = tonumber(ARGV[5])
local retry_budget_min = tonumber(ARGV[6])
local retry_budget_tau_s = tonumber(ARGV[7])
local check_interval_s = tonumber(ARGV[8])
local slow_start_s = tonumber(ARGV[9])
local share_band_ratio = tonumber(ARGV[10])
local share_band_ms = tonumber(ARGV[11])
local share_min_samples = tonumber(ARGV[12])
local share_noise_z = tonumber(ARGV[13])
local share_power = tonumber(ARGV[14])
local share_floor = tonumber(ARGV[15])
local weights = {}
for weight in string.gmatch(ARGV[16] or '', '[^,]+') do
    weights[#weights + 1] = tonumber(weight)
end

local pool_key = KEYS[1]
local n = #KEYS - 1

local function num(value) return tonumber(value) or 0 end
local function flag(index)
    if (weights[index + 1] or 1) <= 0 then return 'x' end  -- weight 0: never picked
    if flags == '' then return '.' end
    return string.sub(flags, index + 1, index + 1)
end

-- The pool's hash, read once: the cursor, the membership's version, the retry
-- budget (decayed counts of first attempts and of retries) and the kept shares.
local budget = redis.call('HMGET', pool_key, 'cursor', 'req_sum', 'retry_sum', 'budget_at',
                          'members_rev', 'turn_served', 'members_epoch',
                          'shares', 'shares_left', 'shares_version')
local last = tonumber(budget[1]) or -1
local rev = tonumber(budget[5]) or 0
local served = num(budget[6])
if ARGV[17] ~= (budget[5] or '0') .. ':' .. (budget[7] or '') then
    return {-2, 0, rev}
end
local budget_fade = math.exp(-math.max(0, now - num(budget[4])) / retry_budget_tau_s)
local req_sum, retry_sum = num(budget[2]) * budget_fade, num(budget[3]) * budget_fade
if is_retry and retry_sum + 1 > retry_budget * req_sum + retry_budget_min then
    redis.call('HINCRBY', pool_key, 'retries_denied', 1)
    return {-1, 0, rev}
end

local function take(index, counter)
    if is_retry then retry_sum = retry_sum + 1 else req_sum = req_sum + 1 end
    -- Weighted turns: picking the same backend again counts toward its weight.
    served = (index == last) and served + 1 or 1
    redis.call('HSET', pool_key, 'cursor', index, 'req_sum', req_sum, 'retry_sum', retry_sum,
               'budget_at', math.max(num(budget[4]), now), 'turn_served', served)
    if counter then
        redis.call('HINCRBY', pool_key, counter, 1)
    end
    return {index, counter == 'panic_picks' and 1 or 0, rev}
end

-- Shares. The bar is the fastest unblocked backend's smoothed latency (its
-- geometric mean, failures priced in: report.lua's log_lat_sum), widened by the
-- dead band; a slower one's share shrinks as (bar / latency)^power, to the
-- floor. The fastest sets the bar, not the pool's average: slow traffic would
-- pull an average up until the backends it should shrink fit under it. And the
-- bar widens by share_noise_z standard errors of the two means' difference, so
-- that a share moves only on a difference beyond noise: a few noisy samples
-- never split a healthy pool unevenly. A backend whose mean rests on too few
-- samples keeps a full share.
-- Computing them reads every backend's hash, so they are kept in the pool's
-- hash and computed again once per turn of the cursor (every n picks, or when
-- the membership changed): a wide pool pays for about one backend's read per
-- pick, not n, shares are never more than a turn old, and every worker and host
-- reads the same ones.
local function compute_shares()
    local judged, fastest, stored = {}, nil, {}
    for index = 0, n - 1 do
        local b = redis.call('HMGET', KEYS[index + 2], 'in_block', 'log_lat_sum', 'log_weight',
                             'log_sq_sum', 'share')
        local weight = num(b[3])
        -- The samples asked for scale with the share it has, as its traffic does:
        -- a backend held at the floor is still judged on its few requests, and
        -- one that fell silent (a block, an idle spell) starts from a full share.
        local enough = share_min_samples * (tonumber(b[5]) or 1)
        if b[1] ~= '1' and weight >= math.max(enough, 1e-9)
                and (weights[index + 1] or 1) > 0 then
            local mean = num(b[2]) / weight
            -- The variance of a mean of `weight` samples (ln ms).
            local spread = math.max(0, num(b[4]) / weight - mean * mean) / weight
            judged[index] = {mean = mean, spread = spread}
            if fastest == nil or mean < fastest.mean then fastest = judged[index] end
        end
        stored[index] = b[5]
    end
    local shown = {}
    for index = 0, n - 1 do
        local share, own = 1, judged[index]
        if own then
            local best = math.exp(fastest.mean)
            local bar = math.max(best * (1 + share_band_ratio), best + share_band_ms)
                * math.exp(share_noise_z * math.sqrt(own.spread + fastest.spread))
            local latency = math.exp(own.mean)
            if latency > bar then
                share = math.max(share_floor, (bar / latency) ^ share_power)
            end
        end
        -- Three digits: what /status shows is what the credit runs on, and noise
        -- in the last digits neither writes every pick nor misses a whole share.
        shown[index + 1] = string.format('%.3g', share)
        if stored[index] ~= shown[index + 1] and (stored[index] or '1') ~= shown[index + 1] then
            redis.call('HSET', KEYS[index + 2], 'share', shown[index + 1])
        end
    end
    redis.call('HSET', pool_key, 'shares', table.concat(shown, ','), 'shares_left', n - 1,
               'shares_version', ARGV[17])
    return shown
end

local shares = {}
if honour_blocks and share_power > 0 then
    local kept, left = budget[8], num(budget[9])
    local list = {}
    if kept and budget[10] == ARGV[17] and left > 0 then
        for value in string.gmatch(kept, '[^,]+') do list[#list + 1] = value end
    end
    if #list == n then
        redis.call('HSET', pool_key, 'shares_left', left - 1)
    else
        list = compute_shares()
    end
    for index = 0, n - 1 do shares[index] = tonumber(list[index + 1]) end
end
local function share_of(index)
    return shares[index] or 1
end

-- The cursor stays on a backend until it has served its weight in this turn:
-- staying put is part of the pick its credit already bought.
local first_step = 1
if last >= 0 and last < n and served < (weights[last + 1] or 1) then
    first_step = 0
end

local blocked_at = {}
-- The first backend skipped for its share alone, and its credit: taken before giving up.
local owed, owed_credit = nil, 0
for step = first_step, first_step + n - 1 do
    local index = (last + step) % n
    local key = KEYS[index + 2]
    local blocked, short = false, false
    if honour_blocks then
        local state = redis.call('HMGET', key, 'in_block', 'blocked_turns', 'block_until',
                                 'trial', 'ramp_at', 'credit', 'last_check',
                                 'last_check_outcome')
        if state[1] == '1' then
            local turns = num(state[2])
            -- A fresh failed health check holds a block past its end: a backend
            -- still failing its checks is not let back in to fail requests. A
            -- slow pass does not: traffic judges it again, and escalates.
            local checks_failing = check_interval_s > 0 and state[8]
                and state[8] ~= 'ok' and state[8] ~= 'slow'
                and now - num(state[7]) <= 3 * check_interval_s
            if state[4] == '1' and flag(index) == '.' and not is_retry then
                -- Its health checks passed: one trial request (half-open).
                redis.call('HSET', key, 'trial', 2, 'trial_at', now)
                return take(index, 'trial_picks')
            elseif turns > 0 or now < num(state[3]) or checks_failing then
                blocked = true
                if turns > 0 and step > 0 then  -- staying put is not passing it
                    redis.call('HSET', key, 'blocked_turns', turns - 1)
                end
            else
                -- The block is over. Whatever answers arrived during it, the
                -- backend starts again from a clean score, ramping up its share.
                end_block(key, now)
                state[5], state[6] = now, 0
            end
        end
        if not blocked and step > 0 and flag(index) == '.' then
            local share = share_of(index)
            if num(state[5]) > 0 then
                -- Slow start: a share growing linearly over slow_start_s.
                local ramp = (now - num(state[5])) / slow_start_s
                if slow_start_s <= 0 or ramp >= 1 then
                    redis.call('HDEL', key, 'ramp_at')
                else
                    share = share * math.max(ramp, 0.05)
                end
            end
            if share < 1 then
                local credit = num(state[6]) + share
                short = credit < 1 - 1e-9  -- ten passes of 0.1 make a whole credit
                redis.call('HSET', key, 'credit', short and credit or credit - 1)
                if short and owed == nil then owed, owed_credit = index, credit end
            elseif state[6] then
                redis.call('HDEL', key, 'credit')
            end
        end
    end
    if not blocked and not short and flag(index) == '.' then
        return take(index, nil)
    end
    blocked_at[index] = blocked
end

-- Every eligible backend was short of credit (the fast ones busy or tried): a
-- share is a preference, so the first of them is taken, on credit. It owes at
-- most one pick: a long spell of such picks must not starve it afterwards.
if owed ~= nil then
    local key = KEYS[owed + 2]
    redis.call('HSET', key, 'credit', math.max(owed_credit - 1, -1))
    return take(owed, nil)
end

-- A retry goes only to a healthy backend this request has not tried: never to
-- a blocked one, which would turn one failure into two.
if is_retry then
    return {-1, 0, rev}
end

-- Panic: every candidate is blocked or busy. A busy but unblocked backend is
-- still better than a blocked one; among equals, the lowest score, and the
-- cursor's own order breaks ties, so equals still rotate.
local best, best_rank, best_score = nil, nil, nil
for step = 1, n do
    local index = (last + step) % n
    if flag(index) ~= 'x' then
        local rank = blocked_at[index] and 1 or 0
        local score = num(redis.call('HGET', KEYS[index + 2], 'score'))
        if best == nil or rank < best_rank or (rank == best_rank and score < best_score) then
            best, best_rank, best_score = index, rank, score
        end
    end
end
if best == nil then
    return {-1, 0, rev}
end
-- Only a pick among blocked backends is panic; going over a healthy
-- backend's in-flight cap is counted apart.
return take(best, best_rank == 1 and 'panic_picks' or 'over_cap_picks')
