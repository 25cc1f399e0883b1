"""Moving machines: live-migration hops of a real QEMU guest, drain throughput, evacuation.

    .venv/bin/python bench/migrate.py [--part hops,drain,evac] [--hops 10] [--instances 20]
                                      [--limits 1,2,4] [--evac-instances 10]
                                      [--down-after 3] [--evacuate-after 5]

One cloud, built once as tests/test_qemu_migrate.py builds its own: a Fabric of 5 hosts;
h1 and h2 each with its own libvirtd and a libvirt agent (only with the hops part; else
namespace guests there too), h3..h5 agents with namespace guests; the embedded Stack and
one replica (`--down-after`, `--evacuate-after`), one network. Everything is removed at
exit, also after Ctrl-C, SIGTERM or a failure: children, daemons and their guests, the
fabric's namespaces, servers, console logs, the temporary directory.

(hops) The tiny QEMU guest (TCG, 192 MiB) on h1 and a namespace prober on h3 pinging it
    every 10 ms (`ping -i 0.01 -D`). Each hop, h1 <-> h2, is a MigrateInstance with
    --to: its wall time (publish to the instance's MigrationEnded, "moved", polled every
    20 ms), where that goes in the log (JetStream time of each step: reserved, the
    destination prepared, switched, the source clean), the longest gap between ping
    replies and the longest run of lost pings, and libvirt's own statistics of the
    completed job on the destination (downtime, time, MiB). p50/p90/max over the hops.
(drain) For each limit K (SetMigrationLimit): --instances namespace guests placed on h4,
    then `orch drain h4 --wait` (h1, h2 held in maintenance: their agents run QEMU): the
    instances per minute, from the CLI's start to its exit and from the log (the drain's
    SetHostCondition to the last report on any of them: each running on its destination,
    each source clean), and the most migrations seen at once in
    the scheduler's log. The guests are deleted afterwards.
(evac) --evac-instances namespace guests on h4, whose agent is then SIGKILLed and whose
    underlay is cut (as tests/test_moves.py does): the time from that to every one running
    elsewhere at its newest generation, with the replica's --down-after and
    --evacuate-after; then h4 returns and the time until its stale copies are gone.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness
from converge import replica_ready, wait_until
from lb_system import Run, StackEnv, load, say

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # tests/: the clouds and their helpers
    sys.path.append(str(REPO))

import libvirt  # noqa: E402

from agents.drivers.netns_guest import guest_base, guest_netns  # noqa: E402
from agents.drivers.vm import DEFAULT_CONSOLE_DIR, domain_name  # noqa: E402
from events.bus import Publisher, connect  # noqa: E402
from events.topology import ensure_topology  # noqa: E402
from orchestrator.embedded import Stack  # noqa: E402
from orchestrator.fabric import Fabric  # noqa: E402
from orchestrator.queries import decode_outcome  # noqa: E402
from tests.conftest import Processes  # noqa: E402
from tests.libvirt_hosts import HostLibvirtd, host_libvirtds  # noqa: E402
from tests.test_moves import ORCH, netns_names, underlay  # noqa: E402
from tests.test_qemu_migrate import (  # noqa: E402
    CIDR,
    PING_INTERVAL_S,
    QEMU_HOSTS,
    RULES,
    VNI,
    Pinger,
    QemuCloud,
)
from tests.test_qemu_system import booted  # noqa: E402

HOSTS = ("h1", "h2", "h3", "h4", "h5")
PROBER, DRAINED = "h3", "h4"
NET = "bn"
SETTLE_TIMEOUT_S = 300.0
POLL_S = 0.02
GUEST = f"bq{os.getpid()}"  # the QEMU guest: unique, the console dir is shared


def spread(values: Sequence[float], unit: str = "ms", digits: int = 0) -> str:
    """p50 / p90 / max of the values (nearest rank)."""
    if not values:
        return "none"
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, max(0, round(0.9 * len(ordered)) - 1))]
    return (f"p50 {statistics.median(ordered):.{digits}f} {unit}, p90 {p90:.{digits}f} {unit},"
            f" max {ordered[-1]:.{digits}f} {unit} (n={len(ordered)})")


@dataclass
class MigrateRun(Run):
    """lb_system's run, with the hosts' libvirtds (stopped after the children, before the
    fabric) and the QEMU guest's console log."""

    daemons: Any = None  # host_libvirtds' context manager, entered

    def teardown(self) -> None:
        if self.processes is not None:
            self.processes.stop(10.0)
        if self.daemons is not None:
            self.daemons.__exit__(None, None, None)
        super().teardown()
        (DEFAULT_CONSOLE_DIR / f"{GUEST}.log").unlink(missing_ok=True)


