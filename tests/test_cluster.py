"""The pool's scripts, unchanged, on a real 3-node Redis Cluster (the bundled server)."""
from __future__ import annotations

import random
import socket
import subprocess
from pathlib import Path

import pytest
import redis
import redis.cluster

from apps.launch.stack import spawn, wait_for
from scorer.members import Member
from scorer.pool import Outcome, Pool
from apps.launch.redis_server import server_binary, server_command
from apps.config import load_settings, parse_backends
from tests.support import assert_shares, fire, start_balancer, start_echo

pytestmark = pytest.mark.e2e

BACKENDS = "http://127.0.0.1:9001,http://127.0.0.1:9002,http://127.0.0.1:9003"


def cluster_port() -> int:
    """A free port whose cluster bus port (10000 higher) is free too."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 45000)
        if all(_free(p) for p in (port, port + 10000)):
            return port


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three masters, no replicas, formed with the bundled redis-cli."""
    logs = tmp_path_factory.mktemp("cluster")
    ports = [cluster_port() for _ in range(3)]
    nodes = [spawn(f"node-{port}", server_command(
        port, "--cluster-enabled", "yes", "--cluster-config-file", str(logs / f"nodes-{port}.conf"),
        "--cluster-node-timeout", "2000"), {}, logs, [port]) for port in ports]
    cli = Path(server_binary()).with_name("redis-cli")
    try:
        subprocess.run([str(cli), "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True,
                       capture_output=True, timeout=60)
        # Every node must agree, not just the first: a node still learning the
        # others' slots answers CLUSTERDOWN for the keys it holds.
        clients = [redis.Redis(port=port) for port in ports]
        wait_for(lambda: all(c.execute_command("CLUSTER INFO").get("cluster_state") == "ok"
                             for c in clients),
                 timeout=30, what="cluster_state:ok on every node")
        yield f"redis+cluster://127.0.0.1:{ports[0]}"
    finally:
        for node in nodes:
            node.stop()


def make_pool(url: str, pool: str) -> Pool:
    settings = load_settings(environ={"REDIS_URL": url, "LB_BACKENDS": BACKENDS, "LB_POOL": pool,
                                      "LB_ERROR_POINTS": "25"})
    return Pool(settings, degrade=False)


def test_a_cluster_url_gives_a_cluster_client(cluster):
    pool = make_pool(cluster, "kind")
    assert isinstance(pool.redis, redis.cluster.RedisCluster)


@pytest.mark.parametrize("name", ["alpha", "beta", "gamma", "delta"])  # pools on various nodes
def test_every_script_runs_unchanged_on_the_cluster(cluster, name):
    pool, other = make_pool(cluster, name), make_pool(cluster, name)
    assert [p.pick().port for p in (pool, other, pool, other)] == [9001, 9002, 9003, 9001]
    pool.report(Outcome(pool.backends[1], 0.01, status=500))  # blocks it
    status = other.status()
    assert status["backends"][1]["blocked"] and status["backends"][1]["requests"] == 1
    assert 9002 not in [other.pick().port for _ in range(4)]
    assert pool.hold_checker("me", 5) and not other.hold_checker("you", 5)
    member = Member(parse_backends("http://127.0.0.1:9004")[0])
    pool.change(lambda members: ("put", member.id, member.to_json()))
    assert 9004 in [other.pick().port for _ in range(6)]
    pool.reset(pool.backends[1])
    assert not other.status()["backends"][1]["blocked"]
    # All of a pool's keys sit in one slot, on one node.
    client = pool.redis
    keys = client.keys(f"lb:{{{name}}}:*", target_nodes=redis.cluster.RedisCluster.ALL_NODES)
    assert len(keys) >= 5 and len({client.keyslot(key) for key in keys}) == 1


def test_the_balancer_runs_on_the_cluster(cluster, tmp_path):
    echoes = [start_echo(i, tmp_path) for i in range(3)]
    proc, url, admin = start_balancer([u for _, u in echoes], cluster, tmp_path, workers=2)
    try:
        results = fire(url, 60, 6, "POST")
        status = __import__("requests").get(f"{admin}/status", timeout=5).json()
        assert_shares({b["id"]: b["requests"] for b in status["backends"]},
                      {u.removeprefix("http://"): 20 for _, u in echoes}, admin)
    finally:
        proc.stop()
        for p, _ in echoes:
            p.stop()
    assert all(r.status == 200 and r.body_ok for r in results)
    assert status["redis"]["reachable"] and status["mode"] == "shared"
