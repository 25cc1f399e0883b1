"""Snapshots of the projection, on a real nats-server and PostgreSQL: taken while the fold
runs, a replay's starting point that reproduces the full replay, checked by --verify, and
taken by the leader on its schedule."""

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import pytest
from conftest import PARTITIONS, Env, eventually, settled
from nats.js import JetStreamContext

from events.bus import Publisher
from events.subjects import CMD_STREAM, partition_of
from orchestrator import snapshots
from orchestrator.replay import replay
from orchestrator.replica import Replica, ReplicaConfig
from schemas.codec import command_from_dict

VM = {"vcpus": 1, "memory_mib": 256, "image": "debian-12", "nics": [{"network": "net1"}]}


def cmd(source: str, **fields: Any) -> tuple[str, Any]:
    return source, command_from_dict(fields)


def world(instances: int) -> list[tuple[str, Any]]:
    return [
        cmd("admin", type="RegisterHost", cmd_id="reg-h1", id="h1", vcpus=512,
            memory_mib=1 << 20),
        cmd("user", type="CreateNetwork", cmd_id="net1", id="net1", vni=7,
            cidr="10.7.0.0/16"),
        *(cmd("user", type="CreateInstance", cmd_id=f"create-vm{i}", id=f"vm{i}", template=VM)
          for i in range(instances)),
    ]


def toggles(instances: int, rounds: int, tag: str) -> list[tuple[str, Any]]:
    return [cmd("user", type="StopInstance" if r % 2 == 0 else "StartInstance",
                cmd_id=f"{tag}-{r}-{i}", id=f"vm{i}")
            for r in range(rounds) for i in range(instances)]


