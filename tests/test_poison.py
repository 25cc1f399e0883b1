"""Poison messages on the real bus: raw publishes to the documented subjects.

Each poison message becomes a dead letter with a readable reason (and a rejection in its
entity's timeline when its subject names one), the valid command behind it is folded, and
every message the stream stored is accounted for: stored == folded + dead-lettered. A
replay of the whole log exits 0 and matches the live projection.
"""

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
import nats.errors
import pytest
import structlog
from nats.js import JetStreamContext
from prometheus_client import REGISTRY

from events.bus import Publisher
from events.subjects import CMD_STREAM, partition_of
from events.topology import open_unpartitioned_consumer
from orchestrator import queries
from orchestrator.deciders import DECIDERS
from orchestrator.fold import INTERNAL_ERROR, fold_message
from orchestrator.queries import fold_progress
from orchestrator.replay import replay
from orchestrator.replica import Replica, ReplicaConfig
from schemas.codec import command_from_dict
from schemas.commands import Command
from tests.conftest import PARTITIONS, Env, Processes, eventually, settled

ORCH = [sys.executable, "-m", "orchestrator.cli"]
TEMPLATE = {"vcpus": 1, "memory_mib": 256, "image": "debian-12"}
DEEP = 5_000  # levels of nesting: well under the size limit, past Python's recursion limit


def body(**fields: Any) -> bytes:
    return json.dumps({"cmd_id": "p", "id": "vm1", **fields}).encode()


@dataclass(frozen=True)
class Poison:
    name: str
    subject: str
    data: bytes
    words: str  # in the dead letter's reason
    timeline: bool = True  # the subject names vm1: the rejection is in its timeline


STOP = '{"type":"StopInstance","cmd_id":"p","id":"vm1"'  # a valid command, cut open
POISON = [
    Poison("invalid UTF-8 in a string", "cmd.user.instance.vm1",
           b'{"type":"StopInstance","cmd_id":"k\xff\xfe","id":"vm1"}', "Invalid UTF-8"),
    Poison("invalid UTF-8 in a key", "cmd.user.instance.vm1",
           STOP.encode() + b',"\xc3\x28":1}', "UTF-8"),
    Poison("nested deeply in a field", "cmd.user.instance.vm1",
           (STOP + ',"x":').encode() + b"[" * DEEP + b"]" * DEEP + b"}", "nested too deeply"),
    Poison("nested deeply, the whole document", "cmd.user.instance.vm1",
           b'{"a":' * DEEP + b"1" + b"}" * DEEP, "nested too deeply"),
    Poison("an unknown field (a typo)", "cmd.user.instance.vm1",
           body(type="StopInstance", powr="stopped"), "unknown field `powr`"),
    Poison("an unknown field in a nested object", "cmd.user.instance.vm2",
           body(type="CreateInstance", id="vm2", template={**TEMPLATE, "gpu": 1}),
           "unknown field `gpu` - at `$.template`", timeline=False),
    Poison("a key given twice", "cmd.user.instance.vm1",
           (STOP + ',"id":"vm1"}').encode(), "duplicate field `id`"),
    Poison("version 0", "cmd.user.instance.vm1", body(type="StopInstance", v=0), "`$.v`"),
    Poison("a version that does not exist", "cmd.user.instance.vm1",
           body(type="StopInstance", v=99), "no version 99"),
    Poison("a version that is a string", "cmd.user.instance.vm1",
           body(type="StopInstance", v="1"), "`$.v`"),
    Poison("a version that is a boolean", "cmd.user.instance.vm1",
           body(type="StopInstance", v=True), "`$.v`"),
    Poison("NaN", "cmd.h1.instance.vm1",
           body(type="Failed", generation=float("nan"), error="x"), "malformed"),
    Poison("1e400", "cmd.h1.instance.vm1",
           (STOP.replace("StopInstance", "Failed") + ',"generation":1e400,"error":"x"}')
           .encode(), "out of range"),
    Poison("a huge integer", "cmd.h1.instance.vm1",
           body(type="Failed", generation=10**30, error="x"), "<= 9223372036854775807"),
    Poison("a wrong type", "cmd.user.instance.vm1", body(type="StopInstance", cmd_id=5),
           "`$.cmd_id`"),
    Poison("a NUL in free text", "cmd.h1.instance.vm1",
           body(type="Failed", generation=0, error="a\x00b"), "`$.error`"),
    Poison("a NUL in the type", "cmd.user.instance.vm1", body(type="\x00"),
           "unknown command type '\\x00'"),
    Poison("a NUL in an unknown field's name", "cmd.user.instance.vm1",
           body(type="StopInstance", **{"a\x00": 1}), "unknown field `a\\x00`"),
    Poison("garbage", "cmd.user.instance.vm1", b"\x00\xff garbage", "not a JSON command"),
    Poison("an upper-case source", "cmd.USER.instance.vm1", body(type="StopInstance"),
           "invalid source 'USER'", timeline=False),
    Poison("an upper-case id", "cmd.user.instance.VM1", body(type="StopInstance"),
           "invalid id 'VM1'", timeline=False),
]
# Stored as published, without a partition: no partition's consumer takes these.
UNPARTITIONED = [
    Poison("a wildcard where the id belongs", "cmd.user.instance.*",
           body(type="StopInstance"), "wildcard token", timeline=False),
    Poison("a full wildcard where the id belongs", "cmd.user.instance.>",
           body(type="StopInstance"), "wildcard token", timeline=False),
    Poison("a wildcard where the kind belongs", "cmd.user.*.vm1",
           body(type="StopInstance"), "wildcard token", timeline=False),
    Poison("a full wildcard where the source belongs", "cmd.>.instance.vm1",
           body(type="StopInstance"), "wildcard token", timeline=False),
    Poison("wildcards only", "cmd.*.*.*", body(type="StopInstance"), "wildcard token",
           timeline=False),
]
# Not even stored: the stream takes cmd.<source>.<kind>.<id>, four non-empty tokens.
NOT_STORED = ["cmd.user.instance", "cmd.user.instance.vm1.x", "cmd.user", "cmd"]