async def build(run: MigrateRun, args: argparse.Namespace) -> tuple[QemuCloud, Any]:
    run.fabric = Fabric(list(HOSTS))
    run.fabric.setup()
    daemons: dict[str, HostLibvirtd] = {}
    if "hops" in args.part:
        run.daemons = host_libvirtds(run.fabric, run.tmp / "libvirt", QEMU_HOSTS)
        daemons = run.daemons.__enter__()
    info = run.stack.start()
    env = StackEnv(info.nats_url, info.pg_dsn)
    run.processes = Processes(run.tmp / "children", dict(os.environ))
    nc = await connect(info.nats_url, "bench-migrate")
    js = nc.jetstream()
    await ensure_topology(js)
    run.processes.orch("orchestrator", "--id", "r1", "--deadline", "3600", "--down-after",
                       str(args.down_after), "--evacuate-after", str(args.evacuate_after),
                       env=env.environ(), name="r1")
    pg = await replica_ready(info.pg_dsn, run.processes)
    cloud = QemuCloud(run.fabric, env, run.processes, js, pg, Publisher(js),  # type: ignore[arg-type]
                      itertools.count(), daemons=daemons)
    for name in HOSTS:
        await cloud.send("admin", type="RegisterHost", id=name, vcpus=64, memory_mib=1 << 16)
        cloud.agent(name)

    async def underlays() -> bool:
        return await pg.fetchval("SELECT count(*) FROM entities WHERE kind = 'host'"
                                 " AND state->>'underlay' IS NOT NULL") == len(HOSTS)

    await wait_until("every host's underlay known", underlays, run.processes, 120)
    await cloud.send("user", type="CreateNetwork", id=NET, vni=VNI, cidr=CIDR)
    return cloud, nc


async def condition(cloud: QemuCloud, host: str, value: str) -> None:
    await cloud.send("admin", type="SetHostCondition", id=host, condition=value)


async def settle(cloud: QemuCloud, what: str) -> None:
    try:
        await cloud.settle(timeout=SETTLE_TIMEOUT_S)
    except AssertionError as exc:
        raise TimeoutError(f"{what}: {exc}") from exc


async def place(cloud: QemuCloud, host: str, ids: Sequence[str], memory_mib: int = 64,
                held: Sequence[str] = ()) -> None:
    """Create ``ids`` on ``host``: every other host in maintenance meanwhile, then up
    again (but those ``held``, left in maintenance)."""
    others = [h for h in HOSTS if h != host]
    for h in others:
        await condition(cloud, h, "maintenance")
    for id_ in ids:
        await cloud.send("user", type="CreateInstance", id=id_, template=dict(
            vcpus=1, memory_mib=memory_mib, image="tiny", nics=[dict(network=NET)],
            rules=RULES))
    await settle(cloud, f"{len(ids)} instance(s) on {host}")
    for h in others:
        if h not in held:
            await condition(cloud, h, "up")
    await settle(cloud, "hosts up")
    for id_ in ids:
        state = await cloud.state("instance", id_)
        if not state or state["host"] != host:
            raise RuntimeError(f"{id_} was placed on {state and state['host']}, not {host}")


async def last_seq(cloud: QemuCloud) -> int:
    return int(await cloud.pg.fetchval("SELECT coalesce(max(seq), 0) FROM history"))


async def log_since(cloud: QemuCloud, seq: int, kind: str | None = None) -> list[Any]:
    rows = await cloud.pg.fetch(
        "SELECT outcome FROM history WHERE seq > $1 AND ($2::text IS NULL OR kind = $2)"
        " ORDER BY seq", seq, kind)
    return [decode_outcome(r["outcome"]) for r in rows]


