"""LB system benchmark: health and scaling as the client behind the router sees them.

    .venv/bin/python bench/lb_system.py [--part 1,2] [--runs 3] [--reuse-runs 3]
                                        [--rate 50] [--interval-ms 500] [--timeout-ms 300]
                                        [--rise 2] [--fall 2]

One cloud, built once as tests/test_lb.py builds it: a Fabric of 3 hypervisors (namespace
guests) and 2 LB nodes, the Edge (a bird2 router with ECMP and a client behind it), the
embedded Stack, a replica and an agent per host (`--lb --bgp-peer ...` on the nodes) as
child processes; a pool of 4 on a private network behind one balancer whose service has
a short health check. Meanwhile the client opens a new connection to the VIP every
1/rate s; each answer names its backend (monotonic timestamps).

(1) A backend fails for real (its guest drops the service port, tests/test_lb.py's
    guest_block) -> the start of the last new connection that reached it. Such a
    connection is not answered; the nodes' conntrack says which backend each unanswered
    one was sent to. Then it is unblocked and back (rise x interval) before the next run.
(2) ScalePool to one member more (the publish) -> the first answer naming the new
    member: 4 -> 5 -> 6 -> 7, each on a new address, then back to 4; then --reuse-runs
    times 4 -> 5 and back, each new member on the address the last one freed (what the
    LB nodes' neighbour tables hold for it is shown when it is slow to answer).

Each is measured --runs times (min/median/max), with where the time goes from the history
table (each command's JetStream time, `outcome->>'at'`, against the wall clock at the
failure or the publish). Everything is removed at exit, also after Ctrl-C, SIGTERM or a
failure: children, the edge's and the fabric's namespaces (guests included), servers, the
temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import ipaddress
import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import harness
from converge import replica_ready, wait_until
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # tests/: the LB cloud and its helpers
    sys.path.append(str(REPO))

from events.bus import Publisher, connect  # noqa: E402
from events.topology import ensure_topology  # noqa: E402
from orchestrator.edge import Edge  # noqa: E402
from orchestrator.embedded import Stack  # noqa: E402
from orchestrator.fabric import Fabric, netns_socket  # noqa: E402
from tests.conftest import Processes  # noqa: E402
from tests.test_lb import (  # noqa: E402
    CIDR,
    HYPERVISORS,
    NODES,
    PORT,
    TEMPLATE,
    VNI,
    LbCloud,
    guest_block,
)

POOL, LB, NET = "pool", "web", "web"
SIZE = 4
SETTLE_TIMEOUT_S = 180.0
CHILD_STOP_GRACE_S = 10.0
POLL_S = 0.02
METRICS_BASE_PORT = 19500
NEIGHBOURS_AFTER_S = 4.0  # a new member not answered by then: what the nodes' ARP holds


def say(line: str = "") -> None:
    print(line, flush=True)


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


# ---- the client: new connections to the VIP at a steady rate ------------------------------


@dataclass(frozen=True)
class Attempt:
    started: float  # monotonic
    sport: int
    answer: str | None  # the backend's id, or None (no answer within the timeout)


class Client:
    """New connections from the edge's client to vip:port, one every 1/rate_hz s on a fixed
    schedule, each in a pool thread (a hanging one delays none of the next); the source
    port of each is kept, to find its flow in the nodes' conntrack."""

    def __init__(self, netns: str, vip: str, port: int, rate_hz: float, timeout_s: float) -> None:
        self.netns, self.vip, self.port = netns, vip, port
        self.interval_s, self.timeout_s = 1.0 / rate_hz, timeout_s
        self.attempts: list[Attempt] = []
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(int(rate_hz * timeout_s * 2) + 8)
        self._launcher = threading.Thread(target=self._launch, daemon=True)

    def _attempt(self) -> None:
        started = time.monotonic()
        sport, answer = 0, None
        try:
            with netns_socket(self.netns, socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout_s)
                sock.bind(("0.0.0.0", 0))
                sport = sock.getsockname()[1]
                sock.connect((self.vip, self.port))
                sock.shutdown(socket.SHUT_WR)  # the guest service answers its id at once
                answer = sock.recv(256).decode(errors="replace").strip() or None
        except OSError:
            pass
        self.attempts.append(Attempt(started, sport, answer))

    def _launch(self) -> None:
        tick = time.monotonic()
        while not self._stop.is_set():
            self._pool.submit(self._attempt)
            tick += self.interval_s
            self._stop.wait(max(0.0, tick - time.monotonic()))

    def __enter__(self) -> Client:
        self._launcher.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._launcher.join()
        self._pool.shutdown(wait=True)


