"""The operator's tools over a large log: trace, tail --diff, get --at, and log.

    .venv/bin/python bench/tooling.py [--hot 10000] [--log-commands 1000000] [--runs 3]

A private nats-server and PostgreSQL (the embedded Stack) in a temporary directory and one
orchestrator replica, no agent. Untimed, it publishes and folds: a host, instances on it,
one "hot" instance with --hot Stop/Start commands in its history (each changes its power
and generation, and emits a job), and Stop/Start on the others (1 % on instances that do
not exist, rejected) until the log holds --log-commands. The replica snapshots the
projection on its schedule, as a running one does (every --snapshot-every seconds here,
each hour by default, keeping the newest 2), and once everything is folded the bench waits
for its snapshot of the end. The replica is then stopped: the verbs read only NATS and
PostgreSQL, and its reconciler would re-issue the unapplied jobs (after 5 minutes at most,
its backoff's cap) into the timelines being timed. `get --at` and `trace` fold an entity
from the latest snapshot at or before their point: the hot instance's commands all precede
the snapshots kept, so those of its commands are folded again from the first, but for
`get --at` the last seq, which starts from the snapshot of the end. Then it times
each verb as an operator runs it: the CLI as a process, its output to a pipe, the median of
--runs. `orch --help` is timed too: the interpreter's start-up and imports, part of every
figure; each verb is timed again in this process, imports done (the "verb" column).
Targets, of the process: each answer ≤ 1 s (issue 12), and a plain `orch tail` ≤ 200 ms
(issue 13).
Everything is torn down at exit, also on failure, Ctrl-C or SIGTERM.
"""

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import harness
import typer
import uvloop
from nats.js import JetStreamContext

from events.bus import connect
from events.subjects import CMD_STREAM, command_msg_id, command_subject
from events.topology import ensure_topology
from orchestrator import cli
from orchestrator.children import Children
from orchestrator.embedded import Stack, StackInfo
from orchestrator.queries import fold_progress
from orchestrator.store import connect_pg
from schemas.codec import command_from_dict, encode
from schemas.commands import Command

PARTITIONS = 8
INSTANCES = 200
HOT = "hot"
CHUNK = 20_000
TARGET_S = 1.0
TAIL_TARGET_S = 0.2  # a plain timeline
TINY = {"vcpus": 1, "memory_mib": 64, "image": "tiny"}


def say(line: str = "") -> None:
    print(line, flush=True)


async def publish(js: JetStreamContext, items: Sequence[tuple[str, Command]]) -> list[int]:
    """Pipelined, in chunks: every ack awaited; returns the seqs."""
    seqs: list[int] = []
    for start in range(0, len(items), CHUNK):
        futures = [await js.publish_async(
            command_subject(source, cmd.kind, cmd.id), encode(cmd),
            headers={"Nats-Msg-Id": command_msg_id(source, cmd.kind, cmd.id, cmd.cmd_id)})
            for source, cmd in items[start:start + CHUNK]]
        seqs.extend(a.seq for a in await asyncio.gather(*futures))
    return seqs


def command(n: int, type_: str, id_: str, **fields: object) -> Command:
    return command_from_dict({"type": type_, "id": id_, "cmd_id": f"b{n}", **fields})


async def settled(js: JetStreamContext, conn: asyncpg.Connection) -> tuple[int, int]:
    last = (await js.stream_info(CMD_STREAM)).state.last_seq
    folded, outbox = await fold_progress(conn)
    return last - folded, outbox


async def fold_all(js: JetStreamContext, pg_dsn: str, children: Children, what: str) -> None:
    started = time.perf_counter()
    while True:
        try:
            conn = await connect_pg(pg_dsn)
            break
        except (OSError, asyncpg.PostgresError):
            await asyncio.sleep(0.2)
    try:
        while True:
            children.check()
            try:
                behind, outbox = await settled(js, conn)
            except asyncpg.UndefinedTableError:
                behind, outbox = 1, 0
            if behind == 0 and outbox == 0:
                break
            await asyncio.sleep(0.5)
    finally:
        await conn.close()
    say(f"  folded {what} in {time.perf_counter() - started:.1f} s")


