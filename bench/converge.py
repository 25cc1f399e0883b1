"""Convergence benchmark: from a user's command to the agent's report of it being applied.

    .venv/bin/python bench/converge.py [--instances N] [--rate R] [--seconds S]
                                       [--rates R1,R2,..] [--step-seconds S] [--no-qemu]

One run, one process tree: a private nats-server and PostgreSQL (the embedded Stack) in a
temporary directory, one orchestrator replica and three agents (libvirt test:///) as child
processes, each in its own session. Everything is torn down at exit, on failure and on
Ctrl-C or SIGTERM too: children (SIGTERM, then SIGKILL), servers, the temporary directory,
and the QEMU guest of (c) if it still exists.

(a) latency at a steady rate: Start/Stop commands, alternately per instance, on a fixed
    schedule; per command, the time from handing it to the NATS client to this process
    receiving the outcome of the agent's Applied report for the generation it produced.
(b) peak sustained rate: the same at increasing rates, until one does not converge.
(c) QEMU boot time, if libvirtd answers at qemu:///system.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import harness
import libvirt
import msgspec
import uvloop
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from proctree import proc_stats, tree_cpu_seconds

from agents.drivers.vm import DEFAULT_CONSOLE_DIR, READY_MARKER, domain_name
from events.bus import Publisher, connect
from events.heartbeats import read_heartbeats
from events.subjects import command_msg_id, command_subject, event_subject
from events.topology import REPLICAS_ENV, ensure_topology
from orchestrator.children import Children
from orchestrator.embedded import Stack, StackInfo
from orchestrator.store import connect_pg
from schemas.codec import command_from_dict, encode
from schemas.commands import Command, StartInstance, StopInstance
from schemas.outcomes import Outcome

HOSTS = ("h1", "h2", "h3")
TINY = {"vcpus": 1, "memory_mib": 128, "image": "tiny"}
HOST_MEMORY_MIB = 1 << 20  # 1 TiB each: room for every tiny instance
QEMU_HOST, QEMU_URI = "hq", "qemu:///system"
QEMU_HOST_MEMORY_MIB = 4 << 20  # far more free memory than h1..h3: the scheduler picks hq
TARGET_P50_MS, TARGET_P99_MS = 10.0, 50.0  # (a) at 500 cmd/s
PEAK_P99_MS = 1000.0  # (b): a rate is sustained if all converge and p99 stays under this
DRAIN_S = 5.0  # after a phase: every Applied must be seen within this
SETTLE_TIMEOUT_S = 180.0
BOOT_TIMEOUT_S = 180.0
CHILD_STOP_GRACE_S = 10.0
POLL_S = 0.05

Frame = tuple[str, bytes, str, str, str]  # subject, payload, cmd_id, Nats-Msg-Id, instance
_outcome = msgspec.json.Decoder(Outcome)


def say(line: str = "") -> None:
    print(line, flush=True)


# ---- child processes --------------------------------------------------------------------


def start_replica(children: Children, replica_id: str) -> None:
    children.start(replica_id, "orchestrator.cli", "orchestrator", "--id", replica_id)


def start_agent(children: Children, host: str, libvirt_uri: str = "test", *extra: str) -> None:
    children.start(f"agent-{host}", "agents", "--host", host, "--libvirt", libvirt_uri, *extra)


# ---- waiting ----------------------------------------------------------------------------


async def wait_until(what: str, check: Callable[[], Awaitable[bool]], children: Children,
                     timeout: float = SETTLE_TIMEOUT_S, interval: float = POLL_S) -> float:
    """Poll check() until it holds; return the perf_counter time it was first seen true."""
    deadline = time.perf_counter() + timeout
    while not await check():
        children.check()
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout:.0f} s")
        await asyncio.sleep(interval)
    return time.perf_counter()


async def replica_ready(pg_dsn: str, children: Children) -> asyncpg.Connection:
    """Connect once the replica has created the schema and owns every partition."""

    async def owns_all() -> bool:
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            conn = await connect_pg(pg_dsn)
            try:
                return bool(await conn.fetchval(
                    "SELECT count(*) > 0 AND bool_and(owner IS NOT NULL) FROM partitions"))
            finally:
                await conn.close()
        return False

    await wait_until("replica owns every partition", owns_all, children, timeout=60)
    return await connect_pg(pg_dsn)


async def heartbeats_from(js: JetStreamContext, hosts: Sequence[str]) -> bool:
    return set(hosts) <= set(await read_heartbeats(js))


async def scheduler_knows(conn: asyncpg.Connection, hosts: Sequence[str]) -> bool:
    known = await conn.fetchval(
        "SELECT coalesce(array_agg(k), '{}') FROM entities e,"
        " jsonb_object_keys(e.state->'hosts') k WHERE e.kind = 'scheduler'")
    return set(hosts) <= set(known)


async def applied_count(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval(
        "SELECT count(*) FROM entities WHERE kind = 'instance' AND state->>'status' = 'placed'"
        " AND (state->>'observed_generation')::int = (state->>'generation')::int"))


async def generations(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch("SELECT id, (state->>'generation')::int AS g FROM entities"
                            " WHERE kind = 'instance'")
    return {r["id"]: r["g"] for r in rows}


# ---- CPU accounting ---------------------------------------------------------------------


@dataclass
class CpuMeter:
    """CPU seconds used by each part of the system (process trees: postgres backends too)."""

    groups: dict[str, list[int]]  # name -> root pids

    def sample(self) -> dict[str, float]:
        stats = proc_stats()
        used = {name: tree_cpu_seconds(stats, pids) for name, pids in self.groups.items()}
        used["benchmark"] = time.process_time()
        return used

    @staticmethod
    def since(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {name: after[name] - before[name] for name in before}


# ---- setting the scene ------------------------------------------------------------------


def command(source: str, doc: dict[str, object]) -> tuple[str, Command]:
    return source, command_from_dict(doc)


async def register_hosts(pub: Publisher, hosts: Sequence[str], memory_mib: int) -> None:
    await pub.publish_many([command("admin", dict(
        type="RegisterHost", cmd_id=f"bench-reg-{h}", id=h, vcpus=4096, memory_mib=memory_mib))
        for h in hosts])


async def create_instances(pub: Publisher, ids: Sequence[str]) -> None:
    await pub.publish_many([command("user", dict(
        type="CreateInstance", cmd_id=f"bench-create-{i}", id=i, template=TINY)) for i in ids])


# ---- following the outcomes -------------------------------------------------------------


@dataclass(slots=True)
class Tracked:
    """One published command: when it was sent, folded, and applied by its agent."""

    instance: str
    published: float
    folded: float | None = None  # its own outcome received
    applied: float | None = None  # the Applied outcome for its generation (or a newer) received
    generation: int | None = None
    stored_ms: int = 0  # JetStream timestamp of the command (its outcome's `at`)
    report_ms: int = 0  # JetStream timestamp of the agent's report that closed it


def applied_generation(cmd_id: str) -> int:
    """The generation an agent's report is for: its cmd_id is applied-HOST-ID-GEN-ATTEMPT."""
    return int(cmd_id.rsplit("-", 2)[1])