@contextlib.asynccontextmanager
async def replica(env: Env, **kw: Any) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(Replica(ReplicaConfig(
        env.nats_url, env.pg_dsn, replica_id="r1", tick_s=0.2, **kw)).run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def projection(pg: asyncpg.Connection, schema: str = "public") -> dict[tuple, Any]:
    return {(r["kind"], r["id"]): msgspec.json.decode(r["state"]) for r in await pg.fetch(
        f"SELECT kind, id, state FROM {schema}.entities")}


async def commands_after(pg: asyncpg.Connection, snapshot: snapshots.Snapshot) -> int:
    """The commands a replay from the snapshot folds: those after their partition's
    checkpoint (every command here has an entity, so each has its history row)."""
    return sum(r["seq"] > snapshot.checkpoints[partition_of(r["kind"], r["id"], PARTITIONS)]
               for r in await pg.fetch("SELECT seq, kind, id FROM history"))


async def test_snapshots_taken_while_folding_are_replays_starting_points(
        env: Env, js: JetStreamContext, pg: asyncpg.Connection) -> None:
    pub = Publisher(js)
    taken: list[snapshots.Snapshot] = []
    async with replica(env, snapshot_every_s=None):
        await pub.publish_many(world(30))
        await eventually(lambda: settled(pg, js))
        taken.append(await snapshots.take(pg, keep=100))
        # Snapshots while commands are still on their way to the fold, until one holds
        # less than the log had when it was taken: the fold went on around it.
        mid_fold = False
        for chunk in range(40):
            await pub.publish_many(toggles(30, 10, f"c{chunk}"))
            stored = (await js.stream_info(CMD_STREAM)).state.last_seq
            taken.append(await snapshots.take(pg, keep=100))
            if taken[-1].upto < stored:
                mid_fold = True
                break
        assert mid_fold, "every snapshot was taken with the fold caught up"
        await pub.publish_many(toggles(30, 3, "after"))
        await eventually(lambda: settled(pg, js))
    live = await projection(pg)
    snapshot = taken[-1]
    assert snapshot.entities == len(await pg.fetch(
        "SELECT 1 FROM snapshot_entities WHERE snapshot = $1", snapshot.id)) > 30
    assert await snapshots.newest(pg) == snapshot

    # From the newest snapshot to the end: the live projection, from a fraction of the log.
    report = await replay(env.nats_url, env.pg_dsn, PARTITIONS, schema="from_snap",
                          from_snapshot=True)
    assert report.snapshot == snapshot
    assert report.commands == await commands_after(pg, snapshot)
    assert 0 < report.commands < (await js.stream_info(CMD_STREAM)).state.messages
    assert await projection(pg, "from_snap") == live
    assert report.entities == len(live)

    # To a point: the newest snapshot before it, and the full replay's result there.
    point = snapshot.upto + 1
    full = await replay(env.nats_url, env.pg_dsn, PARTITIONS, schema="full_to", to_seq=point)
    part = await replay(env.nats_url, env.pg_dsn, PARTITIONS, schema="snap_to", to_seq=point,
                        from_snapshot=True)
    assert part.snapshot is not None and part.snapshot.upto <= point
    assert part.commands < full.commands
    assert await projection(pg, "snap_to") == await projection(pg, "full_to")
    with pytest.raises(ValueError, match=r"no snapshot of this code .* up to seq 1:"):
        await replay(env.nats_url, env.pg_dsn, PARTITIONS, schema="none", to_seq=1,
                     from_snapshot=True)

    # --verify reproduces every snapshot at its own checkpoints...
    report = await replay(env.nats_url, env.pg_dsn, PARTITIONS, schema="verify", verify=True)
    assert not report.differs
    assert report.snapshots == {s.id: [] for s in taken}

    # ... and names what one holds that this code does not fold: a state changed, a row
    # that should not be there.
    await pg.execute(
        "UPDATE snapshot_entities SET state = jsonb_set(state, '{power}', '\"paused\"')"
        " WHERE snapshot = $1 AND kind = 'instance' AND id = 'vm3'", taken[0].id)
    await pg.execute(
        "INSERT INTO snapshot_entities SELECT snapshot, kind, 'ghost', state, last_seq"
        " FROM snapshot_entities WHERE snapshot = $1 AND kind = 'instance' AND id = 'vm4'",
        snapshot.id)
    report = await replay(env.nats_url, env.pg_dsn, PARTITIONS, schema="verify", verify=True)
    assert not report.differs  # the live projection is right
    assert report.snapshots[taken[0].id] == [("instance", "vm3")]
    assert report.snapshots[snapshot.id] == [("instance", "ghost")]

    # A snapshot folded by other code is never a starting point.
    await pg.execute("UPDATE snapshots SET code = 'other'")
    assert await snapshots.newest(pg) is None
    with pytest.raises(ValueError, match=f"no snapshot of this code \\({snapshots.CODE_VERSION}"):
        await replay(env.nats_url, env.pg_dsn, PARTITIONS, schema="none", from_snapshot=True)


async def test_the_leader_snapshots_on_its_schedule_and_keeps_the_newest(
        env: Env, js: JetStreamContext, pg: asyncpg.Connection) -> None:
    pub = Publisher(js)

    async def listed() -> list[snapshots.Snapshot]:
        return await snapshots.listed(pg)

    async with replica(env, snapshot_every_s=0.3, snapshot_keep=2):
        # Nothing folded yet: nothing to snapshot.
        await asyncio.sleep(1.0)
        assert await listed() == []
        await pub.publish_many(world(5))
        for round_ in range(3):
            if round_:
                await pub.publish_many(toggles(5, 1, f"r{round_}"))
            await eventually(lambda: settled(pg, js))
            ups = (await js.stream_info(CMD_STREAM)).state.last_seq

            async def caught_up(upto: int = ups) -> bool:
                return bool(kept := await listed()) and kept[-1].upto == upto

            # One snapshot holds everything folded, within a period or two...
            await eventually(caught_up)
            # ... and with nothing new folded, none follows, however many periods pass.
            before = await listed()
            await asyncio.sleep(1.5)
            assert await listed() == before
    kept = await listed()
    assert len(kept) == 2 and kept[-1].upto == ups
    assert {r["snapshot"] for r in await pg.fetch(
        "SELECT DISTINCT snapshot FROM snapshot_entities")} == {s.id for s in kept}
    assert kept[-1].entities == len(await projection(pg))


async def orch(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "orchestrator.cli", *args], env=env.environ(),
        capture_output=True, text=True, timeout=60)


async def test_cli_snapshot_list_and_replay_from_it(
        env: Env, js: JetStreamContext, pg: asyncpg.Connection) -> None:
    done = await orch(env, "replay", "--from-snapshot")
    assert done.returncode == 1
    assert done.stderr.startswith("error: no snapshot of this code")
    done = await orch(env, "replay", "--from-snapshot", "--verify")
    assert done.returncode == 2 and "--verify folds the whole log" in done.stderr

    pub = Publisher(js)
    async with replica(env, snapshot_every_s=None):
        await pub.publish_many(world(4))
        await eventually(lambda: settled(pg, js))
        done = await orch(env, "snapshot", "--json")
        assert done.returncode == 0, done.stderr
        taken = json.loads(done.stdout)
        assert taken["entities"] == len(await projection(pg))
        assert taken["current_code"] is True
        await pub.publish_many(toggles(4, 2, "t"))
        await eventually(lambda: settled(pg, js))

    done = await orch(env, "snapshots")
    assert done.returncode == 0, done.stderr
    assert f"{taken['id']}" in done.stdout and snapshots.CODE_VERSION in done.stdout
    done = await orch(env, "replay", "--from-snapshot", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["snapshot"]["id"] == taken["id"]
    assert report["commands"] == 8  # the toggles, and nothing before the snapshot
    assert await projection(pg, "replay") == await projection(pg)
    done = await orch(env, "replay", "--verify")
    assert done.returncode == 0, done.stdout
    assert f"snapshot {taken['id']}: reproduced" in done.stdout
