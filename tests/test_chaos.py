"""Crash under load: 10,000 commands, 4 publishers, 2 replicas, one SIGKILLed mid-run."""

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
from collections import defaultdict

import msgspec

from events.bus import Publisher, connect, read_stream
from events.meta import delivery
from events.subjects import CMD_STREAM
from orchestrator.fold import fold_message
from schemas.codec import command_from_dict, encode
from tests.conftest import PARTITIONS, Env, Processes, eventually, settled

HOSTS, NETWORKS, INSTANCES, TOTAL = 10, 100, 890, 10_000


def workload(seed: int = 7) -> list[list[tuple[str, object]]]:
    """The commands of 4 publishers; each entity belongs to one, so its order is its own."""
    rng = random.Random(seed)
    streams: list[list[tuple[str, object]]] = [[] for _ in range(4)]

    def add(entity: int, source: str, **fields: object) -> None:
        fields.setdefault("cmd_id", f"c{sum(map(len, streams))}")
        streams[entity % 4].append((source, command_from_dict(fields)))

    for n in range(NETWORKS):
        add(n, "user", type="CreateNetwork", id=f"n{n}", vni=100 + n, cidr="10.0.0.0/24")
    for i in range(INSTANCES):
        nics = [dict(network=f"n{i % NETWORKS}")] if i % 3 == 0 else []
        add(NETWORKS + i, "user", type="CreateInstance", id=f"i{i}",
            template=dict(vcpus=1, memory_mib=256, image="debian", nics=nics))
    while sum(map(len, streams)) < TOTAL - HOSTS:
        i = rng.randrange(INSTANCES)
        add(NETWORKS + i, "user", type=rng.choice(["StartInstance", "StopInstance"]), id=f"i{i}")
    return streams


async def publish(url: str, items: list[tuple[str, object]]) -> None:
    nc = await connect(url, "publisher")
    try:
        await Publisher(nc.jetstream()).publish_many(items, window=250)
    finally:
        await nc.close()