class Tracker:
    """Matches each command to the Applied report of the generation it produced.

    Outcomes of one instance arrive in fold order (one partition, one subject), so a
    user command's outcome, which says whether it bumped the generation, always comes
    before the agent's report of that generation. A report for generation g closes every
    open command of the instance up to g: the agent may skip to the newest job.
    """

    def __init__(self, generations: dict[str, int]) -> None:
        self.generation = dict(generations)  # instance -> newest generation folded
        self.by_cmd: dict[str, Tracked] = {}
        self.waiting: dict[str, deque[Tracked]] = defaultdict(deque)
        self.rejected = 0
        self.received = 0

    def publish(self, cmd_id: str, instance: str) -> Tracked:
        tracked = self.by_cmd[cmd_id] = Tracked(instance, time.perf_counter())
        return tracked

    async def on_message(self, msg: Msg) -> None:
        now = time.perf_counter()
        self.received += 1
        outcome = _outcome.decode(msg.data)
        if outcome.type == "Applied":
            if outcome.accepted:
                self._applied(outcome.id, applied_generation(outcome.cmd_id), now, outcome.at)
            return
        tracked = self.by_cmd.pop(outcome.cmd_id, None)
        if tracked is None:
            return  # not ours: a follow-up, a reconcile, a liveness change
        tracked.folded, tracked.stored_ms = now, outcome.at
        if not outcome.accepted:
            self.rejected += 1
        elif "PowerSet" not in outcome.events:
            tracked.applied = now  # already so: nothing for the agent to do
        else:
            self.generation[outcome.id] += 1
            tracked.generation = self.generation[outcome.id]
            self.waiting[outcome.id].append(tracked)

    def _applied(self, instance: str, generation: int, now: float, at_ms: int) -> None:
        queue = self.waiting.get(instance)
        while queue and (queue[0].generation or 0) <= generation:
            tracked = queue.popleft()
            tracked.applied, tracked.report_ms = now, at_ms

    def idle(self) -> bool:
        return not self.by_cmd and not any(self.waiting.values())


