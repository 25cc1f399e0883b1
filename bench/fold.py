"""Fold throughput benchmark: raw JetStream ceiling, end-to-end fold, and replay.

    .venv/bin/python bench/fold.py [--commands N] [--replay-commands M] [--profile]

One run, one process tree: a private nats-server and PostgreSQL (the embedded Stack) in a
temporary directory, and the orchestrator as one replica in a separate process, so the
benchmark's publisher never shares its event loop. Everything is torn down at exit, on
failure and on Ctrl-C or SIGTERM too.

The replica is `python -m orchestrator.cli orchestrator` when that exists, else (and with
--profile, or --runner inline) this script's own entry, which runs Replica(...).run(stop)
and, between SIGUSR1 and SIGUSR2 from the benchmark, counts batches and profiles.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import importlib.util
import io
import json
import os
import pstats
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import harness
import uvloop
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig
from proctree import proc_stats, tree_cpu_seconds

from events import logs
from events.bus import connect
from events.subjects import (
    CMD_STREAM,
    EVT_STREAM,
    JOB_STREAM,
    command_msg_id,
    command_subject,
    partition_of,
)
from events.topology import ensure_topology
from orchestrator.embedded import Stack, StackInfo
from orchestrator.replay import replay
from orchestrator.store import Span, connect_pg
from schemas.codec import encode
from schemas.commands import (
    Command,
    CreateInstance,
    CreateNetwork,
    RegisterHost,
    StartInstance,
    StopInstance,
)
from schemas.specs import InstanceTemplate, Nic

PARTITIONS = 8
INSTANCES = 1_000
NETWORKS = 20
HOSTS = 10  # 10 x 256 vCPUs: room for every 1-vCPU instance
TOGGLE_SHARE = 0.9  # the rest repeat the current power state: accepted, no event, no job
RAW_PAYLOAD = b"x" * 200  # about the size of an encoded StartInstance
POLL_S = 0.01
SETTLE_TIMEOUT_S = 300.0
REPLICA_STOP_TIMEOUT_S = 20.0
RECONCILE_DEADLINE_S = 3600.0  # no agent applies jobs here: nothing must be re-issued
ROOT = Path(__file__).resolve().parent.parent

Frame = tuple[str, bytes, str | None]  # subject, payload, Nats-Msg-Id


# ---- the orchestrator replica, in its own process ---------------------------------------


def _child_main(nats_url: str, pg_dsn: str, stats_out: str, profile_out: str | None) -> None:
    """Entry of the replica process (``--child-replica``): run until SIGTERM."""
    logs.configure("info")
    uvloop.run(_child_run(nats_url, pg_dsn, TimedPhase(stats_out, profile_out)))


@dataclass
class TimedPhase:
    """In the replica: counts fold batches (and profiles) between SIGUSR1 and SIGUSR2."""

    stats_out: str
    profile_out: str | None
    batches: list[int] = field(default_factory=list)
    timing: bool = False
    profiler: cProfile.Profile | None = None

    def __post_init__(self) -> None:
        if self.profile_out is not None:
            self.profiler = cProfile.Profile()

    def begin(self) -> None:
        self.batches.clear()
        self.timing = True
        if self.profiler is not None:
            self.profiler.enable()

    def end(self) -> None:
        self.timing = False
        if self.profiler is not None:
            self.profiler.disable()

    def count_batches(self) -> None:
        """Wrap the worker's fold step to record the size of every batch it folds."""
        from orchestrator.partition import PartitionWorker

        original = PartitionWorker._fold_and_commit
        phase = self

        async def counted(worker: PartitionWorker, msgs: list, relayed: Span) -> list[tuple]:
            if phase.timing:
                phase.batches.append(len(msgs))
            return await original(worker, msgs, relayed)

        PartitionWorker._fold_and_commit = counted  # type: ignore[method-assign]

    def save(self) -> None:
        self.end()
        Path(self.stats_out).write_text(json.dumps({"batches": self.batches}))
        if self.profiler is not None and self.profile_out is not None:
            self.profiler.dump_stats(self.profile_out)


