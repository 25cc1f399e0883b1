"""Scale benchmark: the fold, a replica's memory, replay, snapshots and an entity's reads as
the log and the entities grow, in one run.

    .venv/bin/python bench/scale.py [--sizes 10000:1000,100000:10000,1000000:100000]
                                    [--hot-share 0.01] [--tail-runs 3]

Each size is COMMANDS:INSTANCES, and the sizes build on each other: the same log grows.
At each, new instances are created (each with a NIC on a network of 100, on hosts of 500),
then Start/Stop commands on random instances fill the log up to COMMANDS (follow-ups
count); among them, enough on one instance, `vm-hot`, for its history to be --hot-share
of the log (10,000 commands at 1,000,000): the long one read back. For each size it prints:

- the fold rate of the step's Start/Stop commands (their count over the time until every
  partition's checkpoint covers them and the outbox is empty), and apart, that of its
  creations with their placements and ports;
- the replica's peak RSS (VmHWM), and that mark after the creations and after the
  Start/Stop, so that the phase which raised it shows;
- a full `orch replay` and `orch replay --verify`, each as the process an operator runs;
- `orch snapshot`, then 1 % more commands, then `orch replay --from-snapshot`, and its
  speed-up over the full replay;
- `orch get instance/vm-hot` and `orch tail instance/vm-hot`, the median of --tail-runs;
- PostgreSQL's database size.

It starts a private nats-server and PostgreSQL (the embedded Stack) in a temporary
directory and one replica (`orch orchestrator`, no snapshot schedule) as a child process;
all are stopped and the directory removed at exit, on failure and on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import harness
import uvloop
from fold import (
    PARTITIONS,
    ReplicaProcess,
    caught_up,
    command_frames,
    last_per_partition,
    last_seq,
    outbox_empty,
    publish_frames,
    wait_replica_ready,
    wait_until,
)
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from events.bus import connect
from events.subjects import CMD_STREAM, partition_filter
from events.topology import ensure_topology
from orchestrator import queries
from orchestrator.embedded import Stack, StackInfo
from schemas.commands import (
    Command,
    CreateInstance,
    CreateNetwork,
    RegisterHost,
    StartInstance,
    StopInstance,
)
from schemas.specs import InstanceTemplate, Nic

PER_NETWORK = 100
PER_HOST = 500
HOT = "vm-hot"
CHUNK = 20_000  # commands per publish: the client holds one chunk's futures at a time
SETTLE_S = 3600.0


@dataclass
class Grower:
    """The log and its entities, grown size by size; Start/Stop seeded."""

    instances: int = 0
    hosts: int = 0
    networks: int = 0
    issued: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(1))

    def entities(self, instances: int) -> list[tuple[str, Command]]:
        items: list[tuple[str, Command]] = []
        while self.hosts * PER_HOST < instances:
            items.append(("admin", RegisterHost(
                cmd_id=f"host-{self.hosts}", id=f"host-{self.hosts:04d}", vcpus=PER_HOST,
                memory_mib=PER_HOST * 64)))
            self.hosts += 1
        while self.networks * PER_NETWORK < instances:
            n = self.networks
            items.append(("user", CreateNetwork(
                cmd_id=f"net-{n}", id=f"net-{n:04d}", vni=100 + n,
                cidr=f"10.{n // 256}.{n % 256}.0/24")))
            self.networks += 1
        for i in range(self.instances, instances):
            items.append(("user", self._create(f"vm-{i:06d}", i // PER_NETWORK)))
        if self.instances == 0:
            items.append(("user", self._create(HOT, 0)))
        self.instances = instances
        return items

    @staticmethod
    def _create(id_: str, network: int) -> CreateInstance:
        return CreateInstance(cmd_id=f"create-{id_}", id=id_, template=InstanceTemplate(
            vcpus=1, memory_mib=64, image="tiny", nics=(Nic(network=f"net-{network:04d}"),)))

    def power(self, n: int, hot: int = 0) -> list[tuple[str, Command]]:
        """n Start/Stop commands, ``hot`` of them (at random places) on `vm-hot`."""
        items: list[tuple[str, Command]] = []
        hot_at = set(self.rng.sample(range(n), min(hot, n)))
        for k in range(n):
            id_ = HOT if k in hot_at else f"vm-{self.rng.randrange(self.instances):06d}"
            cls = StartInstance if self.rng.random() < 0.5 else StopInstance
            items.append(("user", cls(cmd_id=f"power-{self.issued}", id=id_)))
            self.issued += 1
        return items


async def fold(js: JetStreamContext, conn, replica: ReplicaProcess,
               items: Sequence[tuple[str, Command]]) -> float:
    """Publish and wait until folded and relayed; the seconds from the first publish."""
    started = time.perf_counter()
    last: dict[int, int] = {}
    for start in range(0, len(items), CHUNK):
        frames, partitions = command_frames(items[start:start + CHUNK])
        for p, seq in last_per_partition(partitions, await publish_frames(js, frames)).items():
            last[p] = max(last.get(p, 0), seq)
    await wait_until("folded", lambda: caught_up(conn, last), replica, SETTLE_S)
    # Then their follow-ups (placements, ports), until the log stops growing.
    while True:
        end = await last_seq(js, CMD_STREAM)
        await wait_until("relayed", lambda: outbox_empty(conn), replica, SETTLE_S)
        tails = {p: await partition_end(js, p) for p in range(PARTITIONS)}
        await wait_until("follow-ups folded", lambda t=tails: caught_up(conn, t), replica,
                         SETTLE_S)
        if await outbox_empty(conn) and await last_seq(js, CMD_STREAM) == end:
            return time.perf_counter() - started


async def partition_end(js: JetStreamContext, partition: int) -> int:
    try:
        return (await js.get_last_msg(CMD_STREAM, partition_filter(partition))).seq
    except NotFoundError:
        return 0


def orch(info: StackInfo, *args: str) -> tuple[float, str]:
    """Run `orch ARGS` as an operator would; its wall time and stdout."""
    env = {"ORCH_NATS_URL": info.nats_url, "ORCH_PG_DSN": info.pg_dsn,
           "PATH": "/usr/bin:/bin"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env,
                          capture_output=True, text=True, timeout=SETTLE_S)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"orch {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return seconds, done.stdout


def peak_rss_mb(pid: int) -> float:
    """The process's RSS high-water mark so far (VmHWM): read after each phase, it tells
    which phase raised it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def step(js: JetStreamContext, conn, info: StackInfo, replica: ReplicaProcess,
               grower: Grower, commands: int, instances: int, args: argparse.Namespace
               ) -> dict[str, float]:
    fig: dict[str, float] = {}
    before = await last_seq(js, CMD_STREAM)
    seconds = await fold(js, conn, replica, grower.entities(instances))
    fig["rss_created_mb"] = peak_rss_mb(replica.proc.pid)
    created = await last_seq(js, CMD_STREAM)
    fig["create_rate"] = (created - before) / seconds
    # The snapshot's 1 % comes after it: fill to 99 % first.
    fill = max(0, int(commands * 0.99) - created)
    # vm-hot's history: --hot-share of the log's commands, all of them by this size.
    hot = int(commands * args.hot_share) - await history_of(conn, HOT)
    fig["fold_rate"] = fill / await fold(js, conn, replica, grower.power(fill, hot))
    fig["rss_power_mb"] = peak_rss_mb(replica.proc.pid)
    fig["snapshot_s"], _ = orch(info, "snapshot", "--json")
    tail = commands - await last_seq(js, CMD_STREAM)
    await fold(js, conn, replica, grower.power(max(tail, 1)))
    fig["commands"] = await last_seq(js, CMD_STREAM)
    fig["rss_mb"] = peak_rss_mb(replica.proc.pid)
    fig["replay_s"], out = orch(info, "replay", "--json")
    fig["replay_rate"] = json.loads(out)["rate"]
    fig["verify_s"], out = orch(info, "replay", "--verify", "--json")
    if not json.loads(out)["verified"]:
        raise RuntimeError(f"replay --verify failed: {out[:2000]}")
    fig["from_snapshot_s"], out = orch(info, "replay", "--from-snapshot", "--json",
                                       "--schema", "from_snapshot")
    fig["from_snapshot_commands"] = json.loads(out)["commands"]
    fig["get_s"] = statistics.median(orch(info, "get", f"instance/{HOT}")[0]
                                     for _ in range(args.tail_runs))
    fig["tail_s"] = statistics.median(orch(info, "tail", f"instance/{HOT}")[0]
                                      for _ in range(args.tail_runs))
    fig["timeline_s"] = statistics.median([await timed_timeline(conn)
                                           for _ in range(args.tail_runs)])
    fig["hot_commands"] = await history_of(conn, HOT)
    fig["pg_mb"] = await conn.fetchval("SELECT pg_database_size(current_database())") / 2**20
    return fig


