"""`orch trace`: the tree of what one command caused, against a real nats-server and
PostgreSQL, a replica and a (test:///) agent."""

import json

import asyncpg
from conftest import Env, Processes, eventually, settled
from nats.js import JetStreamContext
from test_cli import orch
from test_tooling_wait import TINY, _beating, _nodes, register

from orchestrator.trace import follow_up_parent


def parents(node: dict, parent: dict | None = None) -> list[tuple[dict, dict | None]]:
    out = [(node, parent)]
    for child in node.get("children", ()):
        out.extend(parents(child, node))
    return out


def check_parents(tree: dict) -> None:
    """Every follow-up hangs under the command its key names, every report under the job
    of its host on its entity, every job under the command of its entity."""
    for node, parent in parents(tree):
        if parent is None:
            continue
        if "cmd_id" in node and follow_up_parent(node["cmd_id"]) is not None:
            assert follow_up_parent(node["cmd_id"]) == parent["seq"], (node, parent)
        elif "cmd_id" in node:  # a report or a re-issue: under its job
            assert parent["job"] == f"job.{parent['host']}.{node['kind']}.{node['id']}"
            assert node["cmd_id"].endswith(f"-{parent['generation']}-{parent['attempt']}")
        if "job" in node:
            assert (node["kind"], node["id"]) == (parent["kind"], parent["id"]), node
        if "seq" in node:
            assert node["latency_ms"] >= 0


async def test_trace_of_a_pool_behind_a_load_balancer(
        env: Env, js: JetStreamContext, pg: asyncpg.Connection, processes: Processes) -> None:
    environ = env.environ()
    processes.orch("orchestrator", "--id", "r1", "--deadline", "3600", env=environ, name="r1")
    processes.orch("agent", "--host", "h1", "--libvirt", "test", env=environ, name="agent-h1")
    await eventually(lambda: _beating(js, "h1"), timeout=60)
    await register(environ, "h1")

    async def published(*args: str) -> int:
        done = await orch(environ, "publish", *args, "--wait", "applied", "--timeout", "60",
                          "--json-out")
        assert done.returncode in (0, 1), done.stderr
        return json.loads(done.stdout)["seq"]

    async def traced(ref: str | int) -> dict:
        done = await orch(environ, "trace", str(ref), "--json")
        assert done.returncode == 0, done.stderr
        tree = json.loads(done.stdout)
        check_parents(tree)
        return tree

    pool = await published("CreatePool", "p1", "--json", json.dumps(
        {"template": TINY, "size": 2}))
    lb = await published("CreateLoadBalancer", "lb1", "--json", json.dumps(
        {"vip": "10.0.0.100", "pool": "p1", "services": [{"port": 80, "target_port": 8080}]}))
    scale = await published("ScalePool", "p1", "--set", "size=3")
    orphan = await published("CreateLoadBalancer", "lb0", "--json", json.dumps(
        {"vip": "10.0.0.101", "pool": "nopool", "services": [{"port": 80, "target_port": 80}]}))
    await eventually(lambda: settled(pg, js))

    tree = await traced(pool)
    nodes = _nodes(tree)
    creates = [n for n in nodes if n.get("type") == "CreateInstance"]
    assert sorted(n["id"] for n in creates) == ["p1-0", "p1-1"]
    for member in ("p1-0", "p1-1"):
        assert any(n.get("type") == "Placed" and n["id"] == member for n in nodes)
        jobs = [n for n in nodes if n.get("job") == f"job.h1.instance.{member}"]
        assert jobs and all(j["status"] in ("applied", "superseded") for j in jobs)
        assert any(n.get("type") == "Applied" and n["id"] == member and n["source"] == "h1"
                   for n in nodes)
    assert not any("missing" in n for n in nodes)

    tree = await traced(lb)
    # The balancer asks its pool, which answers it (whatever the commands are called).
    [attach] = [n for n in tree["children"] if n.get("kind") == "pool"]
    assert attach["accepted"] and attach["id"] == "p1"
    assert any((n.get("kind"), n.get("id")) == ("lb", "lb1") for n in _nodes(attach)[1:])

    tree = await traced(scale)
    nodes = _nodes(tree)
    kinds = {(n.get("type"), n.get("id")) for n in tree["children"]}
    assert ("CreateInstance", "p1-2") in kinds
    assert any(n.get("type") == "Applied" and n["id"] == "p1-2" for n in nodes)

    # A follow-up that was rejected shows the rejection in its place.
    tree = await traced(orphan)
    [attach] = [n for n in tree["children"] if n.get("kind") == "pool"]
    assert (attach["id"], attach["accepted"]) == ("nopool", False)
    assert "no pool nopool" in attach["reason"]

    # By cmd id too, and for people: a tree with the reason in its place.
    cmd_id = tree["cmd_id"]
    done = await orch(environ, "trace", cmd_id)
    assert done.returncode == 0, done.stderr
    assert f"{attach['type']} pool/nopool" in done.stdout
    assert "REJECTED no pool nopool" in done.stdout
    done = await orch(environ, "trace", str(pool))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("CreateInstance instance/p1-") == 2
    assert "job job.h1.instance.p1-0" in done.stdout and "Applied instance/p1-0" in done.stdout