async def _child_run(nats_url: str, pg_dsn: str, phase: TimedPhase) -> None:
    from orchestrator.replica import Replica, ReplicaConfig

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, phase.begin)
    loop.add_signal_handler(signal.SIGUSR2, phase.end)
    phase.count_batches()
    orphan_watch = asyncio.create_task(_stop_when_orphaned(stop))
    config = ReplicaConfig(nats_url=nats_url, pg_dsn=pg_dsn, replica_id=f"bench-{os.getpid()}")
    if any(f.name == "reconcile" for f in dataclasses.fields(config)):
        from orchestrator.reconciler import ReconcilerConfig

        reconcile = ReconcilerConfig(deadline_s=RECONCILE_DEADLINE_S)
        config = dataclasses.replace(config, reconcile=reconcile)
    try:
        await Replica(config).run(stop)
    finally:
        orphan_watch.cancel()
        phase.save()


async def _stop_when_orphaned(stop: asyncio.Event) -> None:
    """A SIGKILLed benchmark cannot stop us: notice that our parent is gone."""
    parent = os.getppid()
    while not stop.is_set():
        if os.getppid() != parent:
            stop.set()
        await asyncio.sleep(1.0)


class ReplicaProcess:
    """The orchestrator as a child process in its own session, always reaped."""

    def __init__(self, info: StackInfo, workdir: Path, runner: str, profile: bool) -> None:
        self.info, self.runner = info, runner
        self.log_path = workdir / "replica.log"
        self.stats_out = workdir / "replica-stats.json"
        self.profile_out = workdir / "replica.prof" if profile else None
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        if self.runner == "cli":
            # No agent ever applies a job here: keep the reconciler from re-issuing them all.
            return [sys.executable, "-m", "orchestrator.cli", "orchestrator",
                    "--deadline", str(RECONCILE_DEADLINE_S)]
        argv = [sys.executable, str(Path(__file__).resolve()), "--child-replica",
                "--nats-url", self.info.nats_url, "--pg-dsn", self.info.pg_dsn,
                "--stats-out", str(self.stats_out)]
        if self.profile_out is not None:
            argv += ["--profile-out", str(self.profile_out)]
        return argv

    def start(self) -> int:
        env = {**os.environ, "ORCH_NATS_URL": self.info.nats_url,
               "ORCH_PG_DSN": self.info.pg_dsn}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self.proc.pid

    def begin_timing(self) -> None:
        self._send(signal.SIGUSR1)

    def end_timing(self) -> None:
        self._send(signal.SIGUSR2)

    def _send(self, sig: signal.Signals) -> None:
        # Only our own entry handles SIGUSR1/2; by default they would kill the CLI.
        if self.runner == "inline" and self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def batch_sizes(self) -> list[int] | None:
        """Sizes of the batches folded while timing, once the inline replica has exited."""
        try:
            return list(json.loads(self.stats_out.read_text())["batches"])
        except (OSError, ValueError, KeyError):
            return None

    def stop(self) -> None:
        """SIGTERM, as an operator would; SIGKILL to its process group if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(REPLICA_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"orchestrator replica exited with code {self.proc.returncode};"
                               f" {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "\n".join(text.splitlines()[-lines:])


# ---- publishing -------------------------------------------------------------------------


async def publish_frames(js: JetStreamContext, frames: Sequence[Frame]) -> list[int]:
    """Pipelined publish_async of every frame; waits for all acks, returns their seqs."""
    futures = [
        await js.publish_async(s, d, headers={"Nats-Msg-Id": m} if m else None)
        for s, d, m in frames
    ]
    acks = await asyncio.gather(*futures)
    duplicates = sum(1 for a in acks if a.duplicate)
    if duplicates:
        raise RuntimeError(f"{duplicates} publishes were deduplicated: ids are not unique")
    return [a.seq for a in acks]


def command_frames(items: Sequence[tuple[str, Command]]) -> tuple[list[Frame], list[int]]:
    """Encoded frames, ready to publish, and the partition each command lands in."""
    frames: list[Frame] = [
        (command_subject(source, cmd.kind, cmd.id), encode(cmd),
         command_msg_id(source, cmd.kind, cmd.id, cmd.cmd_id))
        for source, cmd in items
    ]
    return frames, [partition_of(cmd.kind, cmd.id, PARTITIONS) for _, cmd in items]


def last_per_partition(partitions: Sequence[int], seqs: Sequence[int]) -> dict[int, int]:
    last: dict[int, int] = {}
    for p, seq in zip(partitions, seqs, strict=True):
        last[p] = max(last.get(p, 0), seq)
    return last


async def publish_commands(js: JetStreamContext, items: Sequence[tuple[str, Command]]
                           ) -> dict[int, int]:
    """Publish commands; return the last stream seq published to each partition."""
    frames, partitions = command_frames(items)
    return last_per_partition(partitions, await publish_frames(js, frames))


# ---- (a) raw ceiling --------------------------------------------------------------------


@dataclass
class RawResult:
    messages: int
    publish_rate: float
    publish_msgid_rate: float
    fetch_ack_rate: float


async def raw_ceiling(js: JetStreamContext, n: int) -> RawResult:
    stream = "BENCH_RAW"
    await js.add_stream(StreamConfig(name=stream, subjects=["bench.>"],
                                     storage=StorageType.FILE))
    try:
        plain = [(f"bench.{i % PARTITIONS}", RAW_PAYLOAD, None) for i in range(n)]
        with_ids = [(f"bench.{i % PARTITIONS}", RAW_PAYLOAD, f"raw-{i}") for i in range(n)]
        plain_s = await timed(publish_frames(js, plain))
        ids_s = await timed(publish_frames(js, with_ids))
        fetch_s = await timed(fetch_and_ack(js, stream, 2 * n))
    finally:
        await js.delete_stream(stream)
    return RawResult(n, n / plain_s, n / ids_s, 2 * n / fetch_s)


async def fetch_and_ack(js: JetStreamContext, stream: str, total: int) -> None:
    config = ConsumerConfig(durable_name="bench-pull", ack_policy=AckPolicy.EXPLICIT,
                            max_ack_pending=10_000)
    sub = await js.pull_subscribe("bench.>", durable="bench-pull", stream=stream,
                                  config=config)
    try:
        seen = 0
        while seen < total:
            msgs = await sub.fetch(500, timeout=5)
            for msg in msgs:
                await msg.ack()
            seen += len(msgs)
    finally:
        await sub.unsubscribe()


async def timed(work: Awaitable[object]) -> float:
    started = time.perf_counter()
    await work
    return time.perf_counter() - started


# ---- (b) the workload -------------------------------------------------------------------


def instance_id(i: int) -> str:
    return f"vm-{i:04d}"


def prime_hosts_and_networks() -> list[tuple[str, Command]]:
    hosts: list[tuple[str, Command]] = [
        ("admin", RegisterHost(cmd_id=f"prime-host-{i}", id=f"host-{i:02d}", vcpus=256,
                               memory_mib=4 * 1024 * 1024))
        for i in range(HOSTS)
    ]
    networks: list[tuple[str, Command]] = [
        ("user", CreateNetwork(cmd_id=f"prime-net-{i}", id=f"net-{i:02d}", vni=100 + i,
                               cidr=f"10.{i}.0.0/16"))
        for i in range(NETWORKS)
    ]
    return hosts + networks


def prime_instances() -> list[tuple[str, Command]]:
    return [
        ("user", CreateInstance(
            cmd_id=f"prime-vm-{i}", id=instance_id(i),
            template=InstanceTemplate(vcpus=1, memory_mib=256, image="ubuntu-24.04",
                                      nics=(Nic(network=f"net-{i % NETWORKS:02d}"),)),
        ))
        for i in range(INSTANCES)
    ]


@dataclass
class PowerMix:
    """Start/Stop commands over the instances, seeded: 90 % change the power state."""

    rng: random.Random = field(default_factory=lambda: random.Random(1))
    running: list[bool] = field(default_factory=lambda: [True] * INSTANCES)
    issued: int = 0

    def take(self, n: int) -> tuple[list[tuple[str, Command]], int]:
        """n commands and how many of them change an instance (each such emits a job)."""
        items: list[tuple[str, Command]] = []
        changes = 0
        for _ in range(n):
            i = self.rng.randrange(INSTANCES)
            if self.rng.random() < TOGGLE_SHARE:
                self.running[i] = not self.running[i]
                changes += 1
            cls = StartInstance if self.running[i] else StopInstance
            items.append(("user", cls(cmd_id=f"power-{self.issued}", id=instance_id(i))))
            self.issued += 1
        return items, changes


# ---- waiting for the projection ---------------------------------------------------------


async def wait_until(what: str, check: Callable[[], Awaitable[bool]], replica: ReplicaProcess,
                     timeout: float = SETTLE_TIMEOUT_S) -> float:
    """Poll check() until it holds; returns the perf_counter time it was first seen true."""
    deadline = time.perf_counter() + timeout
    while not await check():
        replica.check()
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout:.0f} s;"
                               f" replica log:\n{replica.log_tail()}")
        await asyncio.sleep(POLL_S)
    return time.perf_counter()


async def scalar(conn: asyncpg.Connection, sql: str) -> int:
    return int(await conn.fetchval(sql) or 0)


async def outbox_empty(conn: asyncpg.Connection) -> bool:
    return not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM outbox)")


async def caught_up(conn: asyncpg.Connection, last: dict[int, int]) -> bool:
    rows = await conn.fetch("SELECT partition, checkpoint FROM partitions")
    checkpoints = {r["partition"]: r["checkpoint"] for r in rows}
    return all(checkpoints.get(p, 0) >= seq for p, seq in last.items())


async def last_seq(js: JetStreamContext, stream: str) -> int:
    return (await js.stream_info(stream)).state.last_seq


async def wait_replica_ready(conn_dsn: str, replica: ReplicaProcess) -> asyncpg.Connection:
    """The replica migrated the schema and holds every partition: connect and return."""
    deadline = time.perf_counter() + 60
    while True:
        replica.check()
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            conn = await connect_pg(conn_dsn)
            try:
                owned = await scalar(conn, "SELECT count(*) FROM partitions"
                                           " WHERE owner IS NOT NULL")
                if owned == PARTITIONS:
                    return conn
            except asyncpg.PostgresError:
                pass
            await conn.close()
        if time.perf_counter() > deadline:
            raise TimeoutError(f"replica did not take the partitions:\n{replica.log_tail()}")
        await asyncio.sleep(0.1)


async def count_is(conn: asyncpg.Connection, sql: str, expected: int) -> bool:
    return await scalar(conn, sql) >= expected


HOSTS_AND_NETWORKS_SQL = (
    "SELECT (SELECT count(*) FROM entities e, jsonb_object_keys(e.state->'hosts')"
    "        WHERE e.kind = 'scheduler')"
    "     + (SELECT count(*) FROM entities WHERE kind = 'network')"
)
PLACED_AND_JOINED_SQL = (
    "SELECT (SELECT count(*) FROM entities"
    "        WHERE kind = 'instance' AND state->>'status' = 'placed')"
    "     + (SELECT coalesce(sum(jsonb_array_length(state->'ports')), 0) FROM entities"
    "        WHERE kind = 'network')"
)


async def prime(js: JetStreamContext, conn: asyncpg.Connection, replica: ReplicaProcess) -> None:
    """Hosts, networks and 1,000 placed instances, all folded before anything is timed."""
    await publish_commands(js, prime_hosts_and_networks())
    await wait_until("hosts and networks",
                     lambda: count_is(conn, HOSTS_AND_NETWORKS_SQL, HOSTS + NETWORKS), replica)
    await publish_commands(js, prime_instances())
    await wait_until("instances placed and joined",
                     lambda: count_is(conn, PLACED_AND_JOINED_SQL, 2 * INSTANCES), replica)
    await wait_until("outbox drained", lambda: outbox_empty(conn), replica)


@dataclass
class FoldResult:
    commands: int
    changes: int  # commands that changed an instance, so emitted a job
    publish_s: float  # first publish to the last ack
    caught_up_s: float  # every partition's checkpoint covers its last published seq
    emitted_s: float  # every outcome (EVT) and job (JOB) is in its stream
    outbox_s: float  # the outbox table is empty
    history: int
    rejected: int
    others: int  # commands not ours folded meanwhile: the reconciler's, say
    cpu: dict[str, float]  # CPU seconds per process tree from first publish to emitted

    @property
    def seconds(self) -> float:
        return max(self.caught_up_s, self.outbox_s)

    @property
    def rate(self) -> float:
        return self.commands / self.seconds


async def timed_fold(js: JetStreamContext, conn: asyncpg.Connection, replica: ReplicaProcess,
                     mix: PowerMix, n: int, roots: dict[str, int]) -> FoldResult:
    items, changes = mix.take(n)
    frames, partitions = command_frames(items)
    cmd0, evt0, job0 = [await last_seq(js, s) for s in (CMD_STREAM, EVT_STREAM, JOB_STREAM)]

    async def emitted() -> bool:
        return (await last_seq(js, EVT_STREAM) >= evt0 + n
                and await last_seq(js, JOB_STREAM) >= job0 + changes)

    replica.begin_timing()
    cpu0 = cpu_seconds(roots)
    t0 = time.perf_counter()
    seqs = await publish_frames(js, frames)
    t_pub = time.perf_counter()
    last = last_per_partition(partitions, seqs)
    t_caught = await wait_until("projection caught up", lambda: caught_up(conn, last), replica)
    t_emitted = await wait_until("jobs and outcomes emitted", emitted, replica)
    cpu = {k: v - cpu0[k] for k, v in cpu_seconds(roots).items()}
    t_outbox = await wait_until("outbox empty", lambda: outbox_empty(conn), replica)
    replica.end_timing()
    mine = f"seq > {cmd0} AND outcome->>'cmd_id' LIKE 'power-%'"
    history = await scalar(conn, f"SELECT count(*) FROM history WHERE {mine}")
    rejected = await scalar(conn, f"SELECT count(*) FROM history WHERE {mine}"
                                  " AND NOT (outcome->>'accepted')::boolean")
    others = await scalar(conn, f"SELECT count(*) FROM history WHERE seq > {cmd0}") - history
    return FoldResult(n, changes, t_pub - t0, t_caught - t0, t_emitted - t0, t_outbox - t0,
                      history, rejected, others, cpu)


def cpu_seconds(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each server's and the replica's process tree, and of this one."""
    stats = proc_stats()
    used = {name: tree_cpu_seconds(stats, [pid]) for name, pid in roots.items()}
    used["benchmark"] = time.process_time()
    return used


