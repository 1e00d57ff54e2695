-- lib: functions shared by pick.lua and report.lua. Redis scripts cannot
-- import, so load_lua (scorer/keys.py) prepends this file to every script whose
-- header says "-- Prelude: lib.lua" (so a script's error lines count from here).

-- End a backend's block: it serves again, from a clean score, and any trial
-- (offered, in flight, or part of a run) goes with the block, so no flag
-- outlives it to send a trial at once when it is blocked again. With `now`, its
-- share also ramps up from `now` (slow start): a block that ran its course
-- (pick.lua) or a run of trials that passed (report.lua). Without, the block is
-- only cut short (report.lua's swap, for a worse backend).
local function end_block(key, now)
    redis.call('HSET', key, 'in_block', 0, 'trial', 0, 'trial_streak', 0, 'score', 0,
               'blocked_turns', 0)
    if now ~= nil then
        redis.call('HSET', key, 'ramp_at', now, 'credit', 0)
    end
end