def unreplied_to(netns: str, vip: str, backend_ip: str) -> set[int]:
    """Source ports of the flows to the VIP that the node's conntrack DNATed to
    backend_ip and that never had a reply: connections sent to a dead backend."""
    done = subprocess.run(["ip", "netns", "exec", netns, "conntrack", "-L", "-p", "tcp",
                           "-d", vip, "--reply-src", backend_ip],
                          capture_output=True, text=True, timeout=20)
    ports = set()
    for line in done.stdout.splitlines():
        if "UNREPLIED" in line:
            # The first sport= is the original direction's: the client's port.
            ports.add(int(next(w for w in line.split() if w.startswith("sport="))[6:]))
    return ports


# ---- the history: where the time went -----------------------------------------------------


async def last_seq(pg: asyncpg.Connection) -> int:
    return int(await pg.fetchval("SELECT coalesce(max(seq), 0) FROM history"))


async def history_since(pg: asyncpg.Connection, seq: int) -> list[dict[str, Any]]:
    rows = await pg.fetch("SELECT seq, kind, id, outcome FROM history WHERE seq > $1"
                          " ORDER BY seq", seq)
    return [{"seq": r["seq"], "kind": r["kind"], "id": r["id"], **json.loads(r["outcome"])}
            for r in rows]


def first(rows: Sequence[dict[str, Any]], pred: Callable[[dict[str, Any]], bool],
          after: int = 0) -> dict[str, Any] | None:
    return next((r for r in rows if r["seq"] > after and r.get("accepted") and pred(r)), None)


def since(row: dict[str, Any] | None, wall0: float) -> float | None:
    """Seconds from wall0 (time.time()) to the command's JetStream time."""
    return None if row is None else row["at"] / 1000 - wall0


def timeline(rows: Sequence[dict[str, Any]], wall0: float, kinds: set[str]) -> list[str]:
    out = []
    for r in rows:
        if r["kind"] in kinds and r["type"] not in ("ReconcileLb",):
            why = f"  {r['reason']}" if r.get("reason") else ""
            jobs = f"  -> {len(r['jobs'])} job(s)" if r.get("jobs") else ""
            out.append(f"        {since(r, wall0):+7.3f} s  {r['type']:<16} {r['kind']}/{r['id']}"
                       f" from {r['source']}{jobs}{why}")
    return out


class JobTimes:
    """When each of the balancer's jobs was stored on JOB (the relay's publish), as
    JetStream stamped it: the same clock as the history's times."""

    def __init__(self) -> None:
        self.stored: list[tuple[float, str]] = []  # (seconds since the epoch, node)

    async def on_message(self, msg: Msg) -> None:
        self.stored.append((msg.metadata.timestamp.timestamp(), msg.subject.split(".")[1]))

    def first(self, node: str, after_ms: int) -> float | None:
        """The first job for node stored at or after a command's time (ms since the epoch)."""
        return next((t for t, n in self.stored if n == node and t * 1000 >= after_ms), None)


# ---- the cloud ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StackEnv:
    """What tests/test_lb.py's cloud asks of its env: the children's environment."""

    nats_url: str
    pg_dsn: str

    def environ(self) -> dict[str, str]:
        return {**os.environ, "ORCH_NATS_URL": self.nats_url, "ORCH_PG_DSN": self.pg_dsn}