# ---- (c) replay -------------------------------------------------------------------------


@dataclass
class ReplayResult:
    published: int  # topped up for this phase
    commands: int
    entities: int
    dead_letters: int
    seconds: float  # the whole replay() call, scratch schema written
    fold_seconds: float  # replay's own figure: reading and folding only
    differs: int | None = None

    @property
    def rate(self) -> float:
        return self.commands / self.seconds


async def top_up(js: JetStreamContext, mix: PowerMix, target: int, chunk: int = 20_000) -> int:
    """Publish Start/Stop commands until CMD holds ``target`` messages; return how many."""
    have = (await js.stream_info(CMD_STREAM)).state.messages
    missing = max(0, target - have)
    for start in range(0, missing, chunk):
        items, _ = mix.take(min(chunk, missing - start))
        await publish_commands(js, items)
    return missing


async def replay_phase(js: JetStreamContext, info: StackInfo, mix: PowerMix,
                       target: int, profiler: cProfile.Profile | None) -> ReplayResult:
    published = await top_up(js, mix, target)
    if profiler is not None:
        profiler.enable()
    started = time.perf_counter()
    report = await replay(info.nats_url, info.pg_dsn, PARTITIONS)
    seconds = time.perf_counter() - started
    if profiler is not None:
        profiler.disable()
    return ReplayResult(published, report.commands, report.entities, report.dead_letters,
                        seconds, report.seconds)


