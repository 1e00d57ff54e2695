"""The pool's membership (scorer/membership.py, members.lua): in Redis, seen by every
worker at once, on fakeredis and on a real Redis server."""
from __future__ import annotations

import fakeredis
import pytest

from apps.config import load_settings
from scorer.members import LastBackendError, StateFile
from scorer.pool import Outcome, Pool
from tests.pools import BACKENDS, RULES, make_pool, member_json, ports, put, remove, state


# --- membership: in Redis, seen by every worker at once -----------------------------

def test_runtime_changes_persist_across_restarts_until_the_start_up_list_changes(any_redis):
    first = make_pool(any_redis)
    remove(first, "127.0.0.1:9003")
    restarted = make_pool(any_redis)  # the same LB_BACKENDS: the change persists
    assert set(ports(restarted, 4)) == {9001, 9002}
    changed = make_pool(any_redis, backends="http://127.0.0.1:7001")  # a new LB_BACKENDS wins
    assert ports(changed, 2) == [7001, 7001]
    ports(first, 1)  # the others follow at their next pick
    assert first.backends == changed.backends


def test_a_change_by_one_worker_is_seen_by_another_at_once(any_redis):
    first, second = make_pool(any_redis), make_pool(any_redis)
    assert ports(second, 1) == [9001]
    put(first, "http://127.0.0.1:9004")
    # second's next pick sees the new revision and reloads: the new backend joins.
    picks = ports(second, 8)
    assert 9004 in picks and set(picks) == {9001, 9002, 9003, 9004}
    remove(first, "127.0.0.1:9001")
    ports(second, 1)
    assert 9001 not in ports(second, 6)


def test_a_draining_backend_gets_no_new_requests_but_its_answers_count(any_redis, clock):
    pool = make_pool(any_redis, clock)
    put(pool, "http://127.0.0.1:9002", state="draining")
    assert 9002 not in ports(pool, 9)
    pool.report(Outcome(pool.backends[1], 0.01, status=200))  # a request still in flight
    assert state(pool, 1)["requests"] == 1 and state(pool, 1)["state"] == "draining"


def test_weights_give_proportional_shares(any_redis):
    pool = make_pool(any_redis)
    put(pool, "http://127.0.0.1:9001", weight=3)
    put(pool, "http://127.0.0.1:9003", weight=0)
    picks = ports(pool, 40)
    assert picks[:8] == [9001, 9001, 9001, 9002, 9001, 9001, 9001, 9002]
    assert picks.count(9001) == 30 and picks.count(9002) == 10 and 9003 not in picks


def test_a_redis_that_lost_its_keys_is_seeded_from_the_last_copy_not_the_config(any_redis):
    pool = make_pool(any_redis)
    remove(pool, "127.0.0.1:9002")
    any_redis.flushall()  # a Redis restart
    ports(pool, 1)  # sees revision 0, seeds Redis again from its copy
    assert set(ports(pool, 6)) == {9001, 9003}
    newcomer = make_pool(any_redis)  # a worker that starts now gets the same list
    newcomer.sync()
    assert newcomer.backends == pool.backends


def test_the_membership_survives_a_restart_of_redis_and_balancer_in_a_file(tmp_path):
    settings = load_settings(environ={**RULES, "LB_BACKENDS": BACKENDS, "LB_POOL": "f"})
    state = StateFile(tmp_path / "members.json", settings.backends)
    pool = Pool(settings, redis_factory=lambda: fakeredis.FakeRedis(server=fakeredis.FakeServer()),
                state_file=state)
    put(pool, "http://127.0.0.1:9004", weight=2)
    remove(pool, "127.0.0.1:9001")
    # Both restart: a new process, an empty Redis.
    again = Pool(settings, redis_factory=lambda: fakeredis.FakeRedis(server=fakeredis.FakeServer()),
                 state_file=StateFile(tmp_path / "members.json", settings.backends))
    again.sync()
    assert [(m.id, m.weight) for m in again.members] == [
        ("127.0.0.1:9002", 1), ("127.0.0.1:9003", 1), ("127.0.0.1:9004", 2)]
    # A changed start-up list wins over what was saved for the old one.
    changed = load_settings(environ={**RULES, "LB_BACKENDS": "http://127.0.0.1:7001",
                                     "LB_POOL": "f"})
    fresh = Pool(changed, redis_factory=lambda: fakeredis.FakeRedis(server=fakeredis.FakeServer()),
                 state_file=StateFile(tmp_path / "members.json", changed.backends))
    fresh.sync()
    assert [m.id for m in fresh.members] == ["127.0.0.1:7001"]


