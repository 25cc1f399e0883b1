"""The spine against a real nats-server and PostgreSQL: fold, fencing, outbox, bad input."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import nats.errors
import pytest
from nats.js import JetStreamContext

from events.bus import Publisher, connect, read_stream
from events.feed import ConsumerGone
from events.subjects import CMD_STREAM, EVT_STREAM, JOB_STREAM, partition_of
from events.topology import Topology, ensure_topology
from orchestrator.fold import fold_message
from orchestrator.partition import PartitionWorker, WorkerConfig
from orchestrator.replica import Replica, ReplicaConfig
from orchestrator.store import Batch, Fenced, Store
from schemas.codec import CommandError, command_from_dict
from schemas.jobs import Job
from schemas.specs import InstanceSpec
from tests.conftest import PARTITIONS, Env, eventually, settled

HOSTS = [("admin", dict(type="RegisterHost", cmd_id=f"reg-h{i}", id=f"h{i}", vcpus=64,
                        memory_mib=262144)) for i in range(2)]


def cmd(source: str, **fields: object) -> tuple[str, object]:
    fields.setdefault("cmd_id", f"{fields['type']}-{fields['id']}")
    return source, command_from_dict(fields)


@contextlib.asynccontextmanager
async def replica(env: Env, name: str = "r1", **kw: Any) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(
        Replica(ReplicaConfig(env.nats_url, env.pg_dsn, replica_id=name, tick_s=0.2,
                              **kw)).run(stop))
    try:
        yield task
    finally:
        stop.set()
        _, pending = await asyncio.wait({task}, timeout=20)
        if pending:  # let the test fail, not hang
            task.cancel()
            raise AssertionError("the replica did not stop within 20 s of its stop event")
        task.result()


async def test_fold_places_instance_and_emits_job_and_timeline(env: Env, js, pg) -> None:
    pub = Publisher(js)
    await pub.publish_many([cmd(s, **c) for s, c in HOSTS])
    async with replica(env):
        # The scheduler learns of both hosts before any placement is asked of it.
        await eventually(lambda: pg.fetchval(
            "SELECT count(*) = 2 FROM history WHERE kind = 'scheduler'"))
        await pub.publish_many([
            cmd("user", type="CreateNetwork", id="net1", vni=7, cidr="10.7.0.0/24"),
            cmd("user", type="CreateInstance", id="vm1", template=dict(
                vcpus=2, memory_mib=2048, image="debian", nics=[dict(network="net1")])),
        ])
        await eventually(lambda: settled(pg, js))
        vm = msgspec.json.decode(await pg.fetchval(
            "SELECT state FROM entities WHERE kind='instance' AND id='vm1'"))
        assert vm["status"] == "placed" and vm["host"] in ("h0", "h1")
        assert vm["generation"] == 1
        net = msgspec.json.decode(await pg.fetchval(
            "SELECT state FROM entities WHERE kind='network' AND id='net1'"))
        assert [(p["instance"], p["ip"], p["host"]) for p in net["ports"]] == [
            ("vm1", "10.7.0.2", vm["host"])]
        # The jobs carry the full desired spec to the chosen host: the instance, with its
        # NIC resolved, and the network's segment there.
        jobs = {m.subject: m async for batch in read_stream(js, JOB_STREAM, "job.>") for m in batch}
        assert sorted(jobs) == [f"job.{vm['host']}.instance.vm1", f"job.{vm['host']}.network.net1"]
        job = msgspec.json.decode(jobs[f"job.{vm['host']}.instance.vm1"].data,
                                  type=Job[InstanceSpec])
        assert job.generation == 1 and job.spec is not None
        assert job.spec.template.memory_mib == 2048 and job.spec.power == "running"
        assert [(n.network, n.vni, n.ip) for n in job.spec.nics] == [("net1", 7, "10.7.0.2")]
        # Its timeline: created by the user, addressed by its network, then placed by the
        # scheduler's answer.
        types = [msgspec.json.decode(m.data)["type"]
                 async for batch in read_stream(js, EVT_STREAM, "evt.instance.vm1")
                 for m in batch]
        assert types == ["CreateInstance", "NicAddressed", "Placed"]


async def test_duplicate_publish_is_stored_once(js) -> None:
    pub = Publisher(js)
    source, command = cmd("user", type="CreateNetwork", id="n1", vni=1, cidr="10.1.0.0/24")
    first = await pub.publish(source, command)
    again = await pub.publish(source, command)
    assert again.duplicate and again.seq == first.seq
    assert (await js.stream_info(CMD_STREAM)).state.messages == 1


async def test_an_idempotency_key_dedupes_per_source_and_entity(js: JetStreamContext) -> None:
    """Clients pick keys on their own: the same key elsewhere is another command."""
    pub = Publisher(js)
    same_key = [
        cmd("user", type="CreateNetwork", id="n1", vni=1, cidr="10.1.0.0/24", cmd_id="k"),
        cmd("user", type="CreateNetwork", id="n2", vni=2, cidr="10.2.0.0/24", cmd_id="k"),
        cmd("admin", type="CreateNetwork", id="n1", vni=1, cidr="10.1.0.0/24", cmd_id="k"),
        # What the fold sends as n1's follow-up is keyed fx-...: a user's fx- key is not it.
        cmd("user", type="DeleteNetwork", id="n1", cmd_id="fx-1-0"),
    ]
    first = await pub.publish_many(same_key)
    assert [p.duplicate for p in first] == [False] * len(same_key)
    again = await pub.publish_many(same_key)
    assert [p.duplicate for p in again] == [True] * len(same_key)
    assert [p.seq for p in again] == [p.seq for p in first]
    assert (await js.stream_info(CMD_STREAM)).state.messages == len(same_key)


async def test_follow_up_keys_are_the_folds_own(js: JetStreamContext) -> None:
    """Another system publisher's fx- key could shadow a follow-up command of the fold."""
    source, command = cmd("system", type="DeleteNetwork", id="n1", cmd_id="fx-1-0")
    with pytest.raises(CommandError, match="fold's own"):
        await Publisher(js).publish(source, command)
    assert (await js.stream_info(CMD_STREAM)).state.messages == 0