async def verify_replay(info: StackInfo) -> int:
    """Untimed: replay up to the live checkpoints and count entities that disagree."""
    report = await replay(info.nats_url, info.pg_dsn, PARTITIONS, schema="replay_verify",
                          verify=True)
    return len(report.differs)


# ---- the report -------------------------------------------------------------------------


def say(line: str = "") -> None:
    print(line, flush=True)


def verdict(value: float, target: float) -> str:
    return "PASS" if value >= target else "FAIL"


def print_raw(raw: RawResult) -> None:
    say(f"(a) raw ceiling: {raw.messages:,} msgs of {len(RAW_PAYLOAD)} B, file stream,"
        " awaiting every ack")
    say(f"    js.publish_async                      {raw.publish_rate:>10,.0f} msg/s")
    say(f"    js.publish_async + Nats-Msg-Id        {raw.publish_msgid_rate:>10,.0f} msg/s")
    say(f"    pull fetch(500) + ack each ({2 * raw.messages:,} msgs) "
        f"{raw.fetch_ack_rate:>8,.0f} msg/s")


def print_fold(fold: FoldResult, raw: RawResult) -> None:
    ratio = fold.rate / raw.publish_rate
    say(f"(b) fold: {fold.commands:,} Start/Stop commands over {INSTANCES:,} instances"
        f" ({fold.changes:,} change power and emit a job), 1 replica process,"
        f" {PARTITIONS} partitions")
    say(f"    published, all acked                  {fold.publish_s:>8.2f} s"
        f"  {fold.commands / fold.publish_s:>10,.0f} cmd/s")
    say(f"    projection caught up (checkpoints)    {fold.caught_up_s:>8.2f} s"
        f"  {fold.commands / fold.caught_up_s:>10,.0f} cmd/s")
    say(f"    outcomes + jobs in EVT/JOB            {fold.emitted_s:>8.2f} s"
        f"  {fold.commands / fold.emitted_s:>10,.0f} cmd/s")
    say(f"    outbox empty                          {fold.outbox_s:>8.2f} s"
        f"  {fold.commands / fold.outbox_s:>10,.0f} cmd/s")
    say(f"    history rows {fold.history:,} (expected {fold.commands:,}),"
        f" rejected {fold.rejected:,}, other commands folded meanwhile {fold.others:,}")
    busy = fold.emitted_s
    say("    CPU in use until emitted (cores): " + ", ".join(
        f"{name} {seconds / busy:.2f}" for name, seconds in fold.cpu.items()))
    say(f"    FOLD (caught up and outbox empty)     {fold.rate:>10,.0f} cmd/s"
        f"   target >= 10,000   {verdict(fold.rate, 10_000)}")
    say(f"    fold / raw publish_async              {ratio:>10.2f}"
        f"         target >= 0.33     {verdict(ratio, 0.33)}")