# ---- steady-rate phases -----------------------------------------------------------------


@dataclass
class Workload:
    """Start/Stop commands round-robin over the instances; each one flips its power."""

    ids: list[str]
    running: dict[str, bool] = field(default_factory=dict)
    issued: int = 0

    def __post_init__(self) -> None:
        self.running = {i: True for i in self.ids}

    def take(self, n: int) -> list[Frame]:
        frames = []
        for _ in range(n):
            instance = self.ids[self.issued % len(self.ids)]
            self.running[instance] = not self.running[instance]
            cls = StartInstance if self.running[instance] else StopInstance
            cmd = cls(cmd_id=f"bench-power-{self.issued}", id=instance)
            frames.append((command_subject("user", cmd.kind, instance), encode(cmd), cmd.cmd_id,
                           command_msg_id("user", cmd.kind, instance, cmd.cmd_id), instance))
            self.issued += 1
        return frames


@dataclass
class PhaseResult:
    rate: float  # asked
    achieved: float  # published
    commands: int
    folded_ms: list[float]  # publish -> its own outcome
    applied_ms: list[float]  # publish -> Applied outcome, for those that converged
    reported_ms: list[float]  # command stored -> report stored (JetStream timestamps)
    unconverged: int
    rejected: int
    publish_errors: int
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds while publishing
    busy_s: float = 0.0  # how long it published

    def pct(self, p: float, which: str = "applied") -> float:
        values = {"applied": self.applied_ms, "folded": self.folded_ms,
                  "reported": self.reported_ms}[which]
        return percentile(values, p)

    def sustained(self) -> bool:
        return (self.unconverged == 0 and self.publish_errors == 0
                and self.pct(99) <= PEAK_P99_MS)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (nan if there are none)."""
    if not values:
        return math.nan
    return values[min(len(values) - 1, max(0, math.ceil(p / 100 * len(values)) - 1))]


async def publish_paced(js: JetStreamContext, tracker: Tracker, frames: Sequence[Frame],
                        rate: float) -> tuple[list[Tracked], list[asyncio.Future], float]:
    """Publish frame k at t0 + k/rate (a fixed schedule: no drift); return the achieved rate."""
    tracked: list[Tracked] = []
    acks: list[asyncio.Future] = []
    t0 = time.perf_counter()
    k = 0
    while k < len(frames):
        due = min(len(frames), int((time.perf_counter() - t0) * rate) + 1)
        for subject, data, cmd_id, msg_id, instance in frames[k:due]:
            tracked.append(tracker.publish(cmd_id, instance))
            acks.append(await js.publish_async(subject, data, headers={"Nats-Msg-Id": msg_id}))
        k = due
        await asyncio.sleep(max(0.0, t0 + k / rate - time.perf_counter()))
    span = tracked[-1].published - t0 + 1 / rate if tracked else math.inf
    return tracked, acks, len(tracked) / span


async def publish_errors(acks: Sequence[asyncio.Future]) -> int:
    results = await asyncio.gather(*acks, return_exceptions=True)
    return sum(1 for r in results if isinstance(r, BaseException) or r.duplicate)


async def steady_phase(js: JetStreamContext, tracker: Tracker, workload: Workload,
                       children: Children, meter: CpuMeter, rate: float,
                       seconds: float) -> PhaseResult:
    frames = workload.take(int(rate * seconds))
    rejected0, cpu0, t0 = tracker.rejected, meter.sample(), time.perf_counter()
    tracked, acks, achieved = await publish_paced(js, tracker, frames, rate)
    cpu, busy_s = meter.since(cpu0, meter.sample()), time.perf_counter() - t0
    deadline = time.perf_counter() + DRAIN_S
    while any(t.applied is None for t in tracked) and time.perf_counter() < deadline:
        children.check()
        await asyncio.sleep(POLL_S)
    errors = await publish_errors(acks)
    return PhaseResult(
        rate=rate, achieved=achieved, commands=len(tracked),
        folded_ms=sorted(1000 * (t.folded - t.published) for t in tracked if t.folded),
        applied_ms=sorted(1000 * (t.applied - t.published) for t in tracked if t.applied),
        reported_ms=sorted(float(t.report_ms - t.stored_ms) for t in tracked if t.report_ms),
        unconverged=sum(1 for t in tracked if t.applied is None),
        rejected=tracker.rejected - rejected0, publish_errors=errors, cpu=cpu, busy_s=busy_s)


async def drain(tracker: Tracker, children: Children, timeout: float) -> bool:
    """Wait until every command published so far is applied; False if it takes too long."""
    try:
        await wait_until("backlog drained", _async(tracker.idle), children, timeout)
    except TimeoutError:
        return False
    return True


def _async(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def wrapped() -> bool:
        return check()
    return wrapped


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_latency(r: PhaseResult, instances: int, seconds: float) -> None:
    say(f"(a) latency at a steady {r.rate:,.0f} cmd/s for {seconds:.0f} s: {r.commands:,}"
        f" Start/Stop commands round-robin over {instances} instances (each flips the power),"
        f" {len(HOSTS)} agents on libvirt test:///")
    say("    latency = receipt in this process of the Applied outcome on evt.instance.<id>"
        " (published by the outbox relay right after the commit that folds the agent's"
        " report) - the moment the command was handed to the NATS client (perf_counter)")
    say(f"    achieved publish rate        {r.achieved:>10,.0f} cmd/s")
    for label, which in (("publish -> own outcome       ", "folded"),
                         ("stored -> report stored (*)  ", "reported"),
                         ("publish -> Applied folded    ", "applied")):
        say(f"    {label}p50 {r.pct(50, which):7.1f}  p90 {r.pct(90, which):7.1f}  p99"
            f" {r.pct(99, which):7.1f}  max {r.pct(100, which):7.1f} ms")
    say("    (*) JetStream timestamps (ms) of the command and of the agent's report: the fold,"
        " the relay of the job, and the agent")
    say(f"    p50 {r.pct(50):7.1f} ms   target <= {TARGET_P50_MS:.0f} ms"
        f"   {verdict(r.pct(50) <= TARGET_P50_MS)}")
    say(f"    p99 {r.pct(99):7.1f} ms   target <= {TARGET_P99_MS:.0f} ms"
        f"   {verdict(r.pct(99) <= TARGET_P99_MS)}")
    total = sum(r.cpu.values())
    say(f"    CPU while publishing, in cores (of {os.cpu_count()}): " + ", ".join(
        f"{name} {used / r.busy_s:.2f}" for name, used in r.cpu.items())
        + f"; all {total / r.busy_s:.2f}; per command {1000 * total / r.commands:.2f} ms")
    say(f"    never converged (Applied not seen {DRAIN_S:.0f} s after the last publish):"
        f" {r.unconverged}   target 0   {verdict(r.unconverged == 0)}"
        f"   (rejected {r.rejected}, publish errors {r.publish_errors})")


def print_sweep(results: Sequence[PhaseResult], planned: Sequence[float],
                seconds: float) -> None:
    say(f"(b) peak sustained rate: {seconds:.0f} s per rate; sustained = every Applied seen"
        f" within {DRAIN_S:.0f} s of the phase's end and p99 <= {PEAK_P99_MS:.0f} ms")
    say(f"    {'rate':>7} {'achieved':>9} {'commands':>9} {'p50 ms':>9} {'p99 ms':>9}"
        f" {'max ms':>9} {'unconverged':>12} {'CPU cores':>10}  sustained")
    for r in results:
        say(f"    {r.rate:>7,.0f} {r.achieved:>9,.0f} {r.commands:>9,} {r.pct(50):>9.1f}"
            f" {r.pct(99):>9.1f} {r.pct(100):>9.1f} {r.unconverged:>12,}"
            f" {sum(r.cpu.values()) / r.busy_s:>10.2f}  " + ("yes" if r.sustained() else "no"))
    for rate in planned[len(results):]:
        say(f"    {rate:>7,.0f}   (not run: a lower rate was not sustained)")
    best = max((r.rate for r in results if r.sustained()), default=None)
    say("    PEAK SUSTAINED RATE          " + (f"{best:,.0f} cmd/s" if best else
                                               "none of the rates tried"))


# ---- (c) QEMU boot ----------------------------------------------------------------------


def qemu_unreachable(uri: str) -> str | None:
    """Why libvirtd cannot be used at uri, or None if it answers."""
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        return f"libvirtd not reachable at {uri}: {exc}"
    conn.close()
    return None


def domain_exists(name: str) -> bool:
    conn = libvirt.open(QEMU_URI)
    try:
        conn.lookupByName(name)
        return True
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise
    finally:
        conn.close()


def remove_domain(name: str) -> bool:
    """Destroy and undefine a leftover domain of ours; True if there was one."""
    conn = libvirt.open(QEMU_URI)
    try:
        dom = conn.lookupByName(name)
        if dom.isActive():
            dom.destroy()
        dom.undefine()
        return True
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()


@dataclass
class QemuGuest:
    """The instance booted in (c): removed at exit if the run did not get to delete it."""

    instance: str = field(default_factory=lambda: f"bench-{uuid.uuid4().hex[:8]}")

    @property
    def domain(self) -> str:
        return domain_name(self.instance)

    @property
    def console(self) -> Path:
        return DEFAULT_CONSOLE_DIR / f"{self.instance}.log"

    def ready(self) -> bool:
        try:
            return f"{READY_MARKER} {self.instance}" in self.console.read_text(errors="replace")
        except OSError:
            return False

    def cleanup(self) -> None:
        if remove_domain(self.domain):
            say(f"    removed leftover domain {self.domain}")
        self.console.unlink(missing_ok=True)


@dataclass
class BootResult:
    ready_s: float  # CreateInstance published -> ready marker on the console
    applied_s: float  # -> the projection says applied (running)
    gone_s: float  # DeleteInstance published -> the domain is gone from libvirt


async def boot_once(pub: Publisher, conn: asyncpg.Connection, children: Children,
                    guest: QemuGuest) -> BootResult:
    create = command("user", dict(type="CreateInstance", cmd_id=f"{guest.instance}-create",
                                  id=guest.instance, template=TINY))

    async def applied() -> bool:
        return bool(await conn.fetchval(
            "SELECT state->>'observed' = 'running' AND state->>'host' = $2"
            " FROM entities WHERE kind = 'instance' AND id = $1", guest.instance, QEMU_HOST))

    t0 = time.perf_counter()
    await pub.publish(*create)
    ready_task = asyncio.create_task(wait_until(  # both clocks run at once
        "guest ready marker", _async(guest.ready), children, BOOT_TIMEOUT_S, interval=0.01))
    try:
        applied_at = await wait_until("guest applied", applied, children, BOOT_TIMEOUT_S,
                                      interval=0.01)
        ready = await ready_task
    finally:
        ready_task.cancel()
    t1 = time.perf_counter()
    await pub.publish(*command("user", dict(type="DeleteInstance", id=guest.instance,
                                            cmd_id=f"{guest.instance}-delete")))

    async def gone() -> bool:
        return not await asyncio.to_thread(domain_exists, guest.domain)

    gone_at = await wait_until("guest domain removed", gone, children, 60, interval=0.01)
    return BootResult(ready - t0, applied_at - t0, gone_at - t1)


async def qemu_phase(js: JetStreamContext, conn: asyncpg.Connection, children: Children,
                     guest: QemuGuest) -> None:
    reason = await asyncio.to_thread(qemu_unreachable, QEMU_URI)
    if reason is not None:
        say(f"(c) QEMU boot: skipped: {reason}")
        return
    start_agent(children, QEMU_HOST, QEMU_URI)
    await wait_until("hq heartbeats", lambda: heartbeats_from(js, [QEMU_HOST]), children, 120)
    pub = Publisher(js)
    await register_hosts(pub, [QEMU_HOST], QEMU_HOST_MEMORY_MIB)
    await wait_until("scheduler knows hq", lambda: scheduler_knows(conn, [QEMU_HOST]),
                     children)
    result = await boot_once(pub, conn, children, guest)
    say(f"(c) QEMU boot ({QEMU_URI}, TCG): 1 instance, image tiny, 1 vCPU, 128 MiB, on"
        f" host {QEMU_HOST}")
    say(f"    CreateInstance published -> Applied (running) in the projection"
        f"  {result.applied_s:7.2f} s")
    say(f"    CreateInstance published -> '{READY_MARKER} <id>' on the console"
        f"  {result.ready_s:7.2f} s   (the boot time)")
    say(f"    DeleteInstance published -> domain gone from libvirt"
        f"            {result.gone_s:7.2f} s")


# ---- the run ----------------------------------------------------------------------------


@dataclass
class Args:
    instances: int
    rate: float
    seconds: float
    rates: list[float]
    step_seconds: float
    qemu: bool
    sync_always: bool
    servers: int


async def setup(js: JetStreamContext, info: StackInfo, children: Children,
                ids: Sequence[str]) -> asyncpg.Connection:
    """One replica, three agents, hosts registered, every instance created and applied."""
    start_replica(children, "r1")
    for host in HOSTS:
        start_agent(children, host)
    conn = await replica_ready(info.pg_dsn, children)
    await wait_until("agents heartbeat", lambda: heartbeats_from(js, HOSTS), children, 60)
    pub = Publisher(js)
    await register_hosts(pub, HOSTS, HOST_MEMORY_MIB)
    await wait_until("scheduler knows the hosts", lambda: scheduler_knows(conn, HOSTS),
                     children)
    started = time.perf_counter()
    await create_instances(pub, ids)
    done = await wait_until(f"{len(ids)} instances applied",
                            lambda: _at_least(applied_count(conn), len(ids)), children)
    say(f"setup: {len(ids)} instances created and applied by {len(HOSTS)} agents in"
        f" {done - started:.1f} s")
    return conn


async def _at_least(count: Awaitable[int], n: int) -> bool:
    return await count >= n


def cpu_meter(stack: Stack, children: Children) -> CpuMeter:
    agents = [p.pid for name, p in children.procs.items() if name.startswith("agent-")]
    return CpuMeter({"replica": [children.procs["r1"].pid], "agents": agents,
                     "nats-server": stack.nats.pids, "postgres": [stack.pg.pid]})


async def bench(args: Args, stack: Stack, children: Children, guest: QemuGuest) -> None:
    info = stack.info
    nc = await connect(info.nats_url, "bench-converge")
    try:
        js = nc.jetstream()
        await ensure_topology(js)
        ids = [f"vm{n:04d}" for n in range(args.instances)]
        conn = await setup(js, info, children, ids)
        try:
            say(await harness.environment(nc, conn, stack.sync_always, stack.servers))
            tracker = Tracker(await generations(conn))
            sub = await js.subscribe(event_subject("instance", ">"), cb=tracker.on_message,
                                     ordered_consumer=True, deliver_policy=DeliverPolicy.NEW)
            workload, meter = Workload(ids), cpu_meter(stack, children)
            steady = await steady_phase(js, tracker, workload, children, meter, args.rate,
                                        args.seconds)
            print_latency(steady, len(ids), args.seconds)
            if not await drain(tracker, children, 60):
                raise RuntimeError("the steady phase never converged: no point going on")
            results: list[PhaseResult] = []
            for rate in args.rates:
                results.append(await steady_phase(js, tracker, workload, children, meter,
                                                  rate, args.step_seconds))
                if not results[-1].sustained():
                    break
            print_sweep(results, args.rates, args.step_seconds)
            drained = await drain(tracker, children, SETTLE_TIMEOUT_S)
            say(f"    backlog after the sweep: {'drained' if drained else 'NOT drained'};"
                f" projection: {await applied_count(conn)}/{len(ids)} instances applied;"
                f" {tracker.received:,} outcomes received")
            await sub.unsubscribe()
            if args.qemu:
                await qemu_phase(js, conn, children, guest)
            else:
                say("(c) QEMU boot: skipped (--no-qemu)")
        finally:
            await conn.close()
    finally:
        await nc.close()


def parse_args(argv: Sequence[str] | None) -> Args:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--rate", type=float, default=500.0, help="(a): commands per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="(a): duration")
    parser.add_argument("--rates", default="500,1000,2000,4000",
                        help="(b): rates to try, in increasing order")
    parser.add_argument("--step-seconds", type=float, default=10.0, help="(b): per rate")
    parser.add_argument("--no-qemu", dest="qemu", action="store_false", help="skip (c)")
    parser.add_argument("--servers", type=int, choices=(1, 3), default=1,
                        help="3: a NATS cluster, every stream replicated three times")
    parser.add_argument("--sync-always", action="store_true",
                        help="nats-server fsyncs every write (as `orch up --sync-always`)")
    ns = parser.parse_args(argv)
    return Args(ns.instances, ns.rate, ns.seconds,
                [float(r) for r in ns.rates.split(",") if r], ns.step_seconds, ns.qemu,
                ns.sync_always, ns.servers)


def teardown(children: Children | None, stack: Stack, guest: QemuGuest, tmp: Path) -> None:
    if children is not None:
        killed = children.stop(CHILD_STOP_GRACE_S)
        if killed:
            say(f"teardown: {', '.join(killed)} did not exit within {CHILD_STOP_GRACE_S:.0f} s"
                " of SIGTERM: killed")
        if "agent-" + QEMU_HOST in children.procs:
            guest.cleanup()
    stack.stop()
    shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="orch-converge-"))
    stack = Stack(tmp / "stack", args.sync_always, args.servers)
    if args.servers > 1:  # for this process's topology and every child's
        os.environ[REPLICAS_ENV] = "3"
    guest = QemuGuest()
    children: Children | None = None

    def body() -> None:
        nonlocal children
        info = stack.start()
        children = Children(tmp, {**os.environ, "ORCH_NATS_URL": info.nats_url,
                                        "ORCH_PG_DSN": info.pg_dsn})
        uvloop.run(bench(args, stack, children, guest))

    return harness.run(body, lambda: teardown(children, stack, guest, tmp))


if __name__ == "__main__":
    sys.exit(main())