async def snapshot_of_the_end(pg_dsn: str, children: Children) -> None:
    """Wait until the replica's schedule has snapshotted every partition's checkpoint."""
    started = time.perf_counter()
    conn = await connect_pg(pg_dsn)
    try:
        while not await conn.fetchval(
                "SELECT coalesce((SELECT checkpoints = (SELECT array_agg(checkpoint ORDER BY"
                " partition) FROM partitions) FROM snapshots ORDER BY id DESC LIMIT 1), false)"):
            children.check()
            await asyncio.sleep(0.5)
    finally:
        await conn.close()
    say(f"  the replica's snapshot of the end after {time.perf_counter() - started:.1f} s")


async def build(info: StackInfo, children: Children, hot: int, total: int) -> dict[str, Any]:
    """The log, folded; returns a few seqs worth pointing the verbs at."""
    nc = await connect(info.nats_url, "bench-tooling")
    try:
        js = nc.jetstream()
        await ensure_topology(js, PARTITIONS)
        n = 0

        def next_n() -> int:
            nonlocal n
            n += 1
            return n

        prime: list[tuple[str, Command]] = [("admin", command(
            next_n(), "RegisterHost", "h1", vcpus=16384, memory_mib=4 * 1024 * 1024))]
        prime += [("user", command(next_n(), "CreateInstance", f"i{i}", template=TINY))
                  for i in range(INSTANCES)]
        prime.append(("user", command(next_n(), "CreateInstance", HOT, template=TINY)))
        await publish(js, prime[:1])
        await fold_all(js, info.pg_dsn, children, "the host")  # placement needs it first
        await publish(js, prime[1:])
        await fold_all(js, info.pg_dsn, children, f"{INSTANCES + 1} instances")

        started = time.perf_counter()
        hot_items = [("user", command(
            next_n(), "StopInstance" if k % 2 == 0 else "StartInstance", HOT))
            for k in range(hot)]
        hot_seqs = await publish(js, hot_items)
        rng = random.Random(12)
        left = total - (await js.stream_info(CMD_STREAM)).state.last_seq
        while left > 0:
            batch = []
            for _ in range(min(left, 100_000)):
                k = rng.randrange(INSTANCES)
                id_ = f"ghost{k}" if rng.random() < 0.01 else f"i{k}"
                batch.append(("user", command(
                    next_n(), rng.choice(("StopInstance", "StartInstance")), id_)))
            await publish(js, batch)
            left -= len(batch)
        last = (await js.stream_info(CMD_STREAM)).state.last_seq
        say(f"  published {last:,} commands in {time.perf_counter() - started:.1f} s")
        await fold_all(js, info.pg_dsn, children, f"{last:,} commands")
        await snapshot_of_the_end(info.pg_dsn, children)
        return {"hot_first": hot_seqs[0], "hot_middle": hot_seqs[len(hot_seqs) // 2],
                "hot_last": hot_seqs[-1], "last": last, "hot_last_key": hot_items[-1][1].cmd_id}
    finally:
        await nc.close()


def in_process(env: dict[str, str], runs: int, *args: str) -> float:
    """Median wall time of the verb itself, in this process with everything imported: what
    the process takes beyond its interpreter's start-up. Its output goes to /dev/null."""
    os.environ.update(env)
    command = typer.main.get_command(cli.app)
    times = []
    for _ in range(runs):
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            started = time.perf_counter()
            with contextlib.suppress(SystemExit):
                command.main(list(args), standalone_mode=False)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def timed(env: dict[str, str], runs: int, *args: str) -> tuple[float, int]:
    """Median wall time of `orch ARGS` and the lines it printed."""
    times, lines = [], 0
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env,
                              capture_output=True, check=False)
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise RuntimeError(f"orch {' '.join(args)}: exit {done.returncode}:"
                               f" {done.stderr.decode().strip()}")
        lines = done.stdout.count(b"\n")
    return statistics.median(times), lines