def print_replay(rep: ReplayResult) -> None:
    say(f"(c) replay: {rep.commands:,} commands in CMD ({rep.published:,} topped up),"
        f" {rep.entities:,} entities, {rep.dead_letters} dead letters")
    say(f"    replay() wall time                    {rep.seconds:>8.2f} s"
        f"  {rep.rate:>10,.0f} cmd/s   target >= 50,000   {verdict(rep.rate, 50_000)}")
    say(f"    of which read + fold (report.seconds) {rep.fold_seconds:>8.2f} s"
        f"  {rep.commands / rep.fold_seconds:>10,.0f} cmd/s")
    if rep.differs is not None:
        say(f"    verify against the live projection: {rep.differs} entities differ")


def print_batches(sizes: list[int] | None) -> None:
    if not sizes:
        return
    full = sum(1 for n in sizes if n >= 500)
    say(f"    replica folded {len(sizes):,} batches while timed: mean {sum(sizes) / len(sizes):.0f}"
        f" msgs, max {max(sizes)}, {full} full (500)")


PROFILE_GROUPS = (  # (label, a fragment of the code's path), first match wins
    ("nats-py", "/nats/"),
    ("asyncpg", "/asyncpg/"),
    ("structlog", "/structlog/"),
    ("asyncio event loop", "/asyncio/"),
    ("asyncio event loop", "/selectors.py"),
    ("orchestrator, events, schemas", "/orchestrator/"),
    ("orchestrator, events, schemas", "/events/"),
    ("orchestrator, events, schemas", "/schemas/"),
)