class BenchCloud(LbCloud):
    """tests/test_lb.py's cloud, its LB nodes' agents serving their metrics too."""

    metrics: dict[str, int]

    def lb_agent(self, host: str) -> subprocess.Popen[bytes]:
        h = self.fabric[host]
        _, router_ip = self.edge.uplink(host)
        self.metrics[host] = METRICS_BASE_PORT + h.index
        return self.processes.orch(
            "agent", "--host", host, "--lb", "--netns", h.netns, "--underlay-ip",
            h.underlay_ip, "--bgp-peer", router_ip, "--bgp-peer-asn",
            str(self.edge.router_asn), "--bgp-asn", str(self.edge.node_asn),
            "--resync", "2", "--heartbeat", "0.5", "--metrics-port", str(self.metrics[host]),
            env=self.env.environ(), name=f"agent-{host}-{next(self.n)}")

    def agent_seconds(self) -> dict[str, dict[str, tuple[float, int]]]:
        """Per LB node: the sum and count of its agent's apply and resync histograms."""
        out: dict[str, dict[str, tuple[float, int]]] = {}
        for host, port in self.metrics.items():
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                          timeout=5).read().decode()
            values = {k: float(v) for k, v in (line.split()[:2] for line in text.splitlines()
                                               if line.startswith("orch_agent_"))}
            out[host] = {what: (values.get(f"orch_agent_{what}_seconds_sum", 0.0),
                                int(values.get(f"orch_agent_{what}_seconds_count", 0)))
                         for what in ("apply", "resync")}
        return out


def agent_lines(before: dict[str, dict[str, tuple[float, int]]],
                after: dict[str, dict[str, tuple[float, int]]]) -> list[str]:
    """What the LB nodes' agents spent meanwhile: applies (jobs and resync converges both)
    and full resyncs (every --resync 2 s, holding each balancer's lock in turn)."""
    out = []
    for host in after:
        parts = []
        for what in ("apply", "resync"):
            total = after[host][what][0] - before[host][what][0]
            n = after[host][what][1] - before[host][what][1]
            parts.append(f"{n} {'applies' if what == 'apply' else 'resyncs'}"
                         + (f" {1000 * total / n:.0f} ms each" if n else ""))
        out.append(f"{host}'s agent meanwhile: {', '.join(parts)}")
    return out


@dataclass
class Run:
    tmp: Path
    stack: Stack
    fabric: Fabric | None = None
    edge: Edge | None = None
    processes: Processes | None = None

    def teardown(self) -> None:
        if self.processes is not None:
            killed = self.processes.stop(CHILD_STOP_GRACE_S)
            if killed:
                say(f"teardown: {', '.join(killed)} killed after SIGTERM")
        if self.edge is not None:
            self.edge.teardown()
        if self.fabric is not None:
            self.fabric.teardown()
            if left := self.fabric.namespaces():
                say(f"teardown: namespaces left: {left}")
        self.stack.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


async def until(what: str, check: Callable[[], Awaitable[bool]], cloud: BenchCloud,
                timeout: float = SETTLE_TIMEOUT_S) -> float:
    return await wait_until(what, check, cloud.processes, timeout, POLL_S)


async def settle(cloud: BenchCloud, what: str) -> None:
    try:
        await cloud.settle(timeout=SETTLE_TIMEOUT_S)
    except AssertionError as exc:
        raise TimeoutError(f"{what}: {exc}") from exc