def test_the_script_refuses_to_empty_the_pool_and_stale_decisions(any_redis):
    pool = make_pool(any_redis)
    remove(pool, "127.0.0.1:9001")
    remove(pool, "127.0.0.1:9002")
    with pytest.raises(LastBackendError):
        remove(pool, "127.0.0.1:9003")
    assert [m.id for m in make_pool(any_redis).members] != []
    # A change decided on an old version is refused by the script, read again, decided again.
    other = make_pool(any_redis)
    decided_on = []

    def decide(members):
        decided_on.append([m.id for m in members])
        if len(decided_on) == 1:  # meanwhile, another worker adds a backend
            put(other, "http://127.0.0.1:9004")
        return "put", "127.0.0.1:9005", member_json("http://127.0.0.1:9005")

    pool.change(decide)
    assert decided_on == [["127.0.0.1:9003"], ["127.0.0.1:9003", "127.0.0.1:9004"]]
    assert [m.id for m in pool.members] == ["127.0.0.1:9003", "127.0.0.1:9004", "127.0.0.1:9005"]


def test_a_worker_that_missed_a_removal_does_not_bring_it_back_after_a_restart(any_redis,
                                                                               tmp_path):
    settings = load_settings(environ={**RULES, "LB_BACKENDS": BACKENDS, "LB_POOL": "w"})

    def worker() -> Pool:  # the workers of one balancer share its state file
        return Pool(settings, redis_factory=lambda: any_redis,
                    state_file=StateFile(tmp_path / "members.json", settings.backends))

    seen, stale = worker(), worker()
    stale.sync()
    remove(seen, "127.0.0.1:9002")
    any_redis.flushall()  # Redis restarts before the stale worker picks again
    assert "127.0.0.1:9002" not in {stale.pick().id for _ in range(6)}
    assert [m.id for m in seen.members] == [m.id for m in stale.members]


def test_a_host_that_missed_a_removal_is_overruled_by_one_that_saw_it(any_redis):
    host_a, host_b = make_pool(any_redis), make_pool(any_redis)  # no shared state file
    host_b.sync()
    remove(host_a, "127.0.0.1:9002")
    any_redis.flushall()
    # The stale host reaches the empty Redis first and offers its old copy...
    assert "127.0.0.1:9002" in {host_b.pick().id for _ in range(3)}
    # ...the host that saw the removal finds Redis older than its copy at its next pick
    # and offers its own, which wins; the stale host follows at its next pick.
    assert "127.0.0.1:9002" not in {host_a.pick().id for _ in range(6)}
    assert "127.0.0.1:9002" not in {host_b.pick().id for _ in range(6)}
    assert host_a.snapshot.version == host_b.snapshot.version


def test_two_copies_of_the_same_revision_are_told_apart(any_redis):
    host_a, host_b = make_pool(any_redis), make_pool(any_redis)
    host_b.sync()
    remove(host_a, "127.0.0.1:9002")  # host_a: revision 2, without 9002
    any_redis.flushall()
    host_b.sync()  # the stale host offers revision 1, with 9002...
    put(host_b, "http://127.0.0.1:9004")  # ...and a change on top makes it revision 2 too
    assert host_a.rev == host_b.rev == 2
    # Same revision, different content: host_a's next pick sees the other epoch and reloads.
    host_a.pick()
    assert [m.id for m in host_a.members] == [m.id for m in host_b.members]