def _group(filename: str, function: str) -> str:
    for label, fragment in PROFILE_GROUPS:
        if fragment in filename:
            return label
    if "socket" in function or "epoll" in function:
        return "socket I/O and epoll (C)"
    return "other (C builtins, stdlib)"


def print_profile(what: str, source: Path | cProfile.Profile) -> None:
    """Own time by package, then the top 25 functions by cumulative and 15 by own time."""
    if isinstance(source, Path) and not source.exists():
        say(f"(no profile of {what})")
        return
    out = io.StringIO()
    stats = pstats.Stats(str(source) if isinstance(source, Path) else source, stream=out)
    own: dict[str, float] = {}
    entries = stats.stats.items()  # type: ignore[attr-defined]
    for (filename, _, function), (_, _, tottime, _, _) in entries:
        label = _group(filename, function)
        own[label] = own.get(label, 0.0) + tottime
    total = sum(own.values()) or 1.0
    say(f"profile of {what} (cProfile, which slows it down); own time by package:")
    for label, seconds in sorted(own.items(), key=lambda item: -item[1]):
        say(f"    {label:32s} {seconds:7.2f} s  {100 * seconds / total:5.1f} %")
    stats.strip_dirs()
    stats.sort_stats("cumulative").print_stats(25)
    stats.sort_stats("tottime").print_stats(15)
    say(out.getvalue())


