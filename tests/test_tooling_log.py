"""`orch log`: the whole log across entities, filtered, and followed live, against a real
nats-server and PostgreSQL."""

import asyncio
import datetime
import json

import asyncpg
from conftest import Env, Processes, eventually, settled
from nats.js import JetStreamContext
from test_cli import ORCH, orch, read_line, stop

TINY = {"vcpus": 1, "memory_mib": 128, "image": "tiny"}


async def test_log_filters(env: Env, js: JetStreamContext, pg: asyncpg.Connection,
                           processes: Processes) -> None:
    environ = env.environ()
    processes.orch("orchestrator", "--id", "r1", "--deadline", "3600", env=environ, name="r1")
    lines = "".join(json.dumps(d) + "\n" for d in [
        {"type": "CreateNetwork", "id": "net1", "vni": 3, "cidr": "10.3.0.0/24"},
        {"type": "CreateInstance", "id": "vm1", "template": TINY},
        {"type": "DeleteNetwork", "id": "ghost"},
        {"type": "StopInstance", "id": "vm1"}])
    done = await orch(environ, "publish", "-f", "-", "--json-out", stdin=lines)
    seqs = [json.loads(line)["seq"] for line in done.stdout.splitlines()]
    await eventually(lambda: settled(pg, js))

    async def logged(*args: str) -> list[dict]:
        done = await orch(environ, "log", "--json", *args)
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]

    everything = await logged()
    assert [o["seq"] for o in everything] == sorted(o["seq"] for o in everything)
    total = await pg.fetchval("SELECT count(*) FROM history")
    assert len(everything) == total >= 6  # with the follow-ups: ReserveVni, VniGranted, ...
    assert {(o["kind"], o["type"]) for o in await logged("--kind", "instance")} == {
        ("instance", "CreateInstance"), ("instance", "PlacementFailed"),
        ("instance", "StopInstance")}
    assert {o["source"] for o in await logged("--source", "system")} == {"system"}
    assert [(o["type"], o["id"]) for o in await logged("--rejected")] == [
        ("DeleteNetwork", "ghost")]
    assert [o["seq"] for o in await logged("--type", "StopInstance")] == [seqs[3]]
    assert [o["seq"] for o in await logged("--since", str(seqs[2]), "--kind", "network",
                                           "--type", "DeleteNetwork")] == [seqs[2]]
    assert len(await logged("--limit", "2")) == 2
    assert (await logged("--limit", "1"))[0]["seq"] == everything[-1]["seq"]

    done = await orch(environ, "log", "--kind", "network")
    assert done.returncode == 0, done.stderr
    assert all("network/" in line for line in done.stdout.splitlines())
    assert "network/ghost" in done.stdout and "REJECTED no network ghost" in done.stdout


async def test_log_follow_shows_new_commands_of_its_kind_only(
        env: Env, js: JetStreamContext, pg: asyncpg.Connection, processes: Processes) -> None:
    environ = env.environ()
    processes.orch("orchestrator", "--id", "r1", "--deadline", "3600", env=environ, name="r1")
    done = await orch(environ, "publish", "CreateInstance", "old", "--json",
                      json.dumps({"template": TINY}), "--wait")
    assert done.returncode == 0, done.stderr
    follower = await asyncio.create_subprocess_exec(
        *ORCH, "log", "--follow", "--kind", "instance", "--json", "--since",
        datetime.datetime.now(datetime.UTC).isoformat(),
        env=environ, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True)
    try:
        await asyncio.sleep(1.0)  # let it reach the follow phase
        assert follower.returncode is None
        lines = "".join(json.dumps(d) + "\n" for d in [
            {"type": "CreateNetwork", "id": "net1", "vni": 4, "cidr": "10.4.0.0/24"},
            {"type": "CreateInstance", "id": "vm1", "template": TINY},
            {"type": "DeleteNetwork", "id": "net1"},
            {"type": "StopInstance", "id": "vm1"},
            {"type": "DeleteInstance", "id": "vm1"}])
        done = await orch(environ, "publish", "-f", "-", stdin=lines)
        assert done.returncode == 0, done.stderr
        seen = []
        while not any(o["type"] == "DeleteInstance" for o in seen):
            seen.append(json.loads(await read_line(follower)))
        await eventually(lambda: settled(pg, js))
        await asyncio.sleep(0.5)  # anything else it would print has been relayed by now
        assert {o["kind"] for o in seen} == {"instance"}
        assert {o["id"] for o in seen} == {"vm1"}  # not `old`, from before it started
        assert [o["type"] for o in seen if o["source"] == "user"] == [
            "CreateInstance", "StopInstance", "DeleteInstance"]
        assert len({o["seq"] for o in seen}) == len(seen)
        follower.terminate()
        assert await asyncio.wait_for(follower.wait(), 10) == 0
    finally:
        stop(follower)
        await follower.wait()