# ---- (hops) ------------------------------------------------------------------------------


@dataclass
class Hop:
    src: str
    dst: str
    wall_s: float
    gap_ms: float
    lost: int
    sent: int
    steps: dict[str, int] = field(default_factory=dict)  # step -> ms after the publish
    stats: dict[str, int] = field(default_factory=dict)  # libvirt's completed job


def completed_job(daemon: HostLibvirtd) -> dict[str, int]:
    conn = daemon.connect()
    try:
        dom = conn.lookupByName(domain_name(GUEST))
        return dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED
                            | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED)
    finally:
        conn.close()


async def one_hop(cloud: QemuCloud, src: str, dst: str, probe_netns: str, ip: str,
                  log: Path) -> Hop:
    pinger = Pinger(probe_netns, ip, log)
    try:
        await asyncio.sleep(0.3)
        since = await last_seq(cloud)
        published = time.time()
        started = time.perf_counter()
        await cloud.send("admin", type="MigrateInstance", id=GUEST, to=dst)

        async def moved() -> bool:
            s = await cloud.state("instance", GUEST)
            return bool(s and s["host"] == dst and s["migration"] is None)

        ended = await wait_until(f"{GUEST} moved to {dst}", moved, cloud.processes, 120,
                                 POLL_S)
        await asyncio.sleep(1.0)  # pings after the switch count too
    finally:
        sent, lost, gap_ms, _replies = pinger.stop()
    steps: dict[str, int] = {}
    for o in await log_since(cloud, since, "instance"):
        for event in o.events:
            if o.id == GUEST and event in ("MigrationPreparing", "MigrationStarted",
                                           "Switched", "MigrationEnded", "RolledBack"):
                steps.setdefault(event, o.at - int(published * 1000))
    if "RolledBack" in steps:
        raise RuntimeError(f"the hop {src} -> {dst} rolled back: {steps}")
    return Hop(src, dst, ended - started, gap_ms, lost, sent, steps,
               await asyncio.to_thread(completed_job, cloud.daemons[dst]))


async def part_hops(cloud: QemuCloud, args: argparse.Namespace, tmp: Path) -> None:
    prober = f"bp{os.getpid()}"
    await place(cloud, PROBER, [prober])
    started = time.monotonic()
    await place(cloud, "h1", [GUEST], memory_mib=192)
    seconds = await asyncio.to_thread(booted, GUEST, started)
    probe = await cloud.guest(prober)
    state = await cloud.state("instance", GUEST)
    assert state is not None
    ip = state["nics"][0]["ip"]
    await asyncio.to_thread(cloud.fabric.wait_ping, probe.netns, ip, 30)
    say(f"\n(hops) {GUEST} (TCG, 192 MiB) booted on h1 in {seconds:.1f} s; prober {prober}"
        f" on {PROBER} pinging {ip} every {PING_INTERVAL_S * 1000:.0f} ms")
    hops = []
    for k in range(args.hops):
        src, dst = ("h1", "h2") if k % 2 == 0 else ("h2", "h1")
        hop = await one_hop(cloud, src, dst, probe.netns, ip, tmp / f"ping-{k}.log")
        hops.append(hop)
        s, st = hop.steps, hop.stats
        say(f"  hop {k + 1:>2} {src} -> {dst}: wall {hop.wall_s * 1000:.0f} ms (log:"
            f" prepared at {s.get('MigrationStarted', -1)} ms, switched at"
            f" {s.get('Switched', -1)} ms, source clean at {s.get('MigrationEnded', -1)} ms);"
            f" ping gap {hop.gap_ms:.0f} ms, {hop.lost} lost in a row of {hop.sent} sent;"
            f" libvirt: downtime {st.get('downtime', -1)} ms, job {st.get('time_elapsed', -1)}"
            f" ms, {st.get('data_processed', 0) >> 20} MiB,"
            f" {st.get('memory_iteration', '?')} iterations")
    say(f"  wall time (publish -> moved):   {spread([h.wall_s * 1000 for h in hops])}")
    say("  publish -> switched (log):      "
        f"{spread([h.steps['Switched'] for h in hops if 'Switched' in h.steps])}")
    say("  memory moving (prepared -> switched, log): " + spread(
        [h.steps["Switched"] - h.steps["MigrationStarted"] for h in hops
         if {"Switched", "MigrationStarted"} <= h.steps.keys()]))
    say(f"  longest gap between ping replies: {spread([h.gap_ms for h in hops])}"
        " (target: p50 <= 200 ms)")
    say("  longest run of lost pings x 10 ms: "
        f"{spread([h.lost * PING_INTERVAL_S * 1000 for h in hops])}")
    say("  libvirt downtime:                 "
        f"{spread([h.stats['downtime'] for h in hops if 'downtime' in h.stats])}")
    say("  libvirt job time:                 "
        f"{spread([h.stats['time_elapsed'] for h in hops if 'time_elapsed' in h.stats])}")
    # Back to h1 (an odd number of hops leaves it on h2), then gone: the parts after use
    # namespace guests only.
    await cloud.send("user", type="DeleteInstance", id=GUEST)
    await cloud.send("user", type="DeleteInstance", id=prober)
    await settle(cloud, "the guest and the prober deleted")