def measure(env: dict[str, str], seqs: dict[str, Any], runs: int, hot: int) -> None:
    hot_ = f"instance/{HOT}"
    cases = [
        ("orch --help (start-up only)", ("--help",)),
        (f"trace of the last of {hot:,} commands on {hot_}", ("trace", str(seqs["hot_last"]))),
        ("  the same, --json", ("trace", str(seqs["hot_last"]), "--json")),
        ("trace of the first of them", ("trace", str(seqs["hot_first"]), "--json")),
        ("  the last, by its cmd id", ("trace", seqs["hot_last_key"])),
        (f"tail {hot_} --diff", ("tail", hot_, "--diff")),
        (f"tail {hot_} --diff --json", ("tail", hot_, "--diff", "--json")),
        (f"tail {hot_} (no diff)", ("tail", hot_)),
        ("  the same, --json", ("tail", hot_, "--json")),
        (f"get {hot_} --at its middle seq", ("get", hot_, "--at", str(seqs["hot_middle"]))),
        ("  --at the last seq (from the snapshot)", ("get", hot_, "--at", str(seqs["last"]))),
        ("log (the newest 100)", ("log",)),
        ("log --json (the newest 100)", ("log", "--json")),
        ("log --kind instance --type StopInstance", ("log", "--kind", "instance", "--type",
                                                     "StopInstance")),
        ("log --rejected (1 % of them)", ("log", "--rejected")),
        ("log --source admin (one, at the start)", ("log", "--source", "admin")),
        ("log --since the last 1,000 seqs", ("log", "--since", str(seqs["last"] - 999))),
    ]
    width = max(len(name) for name, _ in cases)
    say(f"  {'':<{width}}  {'process':>8}  {'verb':>8}  lines")
    for name, args in cases:
        seconds, lines = timed(env, runs, *args)
        if args == ("--help",):
            say(f"  {name:<{width}}  {seconds:6.3f} s")
            continue
        own = in_process(env, runs, *args)
        target = TAIL_TARGET_S if args[0] == "tail" and "--diff" not in args else TARGET_S
        verdict = "ok" if seconds <= target else f"OVER {target:g} s"
        say(f"  {name:<{width}}  {seconds:6.3f} s  {own:6.3f} s  {lines:>6}  {verdict}")
    # The machine may be shared: the figures mean little without the load they ran under.
    say(f"  load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hot", type=int, default=10_000,
                        help="commands in the hot instance's history")
    parser.add_argument("--log-commands", type=int, default=1_000_000,
                        help="commands in the whole log")
    parser.add_argument("--runs", type=int, default=3, help="runs of each verb (median)")
    parser.add_argument("--snapshot-every", type=float, default=20.0,
                        help="the replica's snapshot period, seconds")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="orch-tooling-"))
    stack = Stack(tmp / "stack", False, 1)
    children: Children | None = None

    def body() -> None:
        nonlocal children
        info = stack.start()
        env = {**os.environ, "ORCH_NATS_URL": info.nats_url, "ORCH_PG_DSN": info.pg_dsn}
        children = Children(tmp, env)
        children.start("r1", "orchestrator.cli", "orchestrator", "--id", "r1",
                       "--deadline", "3600", "--partitions", str(PARTITIONS),
                       "--snapshot-every", str(args.snapshot_every))
        say(f"tooling: {args.hot:,} commands on one instance, {args.log_commands:,} in the"
            f" log; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
        seqs = uvloop.run(build(info, children, args.hot, args.log_commands))
        children.stop()
        measure(env, seqs, args.runs, args.hot)

    def cleanup() -> None:
        if children is not None:
            children.stop()
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    return harness.run(body, cleanup)


if __name__ == "__main__":
    sys.exit(main())
