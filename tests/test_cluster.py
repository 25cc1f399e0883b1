"""A three-server NATS cluster with every stream replicated three times: a server is
SIGKILLed while commands flow, and nothing is lost, duplicated or left unconverged."""

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from events.bus import Publisher, connect
from events.subjects import CMD_STREAM, JOB_STREAM
from events.topology import REPLICAS_ENV, ensure_topology
from orchestrator.embedded import NatsCluster, PostgresServer
from orchestrator.store import Store, connect_pg, create_pool
from schemas.codec import command_from_dict
from tests.conftest import PARTITIONS, Env, Processes, eventually, isolated
from tests.test_agents import TINY, agent, converged, instances, inventory, register, start

HOSTS = ("h1", "h2", "h3")


@pytest.fixture
async def cluster(postgres: PostgresServer, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Env]:
    monkeypatch.setenv(REPLICAS_ENV, "3")  # here and in every process the test starts
    async with isolated(postgres, NatsCluster(tmp_path / "nats"), tmp_path) as world:
        yield world


async def replicas_current(js: JetStreamContext, stream: str) -> bool:
    info = await js.stream_info(stream)
    assert info.cluster is not None
    peers = info.cluster.replicas or []
    return len(peers) == 2 and all(p.current for p in peers)


async def test_losing_a_server_loses_no_command(cluster: Env, processes: Processes) -> None:
    assert isinstance(cluster.nats, NatsCluster)
    nc = await connect(cluster.nats_url, "test")
    pool = await create_pool(cluster.pg_dsn)
    pg = await connect_pg(cluster.pg_dsn)
    try:
        js = nc.jetstream()
        await ensure_topology(js, PARTITIONS)
        await Store(pool).migrate(PARTITIONS)
        for stream in (CMD_STREAM, JOB_STREAM):
            assert (await js.stream_info(stream)).config.num_replicas == 3
        start(processes, cluster)
        for host in HOSTS:
            agent(processes, cluster, host)
        await register(js, pg)
        pub = Publisher(js)

        def creates(ids: list[str]) -> list[tuple[str, object]]:
            return [("user", command_from_dict(dict(type="CreateInstance", cmd_id=f"c-{i}",
                                                    id=i, template=TINY))) for i in ids]

        first = [f"vm{n}" for n in range(100)]
        await pub.publish_many(creates(first))
        await eventually(lambda: converged(pg, 100), timeout=60, interval=0.5)

        # SIGKILL the server leading CMD: the stream elects another leader, clients
        # reconnect elsewhere, and publishing carries on through the election.
        info = await js.stream_info(CMD_STREAM)
        assert info.cluster is not None and info.cluster.leader
        victim = cluster.nats.server(info.cluster.leader)
        os.kill(victim.pid, signal.SIGKILL)
        second = [f"vm{n}" for n in range(100, 200)]
        stops = [("user", command_from_dict(dict(type="StopInstance", cmd_id=f"s-{i}", id=i)))
                 for i in first[:50]]
        await pub.publish_many(creates(second) + stops)
        await eventually(lambda: converged(pg, 200), timeout=120, interval=0.5)
        new_leader = (await js.stream_info(CMD_STREAM)).cluster.leader
        assert new_leader not in (None, victim.member.name)

        # Every command folded once: no loss, and no duplicate from the retried publishes.
        twice = await pg.fetch("SELECT outcome->>'cmd_id' AS k FROM history"
                               " GROUP BY 1 HAVING count(*) > 1")
        assert twice == []
        folded = {r["k"] for r in await pg.fetch(
            "SELECT outcome->>'cmd_id' AS k FROM history WHERE kind = 'instance'"
            " AND (outcome->>'cmd_id' LIKE 'c-%' OR outcome->>'cmd_id' LIKE 's-%')"
            " AND (outcome->>'accepted')::boolean")}
        assert folded == {f"c-{i}" for i in first + second} | {f"s-{i}" for i in first[:50]}
        states = await instances(pg)
        for host in HOSTS:
            wanted = {i: s["power"] for i, s in states.items() if s["host"] == host}
            assert await inventory(js, host) == wanted

        # The killed server comes back and catches up with what it missed.
        victim.start()
        cluster.nats.wait_healthy()
        for stream in (CMD_STREAM, JOB_STREAM):
            await eventually(lambda s=stream: replicas_current(js, s), timeout=30)
    finally:
        await pg.close()
        await pool.close()
        await nc.close()