async def history_of(conn, instance: str) -> int:
    return await conn.fetchval(
        "SELECT count(*) FROM history WHERE kind = 'instance' AND id = $1", instance)


async def timed_timeline(conn) -> float:
    """The timeline's query and decoding alone, as `orch tail` runs them."""
    started = time.perf_counter()
    await queries.timeline(conn, "instance", HOT)
    return time.perf_counter() - started


def report(size: str, fig: dict[str, float], first: dict[str, float]) -> None:
    ratio = fig["fold_rate"] / first["fold_rate"]
    print(f"{size}: {fig['commands']:,.0f} commands")
    print(f"  fold                {fig['fold_rate']:>10,.0f} commands/s   x{ratio:.2f} of the"
          " first size (target >= 0.8 at the largest): Start/Stop on every instance")
    print(f"  fold of creations   {fig['create_rate']:>10,.0f} commands/s (the step's new"
          " instances, with their placements and ports)")
    print(f"  replica peak RSS    {fig['rss_mb']:>10,.0f} MB (target <= 300 MB); the peak so far"
          f" after the creations {fig['rss_created_mb']:,.0f} MB, after the Start/Stop"
          f" {fig['rss_power_mb']:,.0f} MB")
    print(f"  orch replay         {fig['replay_s']:>10.2f} s ({fig['replay_rate']:,.0f}"
          " commands/s in the fold)")
    print(f"  orch replay --verify{fig['verify_s']:>10.2f} s")
    print(f"  --from-snapshot     {fig['from_snapshot_s']:>10.2f} s"
          f" ({fig['from_snapshot_commands']:,.0f} commands after it);"
          f" x{fig['replay_s'] / fig['from_snapshot_s']:.1f} faster than the full replay"
          " (target >= 20); orch snapshot took"
          f" {fig['snapshot_s']:.2f} s")
    print(f"  orch get / tail     {fig['get_s'] * 1000:>7,.0f} / {fig['tail_s'] * 1000:,.0f} ms"
          f" on an instance with {fig['hot_commands']:,.0f} commands (process wall time);"
          f" the timeline's query {fig['timeline_s'] * 1000:,.1f} ms (target <= 200 ms)")
    print(f"  PostgreSQL          {fig['pg_mb']:>10,.0f} MB")