async def test_sigkill_a_replica_mid_run_loses_and_doubles_nothing(
        env: Env, js, store, pg, processes: Processes) -> None:
    # No agents here: the reconciler must not re-issue the jobs nobody applies.
    orch = ["orchestrator", "--batch", "200", "--deadline", "3600"]
    r1 = processes.orch(*orch, "--id", "r1", env=env.environ(), name="r1")
    processes.orch(*orch, "--id", "r2", env=env.environ(), name="r2")
    pub = Publisher(js)
    await pub.publish_many([("admin", command_from_dict(dict(
        type="RegisterHost", cmd_id=f"h{h}", id=f"h{h}", vcpus=512, memory_mib=1 << 20)))
        for h in range(HOSTS)])
    await eventually(lambda: pg.fetchval(
        f"SELECT count(*) = {HOSTS} FROM history WHERE kind = 'scheduler'"))
    # The two replicas share the partitions before the load starts.
    await eventually(lambda: pg.fetchval(
        "SELECT count(DISTINCT owner) = 2 AND count(owner) = $1 FROM partitions", PARTITIONS))

    publishers = [asyncio.create_task(publish(env.nats_url, s)) for s in workload()]
    # Kill r1 while commands are flowing and it holds partitions.
    await eventually(lambda: pg.fetchval("SELECT count(*) > 2000 FROM history"), timeout=60)
    os.killpg(r1.pid, signal.SIGKILL)
    at_kill = await pg.fetchval("SELECT count(*) FROM history")
    assert at_kill < TOTAL, "the kill came after the run: make the workload bigger"
    assert await pg.fetchval("SELECT count(*) > 0 FROM partitions WHERE owner = 'r1'")
    r1.wait()
    await asyncio.sleep(1.0)
    processes.orch(*orch, "--id", "r1", env=env.environ(), name="r1-again")
    await asyncio.gather(*publishers)
    await eventually(lambda: settled(pg, js), timeout=120, interval=0.5)

    # Every stored command appears exactly once in history (seq is its primary key) ...
    stored = [m async for batch in read_stream(js, CMD_STREAM, "cmd.>") for m in batch]
    seqs = [delivery(m.reply).stream_seq for m in stored]
    assert len(seqs) >= TOTAL
    history = {r["seq"]: r for r in await pg.fetch("SELECT seq, kind, id, outcome FROM history")}
    assert sorted(history) == seqs
    # ... in its entity's timeline, with the outcome of a fold in log order.
    states: dict = {}
    per_entity: dict[tuple[str, str], list[int]] = defaultdict(list)
    for msg, seq in zip(stored, seqs, strict=True):
        folded = fold_message(states, msg.subject, msg.data, seq,
                              delivery(msg.reply).at_ms, PARTITIONS)
        assert folded.outcome is not None
        row = history[seq]
        assert (row["kind"], row["id"]) == folded.key
        assert msgspec.json.decode(row["outcome"]) == msgspec.json.decode(encode(folded.outcome))
        per_entity[folded.key].append(seq)
    timelines: dict[tuple[str, str], list[int]] = defaultdict(list)
    for seq in sorted(history):
        timelines[(history[seq]["kind"], history[seq]["id"])].append(seq)
    assert timelines == per_entity
    # Nothing is left unacknowledged on any partition's consumer.
    consumers = [c for c in await js.consumers_info(CMD_STREAM) if c.name.startswith("fold-")]
    assert len(consumers) == PARTITIONS
    assert all(c.num_ack_pending == 0 and c.num_pending == 0 for c in consumers)
    # The killed replica came back and holds a share again.
    await eventually(lambda: pg.fetchval(
        "SELECT count(*) > 0 FROM partitions WHERE owner = 'r1'"), timeout=30)
    # And replaying the log reproduces the live projection.
    verify = subprocess.run([sys.executable, "-m", "orchestrator.cli", "replay", "--verify"],
                            env=env.environ(), capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr


async def test_a_restarted_nats_server_loses_the_fold_consumers_and_the_fold_goes_on(
        env: Env, js, store, pg, processes: Processes) -> None:
    """The fold's consumers live in the server's memory: a restart takes them away. The
    workers hear no more heartbeats, give their partitions up and open them again from the
    checkpoint, so every command is still folded once."""
    orch = ["orchestrator", "--batch", "200", "--deadline", "3600"]
    processes.orch(*orch, "--id", "r1", env=env.environ(), name="r1")
    await eventually(lambda: pg.fetchval(
        "SELECT count(owner) = $1 FROM partitions", PARTITIONS))
    creates = [("user", command_from_dict(dict(
        type="CreateNetwork", cmd_id=f"n{n}", id=f"n{n}", vni=100 + n, cidr="10.0.0.0/24")))
        for n in range(600)]
    await Publisher(js).publish_many(creates[:300])
    await eventually(lambda: settled(pg, js))
    epochs = await pg.fetchval("SELECT sum(epoch) FROM partitions")

    env.nats.stop()
    env.nats.start()
    await Publisher(js).publish_many(creates[300:])  # retried until the client is back
    await eventually(lambda: settled(pg, js), timeout=60, interval=0.5)

    # Each create, its VNI's reservation and the grant: once each.
    assert await pg.fetchval("SELECT count(*) FROM history") == 3 * 600
    assert await pg.fetchval("SELECT count(*) FROM entities WHERE kind = 'network'"
                             " AND state->>'status' = 'active'") == 600
    # Every partition was opened again, under a new epoch, with a consumer of its own.
    assert await pg.fetchval("SELECT sum(epoch) FROM partitions") >= epochs + PARTITIONS
    consumers = [c for c in await js.consumers_info(CMD_STREAM) if c.name.startswith("fold-")]
    assert len(consumers) == PARTITIONS
    # The replica's log stays JSON lines through it: the connection's loss and return are
    # structured events, not nats-py's tracebacks.
    lines = processes.log_path("r1").read_text().splitlines()
    events = [json.loads(line)["event"] for line in lines]  # a traceback line fails here
    assert "nats_disconnected" in events and "nats_reconnected" in events