async def test_stale_owner_is_fenced_and_stops_receiving(env: Env, js, store: Store, pg) -> None:
    """Two replicas fighting over one partition: only the current epoch commits."""
    old = (await store.claim("a", 30.0, PARTITIONS))[0]
    # a's lease runs out (a paused, say) and b takes the partition over.
    await pg.execute("UPDATE partitions SET lease_until = now() - interval '1s'"
                     " WHERE partition = $1", old.partition)
    new = next(le for le in await store.claim("b", 30.0, PARTITIONS)
               if le.partition == old.partition)
    assert new.epoch == old.epoch + 1
    empty = Batch([], [(1, "network", "x", b"{}")], [], [], checkpoint=1)
    with pytest.raises(Fenced):
        await store.commit("a", old, 0, empty)
    await store.commit("b", new, 0, empty)
    assert await pg.fetchval("SELECT checkpoint FROM partitions WHERE partition = $1",
                             old.partition) == 1
    # On the bus too: the new owner's consumer replaces the old one, which goes silent.
    cfg = WorkerConfig(partitions=PARTITIONS, idle_s=0.2, heartbeat_s=0.3)
    a = PartitionWorker(js, store, "a", old, cfg)
    a_task = asyncio.create_task(a.run())
    await asyncio.sleep(0.5)
    b = PartitionWorker(js, store, "b", new, cfg)
    b_task = asyncio.create_task(b.run())
    try:
        # asyncio.wait, not wait_for: a worker that ignored its cancel could not hang the test.
        await asyncio.wait({a_task}, timeout=10)
        assert a_task.done(), "the stale owner is still running"
        assert isinstance(a_task.exception(), ConsumerGone)
        assert not b_task.done(), "the new owner stopped too"
    finally:
        for task in (a_task, b_task):
            task.cancel()
        _, pending = await asyncio.wait({a_task, b_task}, timeout=10)
        assert not pending, f"workers ignored their cancel: {pending}"