async def bench(args: argparse.Namespace, info: StackInfo, replica: ReplicaProcess) -> None:
    nc = await connect(info.nats_url, "bench")
    try:
        js = nc.jetstream()
        await ensure_topology(js, PARTITIONS)
        replica.start()
        conn = await wait_replica_ready(info.pg_dsn, replica)
        try:
            print(await harness.environment(nc, conn, False))
            grower = Grower()
            first: dict[str, float] | None = None
            for size in args.sizes.split(","):
                commands, instances = (int(x) for x in size.split(":"))
                fig = await step(js, conn, info, replica, grower, commands, instances, args)
                first = first or fig
                report(f"{commands:,} commands / {instances:,} instances", fig, first)
        finally:
            await conn.close()
    finally:
        await nc.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000:1000,100000:10000,1000000:100000")
    parser.add_argument("--hot-share", type=float, default=0.01)
    parser.add_argument("--tail-runs", type=int, default=3)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="orch-scale-"))
    stack = Stack(tmp / "stack", False)
    replica: ReplicaProcess | None = None

    def body() -> None:
        nonlocal replica
        info = stack.start()
        replica = ReplicaProcess(info, tmp, "cli", False)
        uvloop.run(bench(args, info, replica))

    def cleanup() -> None:
        if replica is not None:
            replica.stop()
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    return harness.run(body, cleanup)


if __name__ == "__main__":
    sys.exit(main())