# ---- the run ----------------------------------------------------------------------------


async def bench(args: argparse.Namespace, info: StackInfo, replica: ReplicaProcess,
                roots: dict[str, int]) -> None:
    nc = await connect(info.nats_url, "bench")
    try:
        js = nc.jetstream()
        raw = await raw_ceiling(js, args.commands)
        await ensure_topology(js, PARTITIONS)
        roots["replica"] = replica.start()
        conn = await wait_replica_ready(info.pg_dsn, replica)
        try:
            say(await harness.environment(nc, conn, args.sync_always)
                + f", replica via {replica.runner}")
            print_raw(raw)
            mix = PowerMix()
            await prime(js, conn, replica)
            fold = await timed_fold(js, conn, replica, mix, args.commands, roots)
            print_fold(fold, raw)
            await asyncio.to_thread(replica.stop)
            print_batches(replica.batch_sizes())
            if replica.profile_out is not None:
                print_profile("the replica during the timed fold", replica.profile_out)
            profiler = cProfile.Profile() if args.profile else None
            rep = await replay_phase(js, info, mix, args.replay_commands, profiler)
            if args.verify:
                rep.differs = await verify_replay(info)
            print_replay(rep)
            if profiler is not None:
                print_profile("replay()", profiler)
        finally:
            await conn.close()
    finally:
        await nc.close()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=20_000,
                        help="commands in the timed fold, and messages in the raw ceiling")
    parser.add_argument("--replay-commands", type=int, default=100_000,
                        help="commands the CMD stream holds for the replay")
    parser.add_argument("--profile", action="store_true",
                        help="run the replica under cProfile and print where the time goes")
    parser.add_argument("--runner", choices=["auto", "cli", "inline"], default="auto",
                        help="the replica as `python -m orchestrator.cli orchestrator` or as"
                             " this script's own entry (auto: the CLI if it exists)")
    parser.add_argument("--sync-always", action="store_true",
                        help="nats-server fsyncs every write (as `orch up --sync-always`)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the untimed replay --verify against the live projection")
    hidden = argparse.SUPPRESS
    parser.add_argument("--child-replica", action="store_true", help=hidden)
    parser.add_argument("--nats-url", help=hidden)
    parser.add_argument("--pg-dsn", help=hidden)
    parser.add_argument("--stats-out", help=hidden)
    parser.add_argument("--profile-out", help=hidden)
    return parser.parse_args(argv)


def choose_runner(args: argparse.Namespace) -> str:
    if args.runner != "auto":
        return str(args.runner)
    if args.profile:  # only our own entry can switch the profiler on and off
        return "inline"
    return "cli" if importlib.util.find_spec("orchestrator.cli") is not None else "inline"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_replica:
        _child_main(args.nats_url, args.pg_dsn, args.stats_out, args.profile_out)
        return 0
    if args.profile and args.runner == "cli":
        raise SystemExit("--profile needs --runner inline (or auto)")
    tmp = Path(tempfile.mkdtemp(prefix="orch-bench-"))
    stack = Stack(tmp / "stack", args.sync_always)
    replica: ReplicaProcess | None = None

    def body() -> None:
        nonlocal replica
        info = stack.start()
        replica = ReplicaProcess(info, tmp, choose_runner(args), args.profile)
        roots = {"nats-server": stack.nats.pid, "postgres": stack.pg.pid}
        uvloop.run(bench(args, info, replica, roots))

    def cleanup() -> None:
        if replica is not None:
            replica.stop()
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    return harness.run(body, cleanup)


if __name__ == "__main__":
    sys.exit(main())