async def test_concurrent_commits_only_one_epoch_wins(store: Store, pg) -> None:
    """Race two commits of different epochs on the same partition row: one is fenced."""
    old = (await store.claim("a", 30.0, 1))[0]
    await pg.execute("UPDATE partitions SET lease_until = now() - interval '1s'"
                     " WHERE partition = $1", old.partition)
    new = (await store.claim("b", 30.0, 1))[0]
    results = await asyncio.gather(
        store.commit("a", old, 0, Batch([], [(5, "network", "x", b"{}")], [], [], 5)),
        store.commit("b", new, 0, Batch([], [(6, "network", "y", b"{}")], [], [], 6)),
        return_exceptions=True,
    )
    assert isinstance(results[0], Fenced) and results[1] is None
    assert await pg.fetchval("SELECT array_agg(seq) FROM history") == [6]


async def test_a_failing_batch_fails_alone_in_a_group_commit(store: Store, pg) -> None:
    """Commits that go together: one that cannot be written does not take the others down."""
    leases = await store.claim("a", 30.0, 3)
    await store.commit("a", leases[0], 0, Batch([], [(1, "network", "x", b"{}")], [], [], 1))
    results = await asyncio.gather(
        # seq 1 is in the history already: this batch breaks the primary key.
        store.commit("a", leases[1], 0, Batch([], [(1, "network", "y", b"{}")], [], [], 1)),
        store.commit("a", leases[2], 0, Batch([], [(2, "network", "z", b"{}")], [], [], 2)),
        return_exceptions=True,
    )
    assert isinstance(results[0], asyncpg.UniqueViolationError) and results[1] is None
    assert await pg.fetchval("SELECT array_agg(seq ORDER BY seq) FROM history") == [1, 2]
    checkpoints = await pg.fetch("SELECT partition, checkpoint FROM partitions"
                                 " WHERE partition = ANY($1) ORDER BY partition",
                                 [le.partition for le in leases])
    assert [r["checkpoint"] for r in checkpoints] == [1, 0, 2]


async def test_outbox_left_by_a_crash_is_relayed_once(env: Env, js, pg) -> None:
    """A crash between commit and publish: the next owner publishes, dedupe keeps it single."""
    pub = Publisher(js)
    await pub.publish_many([cmd(s, **c) for s, c in HOSTS])
    await pub.publish(*cmd("user", type="CreateInstance", id="vm1",
                           template=dict(vcpus=1, memory_mib=512, image="debian")))
    async with replica(env):
        await eventually(lambda: settled(pg, js))
    # Pretend the last owner committed these rows and died before publishing them:
    # one was in fact published already (dedupe must drop it), one never was.
    evt_before = (await js.stream_info(EVT_STREAM)).state.messages
    await pg.execute(
        "INSERT INTO outbox SELECT 0, seq, 0, 'evt.' || kind || '.' || id, 'evt-' || seq,"
        " convert_to(outcome::text, 'utf8') FROM history WHERE seq = 1")
    await pg.execute(
        "INSERT INTO outbox VALUES (0, 999999, 0, 'evt.host.h9', 'evt-999999', '{}'::bytea)")
    async with replica(env, name="r2"):
        await eventually(lambda: pg.fetchval("SELECT count(*) = 0 FROM outbox"))
    assert (await js.stream_info(EVT_STREAM)).state.messages == evt_before + 1


