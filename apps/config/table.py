"""THE declaration of every setting: one `Setting` row each (apps/config/row.py).

A script's ARGV carries its settings in the order of their rows here, and
docs/settings.md shows them in this order. A new setting takes its row and, when
a script reads it, its `local` line in that script
(tests/test_settings_table.py says where).
"""
from __future__ import annotations

from apps.config.parsers import (
    number, parse_backends, parse_bool, parse_choice, parse_networks, parse_path,
    parse_pool_name, parse_port, parse_redis_url, parse_seconds, parse_size, parse_statuses)
from apps.config.row import Setting

STRATEGIES = ("scored", "round_robin")

DEFAULT_REDIS_PORT = "6390"


TABLE: tuple[Setting, ...] = (
    Setting("LB_BACKENDS",
            "http://127.0.0.1:9001,http://127.0.0.1:9002,http://127.0.0.1:9003",
            parse_backends, "URLs",
            "Comma-separated backend base URLs (scheme, host, port; no path). "
            "The default is the Procfile's three echo instances."),
    Setting("LB_BACKEND_NETWORKS", "", parse_networks, "CIDRs",
            "Comma-separated networks backends must be in (`10.0.0.0/8,192.168.1.5`), "
            "checked when a backend is added and on every new connection, where a host "
            "name's addresses outside them are never connected to. Unset: any address."),
    Setting("LB_STRATEGY", "scored", parse_choice(*STRATEGIES), "name",
            "`scored`: round robin that skips blocked backends and gives slower ones "
            "smaller shares (the scorer below). "
            "`round_robin`: plain round robin, the baseline; scores are still kept and shown."),
    Setting("LB_HOST", "127.0.0.1", str, "address", "Address the traffic listener binds."),
    Setting("LB_PORT", "8000", parse_port, "port", "Port of the traffic listener."),
    Setting("LB_ADMIN_HOST", "127.0.0.1", str, "address",
            "Address the admin listener binds."),
    Setting("LB_ADMIN_PORT", "8001", parse_port, "port",
            "Port of the admin listener (`/status`, `/ready`)."),
    Setting("LB_ADMIN_TOKEN", "", str, "secret",
            "Bearer token for the admin endpoints that change state (`POST /backends/<id>/reset`). "
            "Unset: those endpoints are off."),
    Setting("LB_ADMIN_HEADER_TIMEOUT", "10", parse_seconds, "s",
            "Time an admin client has to send its whole request head; past it the admin "
            "listener answers 408 and closes (a connection that sent nothing is just closed)."),
    Setting("LB_ADMIN_BODY_TIMEOUT", "10", parse_seconds, "s",
            "Time an admin client has to send its request body once the head is in; past "
            "it, 408."),
    Setting("LB_ADMIN_SEND_TIMEOUT", "10", parse_seconds, "s",
            "An admin answer that the client does not take for this long is dropped; so is "
            "a connection the client leaves open this long after its answer."),
    Setting("LB_ADMIN_MAX_CONNECTIONS", "256", number(1, 65536, integer=True), "connections",
            "Connections the admin listener keeps open at most. At the cap it closes one "
            "done with its answer, else the oldest one still sending its request, to admit "
            "the new one. Bounds the request data it holds to this x 80 KiB (a 16 KiB head "
            "and a 64 KiB body each)."),
    Setting("LB_TLS_CA_FILE", "", str, "path",
            "CA bundle (PEM) trusted for `https://` backends; unset: the system's."),
    Setting("LB_TLS_VERIFY", "1", parse_bool, "bool",
            "Check `https://` backends' certificates and host names. Turning this off "
            "is logged at start-up."),
    # The client side (apps/lb/edge.py): what a slow, idle or crowded client may hold.
    Setting("LB_CLIENT_HEADER_TIMEOUT", "10", parse_seconds, "s",
            "Time a client has to send a whole request head from its first byte; past it the "
            "client gets 408 and the connection closes (a connection that sends nothing is "
            "closed after Gunicorn's keep-alive time instead)."),
    Setting("LB_CLIENT_BODY_TIMEOUT", "10", parse_seconds, "s",
            "Longest pause between two reads of a request body; past it the client gets 408 "
            "and the connection closes."),
    Setting("LB_CLIENT_BODY_MIN_RATE", "1k", parse_size, "bytes/s",
            "Slowest average a request body may arrive at, once LB_CLIENT_BODY_GRACE_S has "
            "passed; slower gets 408, so a trickle of a byte a second is cut off too. 0: no "
            "minimum."),
    Setting("LB_CLIENT_BODY_GRACE_S", "5", number(0), "s",
            "Time a body is given before LB_CLIENT_BODY_MIN_RATE applies."),
    Setting("LB_CLIENT_SEND_TIMEOUT", "10", parse_seconds, "s",
            "Time an answer may wait for the client to read more of it; past it the "
            "connection is dropped."),
    Setting("LB_MAX_CLIENT_CONNECTIONS", "1000", number(1, integer=True), "connections",
            "Client connections one worker holds open. At the cap the one idle longest is "
            "closed to admit a new one (else the one slowest to send its head; else the new "
            "one gets 503)."),
    Setting("LB_MAX_CONNECTIONS_PER_CLIENT", "256", number(0, integer=True), "connections",
            "Connections one client address may hold open per worker, the same way; 0: no "
            "limit. Peers in LB_TRUSTED_PROXIES are exempt."),
    Setting("LB_CONNECT_TIMEOUT", "1.0", parse_seconds, "s",
            "Time allowed to open a connection to a backend; past it the client gets "
            "504 (a refused connection gets 502)."),
    Setting("LB_READ_TIMEOUT", "15", parse_seconds, "s",
            "Time allowed between bytes from a backend once connected; past it the client gets 504."),
    Setting("LB_REQUEST_TIMEOUT", "30", parse_seconds, "s",
            "Deadline for a whole request, retries included; each attempt's timeouts are cut "
            "to what is left. Past it the client gets 504.", script="report"),
    Setting("LB_MAX_BODY", "10m", parse_size, "bytes",
            "Largest request body accepted (suffixes k, m, g); larger ones get 413."),
    Setting("LB_RETRY_BUFFER", "1m", parse_size, "bytes",
            "Request bodies up to this size are held in memory, larger ones in a temporary "
            "file; either way they can be sent again on a retry. With "
            "LB_REQUEST_BUFFERING=0 larger ones are streamed instead, and retried only "
            "when no connection could be opened."),
    Setting("LB_REQUEST_BUFFERING", "1", parse_bool, "bool",
            "Read the whole request body before picking a backend, as nginx's "
            "`proxy_request_buffering`, so that a slow upload holds no backend (a chunked "
            "upload goes out with a `Content-Length`). 0: bodies over LB_RETRY_BUFFER are "
            "streamed to the backend as they arrive."),
    Setting("LB_RESPONSE_BUFFERING", "1", parse_bool, "bool",
            "Read a backend's answer as fast as the backend sends it, as nginx's "
            "`proxy_buffering`, so that a client reading slowly (or not at all) holds no "
            "backend. 0: large answers are relayed at the client's pace."),
    Setting("LB_RESPONSE_BUFFER", "256k", parse_size, "bytes",
            "Part of an answer the client has not read yet that is held in memory; the rest "
            "goes to a temporary file..."),
    Setting("LB_MAX_RESPONSE_TEMP", "1g", parse_size, "bytes",
            "...of at most this size per answer; past it the backend is read no faster than "
            "the client reads."),
    Setting("LB_RETRIES", "1", number(0, 10, integer=True), "attempts",
            "Extra attempts after a failed one, each on a different backend."),
    Setting("LB_RETRY_NON_IDEMPOTENT", "0", parse_bool, "bool",
            "Also retry POST, PATCH (and other non-idempotent methods) after a timeout, a "
            "broken connection or a retryable status, as nginx's `non_idempotent`. "
            "A refused connection is retried for every method regardless."),
    Setting("LB_RETRY_ON_STATUS", "502,503,504", parse_statuses, "statuses",
            "Backend answers that count as failed attempts worth retrying."),
    Setting("LB_RETRY_BUDGET", "0.2", number(0, 1), "fraction",
            "Retries may add at most this share of recent requests (shared through Redis), "
            "so a failing pool does not get a retry storm...", script="pick"),
    Setting("LB_RETRY_BUDGET_MIN", "3", number(0), "retries",
            "...plus this many, so that light traffic can still retry.", script="pick"),
    Setting("LB_RETRY_BUDGET_TAU_S", "10", number(0, low_open=True), "s",
            "Time constant of the recent request and retry counts the budget compares.",
            script="pick"),
    Setting("LB_MAX_INFLIGHT", "64", number(1, integer=True), "requests",
            "Requests one worker process sends to one backend at once (like HAProxy's "
            "`maxconn`): a backend at its cap is passed over like a blocked one, so a "
            "hanging backend cannot collect a worker's requests. When every backend is at "
            "its cap, the request still goes out."),
    Setting("LB_ACCESS_LOG", "-", str, "path",
            "Where the balancer writes one JSON line per request: `-` for standard output, "
            "a file path to append to, or `off`."),
    Setting("LB_PRESERVE_HOST", "0", parse_bool, "bool",
            "Send the client's `Host` header upstream instead of the backend's own."),
    Setting("LB_TRUSTED_PROXIES", "", parse_networks, "CIDRs",
            "Comma-separated networks of proxies in front of the balancer: from them "
            "`X-Forwarded-*`, `X-Real-IP` and `Forwarded` are kept and appended to; from "
            "any other client they are replaced. Also Gunicorn's `FORWARDED_ALLOW_IPS` "
            "unless that is set. Unset: no one is trusted."),
    Setting("LB_POOL", "default", parse_pool_name, "name",
            "Name of the pool's state in Redis (keys `lb:{<pool>}:...`); balancers "
            "with the same name and Redis share one cursor."),
    Setting("LB_STATE_DIR", ".lb-state", str, "path",
            "Where each balancer keeps its last known membership "
            "(`members-<pool>.json`), restored after a restart of Redis and balancer, "
            "unless LB_BACKENDS changed meanwhile."),
    Setting("LB_REDIS_PORT", DEFAULT_REDIS_PORT, parse_port, "port",
            "Port of the bundled Redis server that `honcho start` runs when `REDIS_URL` is unset."),
    Setting("REDIS_URL", "", parse_redis_url, "URL",
            "Redis holding the shared state. Unset: the bundled server, "
            "`redis://127.0.0.1:<LB_REDIS_PORT>/0`. `redis+cluster://host:port` (or "
            "`rediss+cluster://`) selects Redis Cluster, any node as the entry point. A "
            "password goes in the URL: `redis://:password@host:6379/0`, or with an ACL user "
            "`redis://user:password@host:6379/0` (percent-encode `@`, `:` and `/` in it); "
            "`/status` shows it as `***`.", private=True),
    Setting("LB_REDIS_RETRY_S", "1", parse_seconds, "s",
            "While Redis is unreachable each worker serves from its own in-process state "
            "and checks Redis again this often."),
    Setting("LB_REDIS_CA_FILE", "", str, "path",
            "CA bundle (PEM) trusted for a `rediss://` Redis; unset: the system's. "
            "Certificates are always checked."),
    Setting("LB_REDIS_CONNECTIONS", "16", number(1, integer=True), "connections",
            "Redis connections each balancer process keeps, shared by all its requests; a "
            "request that finds them all in use waits for one."),
    Setting("LB_REDIS_TIMEOUT", "0.25", parse_seconds, "s",
            "Connect and command timeout for Redis. Scripts are never retried "
            "automatically: a retried script whose reply was lost would run twice."),

    # The scorer (scorer/lua/report.lua and pick.lua). Lower scores are healthier.
    Setting("LB_SCORE_MIN", "-10", number(-1000, 0), "points",
            "Lowest score: the most credit a healthy backend can bank against future penalties.",
            script="report"),
    Setting("LB_SCORE_MAX", "60", number(1, 10000), "points", "Highest score.", script="report"),
    Setting("LB_SCORE_THRESHOLD", "10", number(0, 10000, low_open=True), "points",
            "A score reaching this blocks the backend (score back to 0).", script="report"),
    Setting("LB_SCORE_HALF_LIFE_S", "120", number(0, low_open=True), "s",
            "Every score halves toward 0 in this time, with or without traffic.", script="report"),
    Setting("LB_AVG_TAU_S", "30", number(0, low_open=True), "s",
            "Time constant of the pool's latency average: the mean over successful "
            "requests, each weighted e^(-age/tau), so it follows time, not request count. "
            "Also of the pool's average over passing health checks.",
            script="report"),
    Setting("LB_LATENCY_TAU_S", "2", number(0, low_open=True), "s",
            "Time constant of each backend's smoothed latency (same kind of mean).",
            script="report"),
    Setting("LB_LATENCY_MIN_SAMPLES", "5", number(0), "requests",
            "A backend's latency is judged only once its smoothed latency rests on this "
            "much (time-decayed) weight of requests.", script="report"),
    Setting("LB_LATENCY_RATIO", "1.5", number(1), "x",
            "A backend is slower when its smoothed latency, and the request at hand, "
            "exceed this many times the pool average...", script="report"),
    Setting("LB_LATENCY_SLACK_MS", "20", number(0), "ms",
            "...and above it by more than this, so noise in a fast pool never counts.",
            script="report"),
    Setting("LB_SLOW_POINTS", "10", number(0), "points",
            "Cost per request of being slower: points per 100 % above the pool average.",
            script="report"),
    Setting("LB_SLOW_MAX_POINTS", "20", number(0), "points",
            "Cap on the latency cost of one request.", script="report"),
    Setting("LB_FAST_BONUS", "1", number(0), "points",
            "Earned per request while the smoothed latency is below the pool average.",
            script="report"),
    Setting("LB_ERROR_POINTS", "4", number(0), "points",
            "Cost of a failed request: a 5xx, a timeout or a transport error.", script="report"),
    Setting("LB_ERROR_LATENCY_FACTOR", "4", number(1), "x",
            "A failure enters the backend's latency as at least this many times "
            "max(pool average, slack): a fast error never looks fast.", script="report"),
    Setting("LB_ERROR_TAU_S", "10", number(0, low_open=True), "s",
            "Time constant of each backend's recent error rate.", script="report"),
    Setting("LB_ERROR_QUIET", "0.05", number(0, 1), "fraction",
            "A success earns the bonus only while the recent error rate is below this.",
            script="report"),
    Setting("LB_SUCCESS_BONUS", "2", number(0), "points",
            "Earned per successful request with no recent errors.", script="report"),
    Setting("LB_RELATIVE_CREDIT", "1", number(0), "x",
            "A success also earns this x LB_ERROR_POINTS x r/(1-r), r the pool's recent "
            "error rate: a backend failing as often as the pool breaks even, a better one "
            "gains. 0 judges errors in absolute terms only.", script="report"),
    Setting("LB_BLOCK_TURNS", "40", number(0, integer=True), "turns",
            "Round-robin turns a block lasts when the score just reaches the threshold.",
            script="report"),
    Setting("LB_BLOCK_TURNS_PER_POINT", "1", number(0), "turns",
            "Extra turns per point of score above the threshold.", script="report"),
    Setting("LB_BLOCK_MIN_S", "5", number(0), "s",
            "Shortest time a first block lasts, whatever the traffic: a block ends when "
            "its turns are used up and this time has passed.", script="report"),
    Setting("LB_BLOCK_MAX_S", "20", number(0), "s",
            "Longest block after escalation; turns escalate by the same capped factor.",
            script="report"),
    Setting("LB_REOFFEND_S", "30", number(0), "s",
            "Blocked again within this time after the last block's minimum end: "
            "the new block is twice as long (turns and time), up to LB_BLOCK_MAX_S.",
            script="report"),
    # Active health checks (apps/lb/health.py) and the way back from a block.
    Setting("LB_CHECK_INTERVAL_S", "0.5", number(0), "s",
            "How often the pool's one health checker probes every backend; 0 turns "
            "active checks off (the balancer then learns from traffic alone).", script="pick"),
    Setting("LB_CHECK_TIMEOUT_S", "0.5", parse_seconds, "s",
            "Time a probe may take; a slower one fails."),
    Setting("LB_CHECK_PATH", "/health", parse_path, "path",
            "Path probed on each backend with GET; a 2xx or 3xx answer passes."),
    Setting("LB_CHECK_RISE", "2", number(1, integer=True), "checks",
            "Passing checks in a row, none slow against the other backends' checks (by "
            "LB_LATENCY_RATIO and LB_LATENCY_SLACK_MS), after which a blocked backend gets "
            "a trial request; a trial that is neither failed nor slow against the pool "
            "ends the block at once, even an escalated one.", script="report"),
    Setting("LB_CHECK_FAIL_POINTS", "4", number(0), "points",
            "Cost of a failed check: checks count against a backend without traffic.",
            script="report"),
    Setting("LB_TRIAL_ERROR_FLOOR", "0.05", number(0, 1, low_open=True), "fraction",
            "A backend erring more than the pool must pass several trials in a row to end "
            "its block: its recent error rate over the pool's, the pool's taken as at least "
            "this, rounded up...", script="report"),
    Setting("LB_TRIAL_MAX", "5", number(1, 1000, integer=True), "trials",
            "...and at most this many.", script="report"),
    Setting("LB_SLOW_START_S", "5", number(0), "s",
            "A backend back from a block ramps its share up linearly over this time; 0: "
            "full share at once.", script="pick"),
    # Shares that follow latency, among unblocked backends (pick.lua).
    Setting("LB_SHARE_BAND_RATIO", "0.25", number(0), "fraction",
            "A backend whose smoothed latency (failures priced in) is within this much "
            "above the fastest unblocked backend's keeps a full share per turn of the "
            "cursor...", script="pick"),
    Setting("LB_SHARE_BAND_MS", "2", number(0), "ms",
            "...or within this many ms of it, whichever is wider: a healthy pool splits "
            "exactly evenly.", script="pick"),
    Setting("LB_SHARE_MIN_SAMPLES", "40", number(0), "requests",
            "A backend's share follows its latency only once its smoothed latency rests "
            "on this much (time-decayed) weight of requests; until then, a full share. "
            "More than LB_LATENCY_MIN_SAMPLES: a share moves on smaller differences than "
            "a block, so it needs a steadier mean.", script="pick"),
    Setting("LB_SHARE_NOISE_Z", "3", number(0), "standard errors",
            "The bar also widens by this many standard errors of the difference between "
            "the two means (in logs), so that a share moves only on a difference beyond "
            "noise: a few noisy samples never split a healthy pool unevenly.", script="pick"),
    Setting("LB_SHARE_POWER", "8", number(0), "x",
            "Past that bar, a backend's share is (bar / its latency) to this power: 9 % "
            "slower than the bar, half a share; 50 % slower, the floor. 0 turns shares off "
            "(plain round robin among unblocked backends).", script="pick"),
    Setting("LB_SHARE_FLOOR", "0.05", number(0, 1, low_open=True), "fraction",
            "Least share of an unblocked backend, so that it stays measured; a backend "
            "past the blocking bar is blocked instead.", script="pick"),
    Setting("LB_MAX_BLOCKED_SHARE", "1", number(0, 1), "fraction",
            "At most this share of the pool is blocked at once...", script="report"),
    Setting("LB_MIN_UNBLOCKED", "1", number(0, integer=True), "backends",
            "...and at least this many backends stay unblocked (default: all but one may "
            "be blocked). With 0, all may be: then picks go to the lowest score (panic mode).",
            script="report"),
)