def follow_up(poison: Poison, n: int, running: bool) -> tuple[Command, str]:
    """A valid command folded by the partition that folds ``poison``, and the event it must
    cause: to vm1 (``running`` or not) when that partition folds vm1, else a new instance
    of that partition."""
    tokens = poison.subject.split(".")
    partition = partition_of(tokens[2], tokens[3], PARTITIONS)  # as the stream's transform
    if partition == partition_of("instance", "vm1", PARTITIONS):
        type_ = "StopInstance" if running else "StartInstance"
        return command_from_dict(dict(type=type_, cmd_id=f"ok-{n}", id="vm1")), "PowerSet"
    id_ = next(f"f{n}-{i}" for i in range(1000)
               if partition_of("instance", f"f{n}-{i}", PARTITIONS) == partition)
    return command_from_dict(dict(type="CreateInstance", cmd_id=f"ok-{n}", id=id_,
                                  template=TEMPLATE)), "Created"


async def publish_poison(js: JetStreamContext, poisons: list[Poison]
                         ) -> tuple[dict[int, Poison], dict[int, str]]:
    """vm1 created, then each poison message raw, each followed by a valid command; the
    seqs of the poison, and of the valid commands with the event each must cause."""
    pub = Publisher(js)
    await pub.publish("user", command_from_dict(dict(
        type="CreateInstance", cmd_id="create", id="vm1", template=TEMPLATE)))
    poisoned: dict[int, Poison] = {}
    valid: dict[int, str] = {}
    running = True
    for n, poison in enumerate(poisons):
        ack = await js.publish(poison.subject, poison.data, headers={"Nats-Msg-Id": f"p{n}"})
        poisoned[ack.seq] = poison
        cmd, event = follow_up(poison, n, running)
        running ^= cmd.id == "vm1"
        valid[(await pub.publish("user", cmd)).seq] = event
    return poisoned, valid


async def orch(environ: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, [*ORCH, *args], env=environ,
                                   capture_output=True, text=True, timeout=120)


async def stored(js: JetStreamContext) -> int:
    return (await js.stream_info(CMD_STREAM)).state.messages


async def accounted(pg: asyncpg.Connection, js: JetStreamContext) -> bool:
    """stored == folded + dead-lettered, and nothing left to relay."""
    return await settled(pg, js) and (await fold_progress(pg))[0] == await stored(js)