BAD_INPUT = [
    # (subject, payload, expected words in the reason)
    ("cmd.user.instance.vm9", b"\x00\xffgarbage", "not a JSON command"),
    ("cmd.user.instance.vm9", b'{"type":"Reboot","cmd_id":"k1","id":"vm9"}', "unknown command"),
    ("cmd.user.instance.vm9", b'{"type":"CreateInstance","cmd_id":"k2","id":"vm9"}',
     "`template`"),
    ("cmd.user.instance.vm9", b'{"type":"StartInstance","cmd_id":"k3","id":"vm8"}',
     "misaddressed"),
    ("cmd.user.instance.vm9", b'{"type":"StartInstance","cmd_id":"k4","id":"vm 9"}', "$.id"),
    ("cmd.user.instance.vm9", b'{"type":"Applied","cmd_id":"k5","id":"vm9","generation":1,'
     b'"observed":"running"}', "may not come from source 'user'"),
    ("cmd.user.instance.vm9", b'{"type":"RegisterHost","cmd_id":"k6","id":"vm9","vcpus":1,'
     b'"memory_mib":64}', "misaddressed"),
    ("cmd.user.instance.vm9", b'{"type":"StartInstance","cmd_id":"k7","id":"vm9","pad":"'
     + b"x" * 100_000 + b'"}', "exceeds"),
]


async def test_bad_input_is_rejected_and_the_partition_goes_on(env: Env, js, pg) -> None:
    for n, (subject, payload, _) in enumerate(BAD_INPUT):
        await js.publish(subject, payload, headers={"Nats-Msg-Id": f"bad-{n}"})
    # Not even storable: ids with a dot, a wrong source token, a 2 MB payload.
    with pytest.raises(nats.errors.Error):
        await js.publish("cmd.user.instance.vm.9", b"{}")
    with pytest.raises(nats.errors.Error):
        await js.publish("cmd.user.instance.vm9", b"x" * 2_000_000)
    pub = Publisher(js)
    await pub.publish_many([cmd(s, **c) for s, c in HOSTS])
    await pub.publish(*cmd("user", type="CreateInstance", id="vm9",
                           template=dict(vcpus=1, memory_mib=512, image="debian")))
    async with replica(env):
        await eventually(lambda: settled(pg, js))
    rows = await pg.fetch("SELECT seq, outcome FROM history WHERE kind='instance' AND id='vm9'"
                          " ORDER BY seq")
    outcomes = [msgspec.json.decode(r["outcome"]) for r in rows]
    # then CreateInstance and Placed (after a PlacementFailed if the scheduler heard of the
    # instance before the hosts: partitions are folded independently).
    assert len(outcomes) in (len(BAD_INPUT) + 2, len(BAD_INPUT) + 3)
    for outcome, (_, _, words) in zip(outcomes, BAD_INPUT, strict=False):
        assert not outcome["accepted"]
        assert words in outcome["reason"], (words, outcome["reason"])
    # The valid command behind them was folded.
    after = outcomes[len(BAD_INPUT):]
    assert (after[0]["type"], after[0]["accepted"]) == ("CreateInstance", True)
    assert (after[-1]["type"], after[-1]["accepted"]) == ("Placed", True)
    letters = await pg.fetch("SELECT seq, reason FROM dead_letters ORDER BY seq")
    # Everything undecodable or misaddressed is a dead letter too (not the wrong source).
    assert len(letters) == len(BAD_INPUT) - 1
    # And terminated or acknowledged on the bus: nothing is left pending.
    for info in await js.consumers_info(CMD_STREAM):
        assert info.num_ack_pending == 0 and info.num_pending == 0


def test_command_in_a_wrong_partition_is_dead_lettered() -> None:
    """Only the server's transform writes stored subjects; the fold still checks them."""
    right = partition_of("instance", "vm9", PARTITIONS)
    subject = f"cmd.{(right + 1) % PARTITIONS}.user.instance.vm9"
    folded = fold_message({}, subject, b'{"type":"StartInstance","cmd_id":"k","id":"vm9"}',
                          1, 0, PARTITIONS)
    wrong = (right + 1) % PARTITIONS
    assert folded.dead_letter == f"instance/vm9 belongs to partition {right}, not {wrong}"
    assert folded.outcome is None