async def build(run: Run, args: argparse.Namespace) -> tuple[BenchCloud, str, JobTimes, Any]:
    run.fabric = Fabric([*HYPERVISORS, *NODES])
    run.fabric.setup()
    run.edge = Edge(run.fabric, list(NODES), avoid=[ipaddress.IPv4Network(CIDR)])
    run.edge.setup()
    info = run.stack.start()
    env = StackEnv(info.nats_url, info.pg_dsn)
    run.processes = Processes(run.tmp / "children", dict(os.environ))
    nc = await connect(info.nats_url, "bench-lb-system")
    js = nc.jetstream()
    await ensure_topology(js)
    run.processes.orch("orchestrator", "--id", "r1", "--deadline", "3600", "--down-after", "3",
                       env=env.environ(), name="r1")
    pg = await replica_ready(info.pg_dsn, run.processes)
    cloud = BenchCloud(run.fabric, env, run.processes, js, pg, Publisher(js), itertools.count())
    cloud.edge = run.edge
    cloud.metrics = {}
    for name in HYPERVISORS:
        await cloud.send("admin", type="RegisterHost", id=name, vcpus=64, memory_mib=1 << 16)
        cloud.agent(name)
    for name in NODES:
        await cloud.send("admin", type="RegisterHost", id=name, vcpus=4, memory_mib=4096,
                         role="lb")
        cloud.lb_agent(name)

    async def underlays() -> bool:
        return await pg.fetchval("SELECT count(*) FROM entities WHERE kind = 'host'"
                                 " AND state->>'underlay' IS NOT NULL") == len(run.fabric.hosts)

    await until("every host's underlay known", underlays, cloud, 120)
    jobs = JobTimes()
    await js.subscribe(f"job.*.lb.{LB}", cb=jobs.on_message, ordered_consumer=True,
                       deliver_policy=DeliverPolicy.NEW)
    vip = run.edge.vip(0)
    await cloud.send("user", type="CreateNetwork", id=NET, vni=VNI, cidr=CIDR)
    await cloud.send("user", type="CreatePool", id=POOL, size=SIZE, template=TEMPLATE)
    await cloud.send("user", type="CreateLoadBalancer", id=LB, vip=vip, pool=POOL,
                     services=[{"port": PORT, "target_port": TEMPLATE["rules"][0]["port"],
                                "health": health(args)}])
    await settle(cloud, "the pool and its balancer")
    members = await cloud.members()
    await until("both nodes serve the pool", lambda: cloud.serving(members), cloud)
    await asyncio.to_thread(run.edge.wait_routes, vip, NODES, 30)
    return cloud, vip, jobs, nc


def health(args: argparse.Namespace) -> dict[str, int]:
    return {"interval_ms": args.interval_ms, "timeout_ms": args.timeout_ms, "rise": args.rise,
            "fall": args.fall}


async def backend_ips(cloud: BenchCloud) -> dict[str, str]:
    lb = await cloud.lb(LB)
    return {i: b.ip for i, b in lb.backends.items()}


def spans(runs: Sequence[FailRun | ScaleRun],
          pairs: Sequence[tuple[str, str, str]]) -> list[str]:
    """Lines of 'label: min/median/max' of parts[to] - parts[from] over the runs with both
    ("" as from: 0, the failure or the publish; "*" in a key: the later of both nodes',
    "^": the earlier)."""
    def value(r: FailRun | ScaleRun, key: str) -> float | None:
        if not key:
            return 0.0
        for mark, pick in (("*", max), ("^", min)):
            if mark in key:
                got = [r.parts.get(key.replace(mark, n)) for n in NODES]
                return None if None in got else pick(g for g in got if g is not None)
        return r.parts.get(key)

    out = []
    for label, a, b in pairs:
        values = [vb - va for r in runs
                  if (va := value(r, a)) is not None and (vb := value(r, b)) is not None]
        out.append(f"      {label:<62} {stats(values)}")
    return out