async def test_each_poison_message_is_dead_lettered_and_the_partition_goes_on(
        env: Env, js: JetStreamContext, pg: asyncpg.Connection, processes: Processes) -> None:
    environ = env.environ()
    poisoned, valid = await publish_poison(js, POISON)
    for subject in NOT_STORED:
        with pytest.raises(nats.errors.Error):
            await js.publish(subject, body(type="StopInstance"), timeout=2)
    assert await stored(js) == 1 + 2 * len(POISON)

    processes.orch("orchestrator", "--id", "r1", env=environ, name="replica")
    await eventually(lambda: accounted(pg, js), timeout=60)

    letters = {r["seq"]: r for r in await pg.fetch("SELECT * FROM dead_letters")}
    timeline = {r["seq"]: msgspec.json.decode(r["outcome"]) for r in await pg.fetch(
        "SELECT seq, outcome FROM history WHERE kind = 'instance' AND id = 'vm1'")}
    for seq, poison in poisoned.items():
        assert seq in letters, f"{poison.name}: no dead letter"
        reason = letters[seq]["reason"]
        assert poison.words in reason, (poison.name, reason)
        assert reason.isprintable() and len(reason) <= 500, (poison.name, reason)
        assert not reason.startswith(INTERNAL_ERROR), (poison.name, reason)
        if poison.timeline:
            outcome = timeline[seq]
            assert (outcome["accepted"], outcome["reason"]) == (False, reason), poison.name
        else:
            assert seq not in timeline, poison.name
    outcomes = {r["seq"]: msgspec.json.decode(r["outcome"]) for r in await pg.fetch(
        "SELECT seq, outcome FROM history WHERE seq = ANY($1)", list(valid))}
    for seq, event in valid.items():
        assert outcomes[seq]["accepted"] and event in outcomes[seq]["events"], outcomes[seq]
    assert set(letters) == set(poisoned)  # and nothing else

    done = await orch(environ, "replay", "--verify", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["verified"] is True and report["commands"] == await stored(js), report


async def test_the_unpartitioned_consumer_takes_what_no_partition_takes(
        js: JetStreamContext) -> None:
    """What events.topology.open_unpartitioned_consumer delivers: every message stored
    without a partition (a `>` token too, which a consumer of one filter misses), and
    nothing else; each one folds to a dead letter."""
    poisoned, _ = await publish_poison(js, UNPARTITIONED)
    name = await open_unpartitioned_consumer(js)
    assert await open_unpartitioned_consumer(js) == name  # idempotent
    sub = await js.pull_subscribe_bind(name, CMD_STREAM)
    msgs = await sub.fetch(100, timeout=5)
    assert [m.metadata.sequence.stream for m in msgs] == sorted(poisoned)
    for msg in msgs:
        f = fold_message({}, msg.subject, msg.data, msg.metadata.sequence.stream, 0,
                         PARTITIONS)
        assert f.key is None and f.dead_letter is not None and "wildcard token" in f.dead_letter
    with pytest.raises(nats.errors.TimeoutError):
        await sub.fetch(1, timeout=1)


async def test_every_stored_message_is_folded_or_dead_lettered(
        env: Env, js: JetStreamContext, pg: asyncpg.Connection, processes: Processes) -> None:
    poisoned, _ = await publish_poison(js, UNPARTITIONED)
    processes.orch("orchestrator", "--id", "r1", env=env.environ(), name="replica")
    await eventually(lambda: accounted(pg, js), timeout=20)
    letters = {r["seq"]: r["reason"] for r in await pg.fetch("SELECT * FROM dead_letters")}
    assert set(letters) == set(poisoned)
    assert all("wildcard token" in reason for reason in letters.values())


def raw_publish(url: str, subject: bytes, data: bytes) -> None:
    """A client that sends whatever bytes it likes as a subject: nats-py would not."""
    host, port = url.removeprefix("nats://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.recv(4096)  # INFO
        sock.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPUB ' + subject
                     + b" " + str(len(data)).encode() + b"\r\n" + data + b"\r\nPING\r\n")
        reply = b""
        while b"PONG" not in reply:
            reply += sock.recv(4096)
        assert b"-ERR" not in reply, reply


@pytest.mark.parametrize("subject", [b"cmd.user.instance.a\x00b", b"cmd.user.instance.\xff"])
async def test_a_subject_of_any_bytes_is_dead_lettered(
        env: Env, js: JetStreamContext, pg: asyncpg.Connection, processes: Processes,
        subject: bytes) -> None:
    raw_publish(env.nats_url, subject, body(type="StopInstance"))
    await Publisher(js).publish("user", command_from_dict(dict(
        type="CreateInstance", cmd_id="create", id="vm1", template=TEMPLATE)))
    processes.orch("orchestrator", "--id", "r1", env=env.environ(), name="replica")
    await eventually(lambda: accounted(pg, js), timeout=20)


# ---- a decider that raises, on the real bus ------------------------------------------
#
# A fake, named as such: no decider bug is known, so one is injected. The replica runs in
# this process, so that it folds with the fake; replay forks its workers from here, so
# that they fold with it too.


class InjectedBug(Exception):
    pass


@contextlib.contextmanager
def stop_instance_is_broken() -> Iterator[None]:
    """instance.evolve updates the state (the power), then raises, on every PowerSet to
    stopped: as a bug would, halfway through."""
    real = DECIDERS["instance"]

    def evolve(state: Any, event: Any) -> Any:
        state = real.evolve(state, event)
        if type(event).__name__ == "PowerSet" and event.power == "stopped":
            raise InjectedBug(f"cannot stop {object()!r}")
        return state

    fake = type("BrokenInstanceDecider", (), {"decide": staticmethod(real.decide),
                                              "evolve": staticmethod(evolve),
                                              "jobs": staticmethod(real.jobs)})
    DECIDERS["instance"] = fake  # type: ignore[assignment]
    try:
        yield
    finally:
        DECIDERS["instance"] = real


@contextlib.asynccontextmanager
async def replica_here(env: Env) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(Replica(ReplicaConfig(env.nats_url, env.pg_dsn,
                                                     replica_id="r1", tick_s=0.2)).run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


def internal_errors(kind: str) -> float:
    return REGISTRY.get_sample_value("orch_internal_errors_total", {"kind": kind}) or 0.0


async def test_a_decider_that_raises_is_an_internal_error_and_an_alert(
        env: Env, js: JetStreamContext, pg: asyncpg.Connection) -> None:
    pub = Publisher(js)
    creates = [("user", command_from_dict(dict(type="CreateInstance", cmd_id=f"c-{i}",
                                               id=f"vm{i}", template=TEMPLATE)))
               for i in range(4)]
    stops = [("user", command_from_dict(dict(type="StopInstance", cmd_id=f"s-{i}",
                                             id=f"vm{i}"))) for i in range(4)]
    starts = [("user", command_from_dict(dict(type="StartInstance", cmd_id=f"r-{i}",
                                              id=f"vm{i}"))) for i in range(4)]
    before = internal_errors("instance")
    with stop_instance_is_broken(), structlog.testing.capture_logs() as logs:
        # Stopped at creation: every instance raises at once, then goes on.
        await pub.publish_many(creates)
        stop_seqs = [r.seq for r in await pub.publish_many(stops)]
        await pub.publish_many(starts)
        async with replica_here(env):
            await eventually(lambda: accounted(pg, js), timeout=60)
        rows = await pg.fetch("SELECT seq, outcome FROM history WHERE seq = ANY($1)",
                              stop_seqs)
        for row in rows:
            outcome = msgspec.json.decode(row["outcome"])
            assert not outcome["accepted"]
            assert outcome["reason"].startswith(
                f"{INTERNAL_ERROR}instance.evolve: InjectedBug: cannot stop <object object>"
                " (tests/test_poison.py:"), outcome["reason"]
        assert len(rows) == 4
        letters = await pg.fetch("SELECT seq, reason FROM dead_letters ORDER BY seq")
        assert [r["seq"] for r in letters] == stop_seqs
        # The state before the bug, not the half-evolved one: running, and started again.
        for i in range(4):
            state = msgspec.json.decode(await pg.fetchval(
                "SELECT state FROM entities WHERE kind = 'instance' AND id = $1", f"vm{i}"))
            assert state["power"] == "running", state
        alerts = [e for e in logs if e["event"] == "alert" and e["log_level"] == "error"]
        assert sorted(e["seq"] for e in alerts) == stop_seqs
        assert internal_errors("instance") - before == 4
        # `orch alerts` lists them, each on its entity.
        listed = [(a.kind, a.id) for a in await queries.alerts(pg)
                  if a.reason.startswith(INTERNAL_ERROR)]
        assert sorted(listed) == [("instance", f"vm{i}") for i in range(4)]
        # Replay folds with the same decider, raises on the same commands, and agrees.
        report = await replay(env.nats_url, env.pg_dsn, PARTITIONS, verify=True)
        assert report.differs == [] and report.dead_letters == 4