async def test_a_bounded_state_cache_folds_what_it_forgot_from_the_projection(
        js, store: Store, pg) -> None:
    """States encoded or evicted between batches are read back as committed: the fold sees
    no gap."""
    cfg = WorkerConfig(partitions=PARTITIONS, batch=10, idle_s=0.2, heartbeat_s=0.3, cached=4,
                       decoded=2)
    workers = [PartitionWorker(js, store, "a", lease, cfg)
               for lease in await store.claim("a", 30.0, PARTITIONS)]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    pub = Publisher(js)
    nets = [f"n{i}" for i in range(40)]
    try:
        await pub.publish_many([cmd("user", type="CreateNetwork", id=n, vni=i + 1,
                                    cidr=f"10.{i}.0.0/24") for i, n in enumerate(nets)])
        await eventually(lambda: settled(pg, js))
        # By now most of them were forgotten: a second create must still see the first.
        await pub.publish_many([cmd("user", type="CreateNetwork", id=n, vni=100 + i,
                                    cidr=f"10.{100 + i}.0.0/24", cmd_id=f"again-{n}")
                                for i, n in enumerate(nets)])
        await pub.publish_many([cmd("user", type="DeleteNetwork", id=n) for n in nets])
        await eventually(lambda: settled(pg, js))
        assert all(len(w.states) <= cfg.decoded and len(w.states) + len(w.encoded) <= cfg.cached
                   for w in workers)
        assert not any(t.done() for t in tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=10)
    rows = await pg.fetch("SELECT id, outcome FROM history WHERE kind = 'network' ORDER BY seq")
    by_net: dict[str, list[tuple[str, bool]]] = {}
    for r in rows:
        o = msgspec.json.decode(r["outcome"])
        by_net.setdefault(r["id"], []).append((o["type"], o["accepted"]))
    assert by_net == {n: [("CreateNetwork", True), ("VniGranted", True),
                          ("CreateNetwork", False), ("DeleteNetwork", True)] for n in nets}


async def test_a_replica_refuses_a_projection_folded_from_another_stream(
        env: Env, js, store: Store) -> None:
    """The bus's store was lost or swapped: going on from the old checkpoints would skip
    the new stream's first commands without a word."""
    lease = (await store.claim("a", 30.0, 1))[0]
    await store.commit("a", lease, 0, Batch([], [(5, "network", "x", b"{}")], [], [], 5))
    await store.release("a", lease)
    await Publisher(js).publish(*cmd("user", type="CreateNetwork", id="n1", vni=1,
                                     cidr="10.1.0.0/24"))
    config = ReplicaConfig(env.nats_url, env.pg_dsn, replica_id="r1", tick_s=0.2)
    with pytest.raises(RuntimeError, match="up to seq 5, but the stream ends at 1"):
        await asyncio.wait_for(Replica(config).run(asyncio.Event()), 20)


async def test_processes_racing_to_create_the_streams_agree_on_one(env: Env) -> None:
    """Two processes start on an empty bus at once: the second takes the first's stream,
    and says so clearly if it asked for another shape."""
    nc = await connect(env.nats_url, "racers")
    try:
        # On one connection, both look before either creates: the race, every time.
        js = nc.jetstream()
        results = await asyncio.gather(ensure_topology(js, 4), ensure_topology(js, 16),
                                       return_exceptions=True)
    finally:
        await nc.close()
    [made] = [r for r in results if isinstance(r, Topology)]
    [refused] = [r for r in results if not isinstance(r, Topology)]
    assert isinstance(refused, RuntimeError), refused
    assert str(refused) == (f"stream CMD has {made.partitions} partitions,"
                            f" not {20 - made.partitions}")