def stats(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    return (f"min {min(values):6.3f} s  median {statistics.median(values):6.3f} s"
            f"  max {max(values):6.3f} s")


# ---- (1) a backend fails -> the last new connection that reached it -----------------------


@dataclass
class FailRun:
    victim: str
    last_s: float  # failure -> start of the last connection sent to it
    sent: int  # connections sent to it after the failure (unanswered)
    confirmed: int  # of those, found DNATed to it in a node's conntrack
    parts: dict[str, float] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    agents: list[str] = field(default_factory=list)


async def fail_once(cloud: BenchCloud, vip: str, jobs: JobTimes, victim: str,
                    args: argparse.Namespace) -> FailRun:
    members = await cloud.members()
    host = (await cloud.state("instance", victim))["host"]  # type: ignore[index]
    ip = (await backend_ips(cloud))[victim]
    seq0 = await last_seq(cloud.pg)
    spent0 = await asyncio.to_thread(cloud.agent_seconds)
    try:
        with Client(cloud.edge.client, vip, PORT, args.rate, args.client_timeout) as client:
            await asyncio.sleep(0.5)
            await asyncio.to_thread(guest_block, cloud, victim, host, True)
            wall0, failed = time.time(), time.monotonic()  # the drop rule is in force
            await until(f"{victim} out on both nodes", lambda: cloud.serving(members - {victim}),
                        cloud, 60)
            await asyncio.sleep(args.client_timeout + 0.5)  # attempts after it, answered
        dnated = set().union(*[unreplied_to(cloud.fabric[n].netns, vip, ip) for n in NODES])
        spent = agent_lines(spent0, await asyncio.to_thread(cloud.agent_seconds))
    finally:
        await asyncio.to_thread(guest_block, cloud, victim, host, False)
    after = [a for a in client.attempts if a.started >= failed]
    early = [a for a in client.attempts if a.started < failed - args.client_timeout
             and a.answer is None]
    if early:
        raise RuntimeError(f"{len(early)} connections failed before {victim} did")
    lost = [a for a in after if a.answer is None]
    if any(a.answer == victim for a in after):
        raise RuntimeError(f"{victim} answered after its service was blocked")
    confirmed = [a for a in lost if a.sport in dnated]
    rows = await history_since(cloud.pg, seq0)
    reached = confirmed or lost  # without conntrack's word: every unanswered one
    last_s = max((a.started for a in reached), default=failed) - failed
    r = FailRun(victim, last_s, len(lost), len(confirmed), agents=spent)
    down = [x for x in rows if x["type"] == "BackendHealth" and x.get("reason")
            and f"{victim}:{PORT} unhealthy" in x["reason"]]
    decisive = next((x for x in down if x.get("jobs")), None)
    for node in NODES:
        seen = next((x for x in down if x["source"] == node), None)
        if (t := since(seen, wall0)) is not None:
            r.parts[f"{node} reports it down (BackendHealth)"] = t
    if decisive is not None:
        r.parts["the report that takes it out, stored in CMD"] = since(decisive, wall0)
        for node in NODES:
            if (t := jobs.first(node, decisive["at"])) is not None:
                r.parts[f"{node}'s job without it on JOB (fold + relay)"] = t - wall0
            applied = first(rows, lambda x, n=node: x["type"] == "LbApplied"
                            and x["source"] == n, after=decisive["seq"])
            if (t := since(applied, wall0)) is not None:
                r.parts[f"{node} applied the job without it (LbApplied)"] = t
    r.lines = timeline(rows, wall0, {"lb"})
    await until(f"{victim} back on both nodes", lambda: cloud.serving(members), cloud, 60)
    return r


async def part_fail(cloud: BenchCloud, vip: str, jobs: JobTimes, args: argparse.Namespace) -> None:
    h = health(args)
    say(f"(1) a backend's service stops answering -> the last new connection that reached it"
        f" (client {args.rate:g} connections/s, {1000 * args.client_timeout:.0f} ms each)")
    say(f"    health check: interval {h['interval_ms']} ms, timeout {h['timeout_ms']} ms,"
        f" rise {h['rise']}, fall {h['fall']}: fall x interval = "
        f"{h['fall'] * h['interval_ms'] / 1000:.1f} s")
    runs = []
    members = sorted(await cloud.members())
    for k in range(args.runs):
        victim = members[k % len(members)]
        r = await fail_once(cloud, vip, jobs, victim, args)
        runs.append(r)
        say(f"    run {k + 1}: {victim}: last connection to it {r.last_s:6.3f} s after the"
            f" failure ({r.sent} sent to it meanwhile, unanswered; {r.confirmed} of them"
            f" found DNATed to it in the nodes' conntrack)")
        for what, t in sorted(r.parts.items(), key=lambda kv: kv[1]):
            say(f"        {t:+7.3f} s  {what}")
        for line in r.agents:
            say(f"        {line}")
        if k == 0:
            say("      the balancer's timeline of run 1 (seconds from the failure):")
            for line in r.lines:
                say(line)
    say(f"    failure -> last new connection to it: {stats([r.last_s for r in runs])}")
    lo = (h["fall"] - 1) * h["interval_ms"] / 1000 + h["timeout_ms"] / 1000
    hi = h["fall"] * h["interval_ms"] / 1000 + h["timeout_ms"] / 1000
    say(f"    where it goes: detection (a node's fall-th failed probe: between"
        f" (fall - 1) x interval + timeout = {lo:.1f} s and fall x interval + timeout ="
        f" {hi:.1f} s, by the probe's phase), then the fold and both nodes' jobs:")
    keys = sorted(dict.fromkeys(k for r in runs for k in r.parts),
                  key=lambda k: statistics.median([r.parts[k] for r in runs if k in r.parts]))
    for key in keys:
        say(f"      {key:<56} {stats([r.parts[key] for r in runs if key in r.parts])}")
    for r in runs:
        r.parts["last"] = r.last_s
    say("    as spans:")
    for line in spans(runs, [
            ("detection: the failure -> the report that takes it out", "",
             "the report that takes it out, stored in CMD"),
            ("the fold + relay: that report -> the later job on JOB",
             "the report that takes it out, stored in CMD",
             "*'s job without it on JOB (fold + relay)"),
            *((f"{n}'s agent: its job on JOB -> its LbApplied",
               f"{n}'s job without it on JOB (fold + relay)",
               f"{n} applied the job without it (LbApplied)") for n in NODES),
            ("the last connection to it -> the later LbApplied", "last",
             "* applied the job without it (LbApplied)")]):
        say(line)


# ---- (2) ScalePool -> the new member's first request ----------------------------------------


@dataclass
class ScaleRun:
    member: str
    first_s: float
    lost: int
    parts: dict[str, float] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    agents: list[str] = field(default_factory=list)
    neighbours: list[str] = field(default_factory=list)
    ip: str = ""
    reused: bool = False  # its address was another member's before


async def scale_once(cloud: BenchCloud, vip: str, jobs: JobTimes, args: argparse.Namespace,
                     size: int) -> ScaleRun:
    """ScalePool to ``size``, one more member than now: the time to its first request."""
    pool = await cloud.state("pool", POOL)
    assert pool is not None
    new = f"{POOL}-{pool['next_index']}"
    seq0 = await last_seq(cloud.pg)
    spent0 = await asyncio.to_thread(cloud.agent_seconds)
    neighbours: list[str] = []
    with Client(cloud.edge.client, vip, PORT, args.rate, args.client_timeout) as client:
        await asyncio.sleep(0.5)
        wall0, published = time.time(), time.monotonic()
        await cloud.send("user", type="ScalePool", id=POOL, size=size)

        async def answered() -> bool:
            if any(a.answer == new for a in list(client.attempts)):
                return True
            if not neighbours and time.monotonic() - published > NEIGHBOURS_AFTER_S:
                neighbours.extend(await neighbour_entries(cloud, new))
            return False

        await until(f"{new} answers through the VIP", answered, cloud, 120)
    first_s = min(a.started for a in client.attempts if a.answer == new) - published
    lost = sum(a.answer is None for a in client.attempts)
    grown = await cloud.members()
    await until(f"both nodes serve {new}", lambda: cloud.serving(grown), cloud, 60)
    spent = agent_lines(spent0, await asyncio.to_thread(cloud.agent_seconds))
    rows = await history_since(cloud.pg, seq0)
    r = ScaleRun(new, first_s, lost, agents=spent, neighbours=neighbours,
                 ip=(await backend_ips(cloud))[new])

    def at(label: str, pred: Callable[[dict[str, Any]], bool], after: int = 0) -> int:
        row = first(rows, pred, after)
        if (t := since(row, wall0)) is not None:
            r.parts[label] = t
        return row["seq"] if row else after

    at("ScalePool stored", lambda x: x["type"] == "ScalePool")
    at("CreateInstance of the member", lambda x: x["type"] == "CreateInstance" and x["id"] == new)
    at("its guest applied (Applied)", lambda x: x["type"] == "Applied" and x["id"] == new)
    at("it tells the pool it serves (MemberState)",
       lambda x: x["type"] == "MemberState" and x.get("events") and x["id"] == POOL)
    s = at("the pool sends the backends (PoolBackends)",
           lambda x: x["type"] == "PoolBackends" and x["id"] == LB)
    backends = first(rows, lambda x: x["seq"] == s)
    for node in NODES:
        if backends is not None and (t := jobs.first(node, backends["at"])) is not None:
            r.parts[f"{node}'s job with it, unhealthy, on JOB"] = t - wall0
        at(f"{node} applied the job with it, unhealthy (LbApplied)",
           lambda x, n=node: x["type"] == "LbApplied" and x["source"] == n, after=s)
    up = [x for x in rows if x["type"] == "BackendHealth" and x.get("reason")
          and f"{new}:{PORT} healthy" in x["reason"]]
    for node in NODES:
        if (t := since(next((x for x in up if x["source"] == node), None), wall0)) is not None:
            r.parts[f"{node} reports it up (BackendHealth)"] = t
    decisive = next((x for x in up if x.get("jobs")), None)
    if decisive is not None:
        for node in NODES:
            if (t := jobs.first(node, decisive["at"])) is not None:
                r.parts[f"{node}'s job with it healthy on JOB (fold + relay)"] = t - wall0
            at(f"{node} applied the job with it healthy (LbApplied)",
               lambda x, n=node: x["type"] == "LbApplied" and x["source"] == n,
               after=decisive["seq"])
    r.lines = timeline(rows, wall0, {"lb", "pool", "instance"})
    return r


async def scale_back(cloud: BenchCloud) -> None:
    await cloud.send("user", type="ScalePool", id=POOL, size=SIZE)
    await settle(cloud, "scaled back")
    members = await cloud.members()
    await until(f"both nodes serve the pool of {SIZE} again", lambda: cloud.serving(members),
                cloud, 60)


async def neighbour_entries(cloud: BenchCloud, member: str) -> list[str]:
    """The new member's address and MAC, and what each LB node's neighbour table says of
    that address: a member that reuses a freed address is reached at the MAC the node
    cached for the old one until that entry is probed again."""
    state = await cloud.state("instance", member)
    nic = (state or {}).get("nics", [{}])[0]
    if not nic.get("ip"):
        return [f"{member} has no address yet after {NEIGHBOURS_AFTER_S:.0f} s"]
    out = [f"{member} (not answered yet) has {nic['ip']} at {nic['mac']}; the LB nodes'"
           f" neighbour entries for it, {NEIGHBOURS_AFTER_S:.0f} s after the publish:"]
    for node in NODES:
        done = await asyncio.to_thread(
            subprocess.run, ["ip", "-n", cloud.fabric[node].netns, "neigh", "show", "to",
                             nic["ip"]], capture_output=True, text=True, timeout=10)
        out.append(f"  {node}: {done.stdout.strip() or 'none'}")
    return out


async def part_scale(cloud: BenchCloud, vip: str, jobs: JobTimes, args: argparse.Namespace) -> None:
    say(f"(2) ScalePool to one member more (the publish) -> the first answer naming the new"
        f" member (client {args.rate:g} connections/s)")
    held = {ip: m for m, ip in (await backend_ips(cloud)).items()}  # address -> who had it
    # (title, the sizes scaled to, scaled back to SIZE after each run or after the last)
    series = [(f"{SIZE} -> {SIZE + 1} -> ... -> {SIZE + args.runs}, each member on a new"
               " address", [SIZE + 1 + k for k in range(args.runs)], False)]
    if args.reuse_runs:
        series.append((f"{SIZE} -> {SIZE + 1} and back, each new member on the address the"
                       " last one freed (the fold gives the lowest free address)",
                       [SIZE + 1] * args.reuse_runs, True))
    for n, (title, sizes, back_each) in enumerate(series):
        say(f"  {title}:")
        runs: list[ScaleRun] = []
        for k, size in enumerate(sizes):
            r = await scale_once(cloud, vip, jobs, args, size)
            runs.append(r)
            r.reused = r.ip in held
            reuse = f", {held[r.ip]}'s address before" if r.reused else ", a new address"
            held[r.ip] = r.member
            say(f"    run {k + 1}: {r.member} ({r.ip}{reuse}): first request {r.first_s:6.3f} s"
                f" after the publish ({r.lost} connections unanswered meanwhile)")
            for what, t in sorted(r.parts.items(), key=lambda kv: kv[1]):
                say(f"        {t:+7.3f} s  {what}")
            for line in r.agents + r.neighbours:
                say(f"        {line}")
            if n == 0 and k == 0:
                say("      the timeline of run 1 (seconds from the publish):")
                for line in r.lines:
                    say(line)
            if back_each or k == len(sizes) - 1:
                await scale_back(cloud)
        if back_each:  # a member the fold gave a new address after all is not counted here
            fresh = [r for r in runs if not r.reused]
            runs = [r for r in runs if r.reused]
            if fresh:
                say(f"    ({len(fresh)} of them got a new address: the freed one was not free"
                    " yet; left out below)")
        say(f"    ScalePool -> the new member's first request: {stats([r.first_s for r in runs])}")
        keys = sorted(dict.fromkeys(k for r in runs for k in r.parts),
                      key=lambda k: statistics.median([r.parts[k] for r in runs if k in r.parts]))
        say("    where it goes (from the publish):")
        for key in keys:
            say(f"      {key:<62} {stats([r.parts[key] for r in runs if key in r.parts])}")
        for r in runs:
            r.parts["first"] = r.first_s
        say("    as spans:")
        for line in spans(runs, [
                ("the publish -> the later job with it on JOB (fold + relay)", "",
                 "*'s job with it, unhealthy, on JOB"),
                ("-> the later node applied it, unhealthy (agents)",
                 "*'s job with it, unhealthy, on JOB",
                 "* applied the job with it, unhealthy (LbApplied)"),
                *((f"{n}: it applied it -> it reports it up (rise probes)",
                   f"{n} applied the job with it, unhealthy (LbApplied)",
                   f"{n} reports it up (BackendHealth)") for n in NODES),
                ("the first report up -> the job with it healthy on JOB",
                 "^ reports it up (BackendHealth)",
                 "*'s job with it healthy on JOB (fold + relay)"),
                *((f"{n}'s agent: that job on JOB -> its LbApplied",
                   f"{n}'s job with it healthy on JOB (fold + relay)",
                   f"{n} applied the job with it healthy (LbApplied)") for n in NODES),
                ("the later job on JOB -> the first request", "*'s job with it healthy on JOB"
                 " (fold + relay)", "first")]):
            say(line)


# ---- the run --------------------------------------------------------------------------------


async def body_async(run: Run, args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    cloud, vip, jobs, nc = await build(run, args)
    try:
        assert run.fabric is not None
        say(f"cloud built in {time.perf_counter() - t0:.1f} s (namespaces {run.fabric.prefix}-*):"
            f" {len(HYPERVISORS)} hypervisors, {len(NODES)} LB nodes, the edge's router and"
            f" client; pool of {SIZE} behind {vip}:{PORT}; load average {load()}")
        if "1" in args.part:
            await part_fail(cloud, vip, jobs, args)
        if "2" in args.part:
            await part_scale(cloud, vip, jobs, args)
    finally:
        await cloud.pg.close()
        await nc.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--part", default="1,2", help="which parts: 1, 2")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--reuse-runs", type=int, default=3,
                        help="(2): runs whose new member gets the address just freed")
    parser.add_argument("--rate", type=float, default=50.0,
                        help="new connections per second from the client")
    parser.add_argument("--client-timeout", type=float, default=0.5,
                        help="seconds a connection waits for its answer")
    parser.add_argument("--interval-ms", type=int, default=500)
    parser.add_argument("--timeout-ms", type=int, default=300)
    parser.add_argument("--rise", type=int, default=2)
    parser.add_argument("--fall", type=int, default=2)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="orch-lb-system-"))
    run = Run(tmp, Stack(tmp / "stack"))

    def body() -> None:
        say(f"bench/lb_system.py: {os.cpu_count()} CPUs, Python {sys.version.split()[0]},"
            f" kernel {os.uname().release}; load average at start {load()} (the machine is"
            " shared: read the figures with it)")
        asyncio.run(body_async(run, args))
        say(f"load average at end {load()}")

    return harness.run(body, run.teardown)


if __name__ == "__main__":
    sys.exit(main())