# ---- (drain) -----------------------------------------------------------------------------


def most_at_once(log: Sequence[Any]) -> int:
    running = most = 0
    for o in log:
        for event in o.events:
            running += {"MoveStarted": 1, "MoveEnded": -1}.get(event, 0)
            most = max(most, running)
    return most


async def part_drain(cloud: QemuCloud, args: argparse.Namespace) -> None:
    say(f"\n(drain) {args.instances} namespace guests on {DRAINED}, drained to h3 and h5"
        " (h1, h2 held in maintenance)")
    for h in QEMU_HOSTS:
        await condition(cloud, h, "maintenance")
    for limit in args.limits:
        ids = [f"d{limit}x{i}" for i in range(args.instances)]
        await cloud.send("admin", type="SetMigrationLimit", id="default", limit=limit)
        await place(cloud, DRAINED, ids, held=QEMU_HOSTS)
        since = await last_seq(cloud)
        started = time.perf_counter()
        done = await asyncio.to_thread(
            subprocess.run, [*ORCH, "drain", DRAINED, "--wait", "--timeout", "600"],
            env=cloud.env.environ(), capture_output=True, text=True, timeout=660)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"orch drain exited {done.returncode}: {done.stdout}"
                               f" {done.stderr}")
        await settle(cloud, "the drained guests")
        log = await log_since(cloud, since)
        asked = min(o.at for o in log if o.type == "SetHostCondition" and o.id == DRAINED)
        # The last word on any of them: a destination's Applied, or a source's removal.
        ended = max(o.at for o in log if o.kind == "instance" and o.id in ids)
        where = [(await cloud.state("instance", i) or {}).get("host") for i in ids]
        if DRAINED in where:
            raise RuntimeError(f"{where.count(DRAINED)} guests still on {DRAINED}")
        span = (ended - asked) / 1000
        say(f"  K={limit}: {args.instances} moved in {wall:.1f} s (orch drain --wait) ="
            f" {args.instances / wall * 60:.0f} instances/min; in the log {span:.1f} s ="
            f" {args.instances / span * 60:.0f}/min; at most"
            f" {most_at_once(await log_since(cloud, since, 'scheduler'))} at once;"
            f" to h3: {where.count('h3')}, h5: {where.count('h5')}")
        for id_ in ids:
            await cloud.send("user", type="DeleteInstance", id=id_)
        await condition(cloud, DRAINED, "up")
        await settle(cloud, "the drained guests deleted")


# ---- (evac) ------------------------------------------------------------------------------


async def part_evac(cloud: QemuCloud, args: argparse.Namespace) -> None:
    for h in QEMU_HOSTS:
        await condition(cloud, h, "maintenance")
    ids = [f"e{i}" for i in range(args.evac_instances)]
    await place(cloud, DRAINED, ids, held=QEMU_HOSTS)
    h4 = cloud.fabric[DRAINED]
    stale = {guest_netns(guest_base(h4.netns, DRAINED), i) for i in ids}
    since = await last_seq(cloud)
    cloud.kill_agent(DRAINED)
    underlay(cloud, DRAINED, up=False)  # type: ignore[arg-type]
    died = time.time()
    started = time.perf_counter()
    try:
        async def rebuilt() -> bool:
            for i in ids:
                s = await cloud.state("instance", i)
                if not (s and s["host"] != DRAINED and s["observed"] == "running"
                        and s["observed_generation"] == s["generation"]):
                    return False
            return True

        done = await wait_until("every instance rebuilt elsewhere", rebuilt, cloud.processes,
                                120, POLL_S)
    finally:
        underlay(cloud, DRAINED, up=True)  # type: ignore[arg-type]
    log = await log_since(cloud, since)
    down = next((o.at for o in log if o.id == DRAINED and o.type == "HostDown"), None)
    evac = next((o.at for o in log if o.type == "EvacuateHost"), None)

    def after(at: int | None) -> str:
        return "?" if at is None else f"{at / 1000 - died:.1f} s"

    say(f"\n(evac) {len(ids)} namespace guests on {DRAINED}; its agent SIGKILLed and its"
        f" underlay cut; replica --down-after {args.down_after:g} --evacuate-after"
        f" {args.evacuate_after:g}")
    say(f"  every one running elsewhere {done - started:.1f} s after the death (host down"
        f" at {after(down)}, EvacuateHost at {after(evac)}; so"
        f" {done - started - args.down_after - args.evacuate_after:.1f} s beyond the two"
        " timers)")
    cloud.agent(DRAINED)
    back = time.perf_counter()

    async def cleaned() -> bool:
        return not stale & netns_names()

    gone = await wait_until("the stale copies removed", cleaned, cloud.processes, 120, POLL_S)
    say(f"  {DRAINED}'s agent started again: its {len(stale)} stale copies gone"
        f" {gone - back:.1f} s later")
    await settle(cloud, "after the return")


# ---- the run -----------------------------------------------------------------------------


async def body_async(run: MigrateRun, args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    cloud, nc = await build(run, args)
    try:
        assert run.fabric is not None
        say(f"cloud built in {time.perf_counter() - t0:.1f} s (namespaces"
            f" {run.fabric.prefix}-*): {', '.join(HOSTS)}"
            + (f" (libvirtds on {', '.join(QEMU_HOSTS)})" if cloud.daemons else "")
            + f"; load average {load()}")
        if "hops" in args.part:
            await part_hops(cloud, args, run.tmp)
        if "drain" in args.part:
            await part_drain(cloud, args)
        if "evac" in args.part:
            await part_evac(cloud, args)
    finally:
        await cloud.pg.close()
        await nc.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--part", default="hops,drain,evac",
                        type=lambda s: set(s.split(",")), help="which parts: hops,drain,evac")
    parser.add_argument("--hops", type=int, default=10)
    parser.add_argument("--instances", type=int, default=20, help="(drain) guests drained")
    parser.add_argument("--limits", default=[1, 2, 4],
                        type=lambda s: [int(k) for k in s.split(",")],
                        help="(drain) migration limits K")
    parser.add_argument("--evac-instances", type=int, default=10)
    parser.add_argument("--down-after", type=float, default=3.0)
    parser.add_argument("--evacuate-after", type=float, default=5.0)
    args = parser.parse_args(argv)
    if unknown := args.part - {"hops", "drain", "evac"}:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    tmp = Path(tempfile.mkdtemp(prefix="orch-migrate-"))
    run = MigrateRun(tmp, Stack(tmp / "stack"))
    return harness.run(lambda: measure(run, args), run.teardown)


def measure(run: MigrateRun, args: argparse.Namespace) -> None:
    say(f"bench/migrate.py: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, kernel"
        f" {os.uname().release}; load average at start {load()} (the machine is shared:"
        " read the figures with it)")
    asyncio.run(body_async(run, args))
    say(f"load average at end {load()}")


if __name__ == "__main__":
    sys.exit(main())
