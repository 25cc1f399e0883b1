"""A load balancer in front of two real QEMU guests (TCG), end to end with HTTP.

A Fabric of two hypervisors, each with its own libvirtd (`tests.libvirt_hosts`), and two
LB nodes announcing the VIP by BGP to the Edge's router; a client behind the router; a
replica and an agent per host. A pool of 2 guests on a private network, behind an HTTP
health check (`http_path`), serves port 8080 (`agents.guest`: a GET gets an HTTP/1.0 200
whose body is the guest's id).

The proof is real traffic from the client, through the router's ECMP route, the nodes'
nftables and VXLAN, to the guests: both answer. Then one guest is stopped while the
client keeps sending new requests at a steady rate and the test watches what that host's
libvirtd says about the domain: no request fails, the stopped guest's last answer comes
before its domain stops running, and afterwards only the other guest answers. The fold's
timeline orders it: both nodes applied the balancer's generation without the guest
before the instance's stop job was issued. Started again, the guest serves again once
its health check has risen.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import libvirt
import msgspec
import pytest
from nats.js import JetStreamContext

from agents.drivers.vm import DEFAULT_CONSOLE_DIR, domain_name
from agents.guest import SERVICE_PORT
from events.bus import Publisher
from events.subjects import CMD_STREAM
from orchestrator.deciders.lb import LoadBalancer, healthy_ports
from orchestrator.edge import Edge
from orchestrator.fabric import Fabric, netns_socket, unavailable
from schemas import commands as c
from schemas.codec import command_from_dict, decode_command
from tests.conftest import Env, Processes, eventually
from tests.libvirt_hosts import HostLibvirtd, host_libvirtds
from tests.test_qemu_system import booted

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))

HYPERVISORS = ("h1", "h2")
NODES = ("lb1", "lb2")
CIDR = "10.63.0.0/24"
VNI = 630
PORT = 80
LB = "web"
RULES = [{"protocol": "tcp", "port": SERVICE_PORT, "source": CIDR}]
# TCG guests answer in tens of ms, slower while booting the other: a generous timeout.
HEALTH = {"http_path": "/", "interval_ms": 1000, "timeout_ms": 800, "rise": 2, "fall": 3}
RATE_HZ = 4.0
REQUEST_TIMEOUT_S = 3.0
REQUEST = b"GET / HTTP/1.0\r\nHost: vip\r\n\r\n"
STATES = {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_BLOCKED: "blocked",
          libvirt.VIR_DOMAIN_PAUSED: "paused", libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
          libvirt.VIR_DOMAIN_SHUTOFF: "shut off", libvirt.VIR_DOMAIN_CRASHED: "crashed"}


def http_get(netns: str, vip: str, timeout_s: float = REQUEST_TIMEOUT_S) -> tuple[str | None,
                                                                                    str, int]:
    """One HTTP GET of vip:PORT from ``netns``: (the id in a 200's body, or None; why not;
    the source port it came from)."""
    sport = 0
    try:
        with netns_socket(netns, socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.bind(("0.0.0.0", 0))
            sport = sock.getsockname()[1]
            sock.connect((vip, PORT))
            sock.sendall(REQUEST)
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
    except OSError as exc:
        return None, f"{type(exc).__name__}: {exc}", sport
    head, _, body = data.decode(errors="replace").partition("\r\n\r\n")
    if not head.startswith("HTTP/1.0 200 ") or not body.strip():
        return None, f"answer {data[:80]!r}", sport
    return body.strip(), "", sport


def spread(edge: Edge, vip: str, n: int) -> list[str]:
    """n GETs from the client to the VIP, one after another: each one's answer (all
    answered). Not at once: the guest's busybox nc listens with a backlog of 1 and
    accepts slowly under TCG, so a burst of connections overflows it (SYNs dropped)."""
    got = [http_get(edge.client, vip) for _ in range(n)]
    assert all(answer for answer, _, _ in got), [why for _, why, _ in got if why]
    return [answer for answer, _, _ in got if answer]


@dataclass(frozen=True)
class Request:
    started: float  # monotonic
    ended: float
    answer: str | None
    error: str
    sport: int  # a failed one's flow, to look up in the nodes' conntrack


class Requests:
    """New GETs from the client to the VIP at a fixed rate while the block runs, each in a
    thread of its own (a slow one does not delay the next)."""

    def __init__(self, edge: Edge, vip: str, rate_hz: float = RATE_HZ) -> None:
        self.edge, self.vip, self.interval_s = edge, vip, 1.0 / rate_hz
        self.done: list[Request] = []
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            int(rate_hz * REQUEST_TIMEOUT_S) + 4)
        self._launcher = threading.Thread(target=self._launch, daemon=True)

    def _one(self) -> None:
        started = time.monotonic()
        answer, error, sport = http_get(self.edge.client, self.vip)
        self.done.append(Request(started, time.monotonic(), answer, error, sport))

    def _launch(self) -> None:
        tick = time.monotonic()
        while not self._stop.is_set():
            self._pool.submit(self._one)
            tick += self.interval_s
            self._stop.wait(max(0.0, tick - time.monotonic()))

    def __enter__(self) -> Requests:
        self._launcher.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._launcher.join()
        self._pool.shutdown(wait=True)


def domain_state(conn: libvirt.virConnect, name: str) -> str:
    try:
        state, _ = conn.lookupByName(name).state()
    except libvirt.libvirtError:
        return "absent"
    return STATES.get(state, f"state {state}")


class DomainWatch:
    """What a host's libvirtd says about one domain, read every 20 ms while the block runs:
    each state it reported, with when it was first seen (monotonic)."""

    def __init__(self, daemon: HostLibvirtd, instance_id: str) -> None:
        self.daemon, self.name = daemon, domain_name(instance_id)
        self.changes: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        conn = self.daemon.connect()
        try:
            while not self._stop.is_set():
                state = domain_state(conn, self.name)
                if not self.changes or self.changes[-1][1] != state:
                    self.changes.append((time.monotonic(), state))
                self._stop.wait(0.02)
        finally:
            conn.close()

    def first(self, state: str) -> float | None:
        return next((t for t, s in self.changes if s == state), None)

    def __enter__(self) -> DomainWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class World:
    env: Env
    js: JetStreamContext
    pg: asyncpg.Connection
    publisher: Publisher
    n: Iterator[int]

    async def send(self, source: str, **fields: Any) -> None:
        fields.setdefault("cmd_id", f"t{next(self.n)}")
        await self.publisher.publish(source, command_from_dict(fields))

    async def state(self, kind: str, id_: str) -> dict[str, Any] | None:
        raw = await self.pg.fetchval(
            "SELECT state FROM entities WHERE kind = $1 AND id = $2", kind, id_)
        return None if raw is None else msgspec.json.decode(raw)

    async def lb(self) -> LoadBalancer:
        raw = await self.pg.fetchval(
            "SELECT state FROM entities WHERE kind = 'lb' AND id = $1", LB)
        assert raw is not None
        return msgspec.json.decode(raw, type=LoadBalancer)

    async def serving(self, members: set[str]) -> bool:
        """Both nodes applied the newest job, whose healthy backends are ``members``."""
        lb = await self.lb()
        healthy = {i for i, b in lb.backends.items() if PORT in healthy_ports(lb, b)}
        return healthy == members and all(
            s.node is not None and s.observed_generation == lb.generation for s in lb.slots)

    async def timeline(self, kind: str, id_: str, after: int = 0) -> list[dict[str, Any]]:
        rows = await self.pg.fetch("SELECT seq, outcome FROM history WHERE kind = $1"
                                   " AND id = $2 AND seq > $3 ORDER BY seq", kind, id_, after)
        return [msgspec.json.decode(r["outcome"]) for r in rows]

    async def command(self, seq: int) -> c.Command:
        return decode_command((await self.js.get_msg(CMD_STREAM, seq)).data)

    def lb_at(self, seq: int) -> dict[str, Any]:
        """The balancer as the log had it at seq (`orch get --at`)."""
        done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "get", f"lb/{LB}",
                               "--at", str(seq), "--json"], env=self.env.environ(),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return msgspec.json.decode(done.stdout.splitlines()[0])["state"]


# Teardown runs in reverse: agents and replica stop first (no agent recreates a guest
# meanwhile), then every daemon with its guests, the edge, the hosts, the console logs.
@pytest.fixture
def pool_id() -> Iterator[str]:
    """The pool's id, unique (its members' console logs share a dir); logs removed after."""
    pool = f"p{secrets.token_hex(3)}"
    try:
        yield pool
    finally:
        for log in DEFAULT_CONSOLE_DIR.glob(f"{pool}-*.log"):
            log.unlink(missing_ok=True)


@pytest.fixture
def fabric(pool_id: str) -> Iterator[Fabric]:
    with Fabric([*HYPERVISORS, *NODES]) as made:
        yield made


@pytest.fixture
def edge(fabric: Fabric) -> Iterator[Edge]:
    with Edge(fabric, list(NODES), avoid=[ipaddress.IPv4Network(CIDR)]) as made:
        yield made


@pytest.fixture
def daemons(edge: Edge, fabric: Fabric, tmp_path: Path) -> Iterator[dict[str, HostLibvirtd]]:
    """Hypervisors only (LB nodes run no guests); after the edge, so stopped before it."""
    with host_libvirtds(fabric, tmp_path / "libvirt", HYPERVISORS) as started:
        yield started


@pytest.fixture
def processes(daemons: dict[str, HostLibvirtd], tmp_path: Path) -> Iterator[Processes]:
    """conftest's, but set up after (so stopped before) the daemons."""
    procs = Processes(tmp_path, dict(os.environ))
    try:
        yield procs
    finally:
        procs.stop(grace_s=10.0)


def start_agents(processes: Processes, env: Env, fabric: Fabric, edge: Edge,
                 daemons: dict[str, HostLibvirtd]) -> None:
    for name in HYPERVISORS:
        h = fabric[name]
        processes.orch("agent", "--host", name, "--libvirt", daemons[name].uri, "--netns",
                       h.netns, "--underlay-ip", h.underlay_ip, "--resync", "3",
                       "--heartbeat", "0.5", env=env.environ(), name=f"agent-{name}")
    for name in NODES:
        h = fabric[name]
        _, router_ip = edge.uplink(name)
        processes.orch("agent", "--host", name, "--lb", "--netns", h.netns, "--underlay-ip",
                       h.underlay_ip, "--bgp-peer", router_ip, "--bgp-peer-asn",
                       str(edge.router_asn), "--bgp-asn", str(edge.node_asn), "--resync", "2",
                       "--heartbeat", "0.5", env=env.environ(), name=f"agent-{name}")


def boot_report(instance_id: str, since: float) -> str:
    seconds = booted(instance_id, since)
    uptime = re.search(r"kernel uptime ([\d.]+)s",
                       (DEFAULT_CONSOLE_DIR / f"{instance_id}.log").read_text(errors="replace"))
    return (f"command -> console marker in {seconds:.1f}s (guest kernel uptime then "
            f"{uptime and uptime.group(1)}s)")


async def test_two_qemu_guests_behind_the_vip_and_a_stopped_one_is_drained_first(
        env: Env, js: JetStreamContext, pg: asyncpg.Connection, processes: Processes,
        fabric: Fabric, edge: Edge, daemons: dict[str, HostLibvirtd], pool_id: str) -> None:
    world = World(env, js, pg, Publisher(js), iter(range(1, 1 << 30)))
    processes.orch("orchestrator", "--id", "r1", "--deadline", "3600", "--down-after", "3",
                   env=env.environ(), name="r1")
    for name in HYPERVISORS:
        await world.send("admin", type="RegisterHost", id=name, vcpus=8, memory_mib=4096)
    for name in NODES:
        await world.send("admin", type="RegisterHost", id=name, vcpus=4, memory_mib=4096,
                         role="lb")
    start_agents(processes, env, fabric, edge, daemons)
    await eventually(lambda: pg.fetchval(
        "SELECT count(*) = 4 FROM entities WHERE kind = 'host'"
        " AND state->>'underlay' IS NOT NULL"), timeout=60)

    vip = edge.vip(0)
    started = time.monotonic()
    await world.send("user", type="CreateNetwork", id="web", vni=VNI, cidr=CIDR)
    await world.send("user", type="CreatePool", id=pool_id, size=2, template=dict(
        vcpus=1, memory_mib=192, image="tiny", nics=[dict(network="web")], rules=RULES))
    await world.send("user", type="CreateLoadBalancer", id=LB, vip=vip, pool=pool_id,
                     services=[{"port": PORT, "target_port": SERVICE_PORT,
                                "health": HEALTH}])

    async def placed() -> dict[str, str] | None:
        pool = await world.state("pool", pool_id)
        if pool is None or len(pool["members"]) != 2:
            return None
        hosts = {m: (await world.state("instance", m) or {}).get("host") for m in
                 pool["members"]}
        return hosts if all(hosts.values()) else None

    hosts = await eventually(placed, timeout=30)
    assert set(hosts.values()) == set(HYPERVISORS), hosts  # equal hosts: one guest each
    members = set(hosts)
    print()
    for m in sorted(members):
        print(f"{m} on {hosts[m]}: {await asyncio.to_thread(boot_report, m, started)}")
    await eventually(lambda: world.serving(members), timeout=90)
    edge.wait_routes(vip, NODES, within_s=30)
    print(f"both healthy behind {vip} on both nodes {time.monotonic() - started:.1f}s after"
          " the commands")

    t0 = time.monotonic()
    answers = await asyncio.to_thread(spread, edge, vip, 40)
    assert set(answers) == members, Counter(answers)
    print(f"40 GETs through the VIP, one after another in {time.monotonic() - t0:.1f}s:"
          f" {dict(Counter(answers))}")

    # Stop one while the client keeps asking; the host's libvirtd says when it stopped.
    victim = min(members)
    (other,) = members - {victim}
    last_seq = (await js.stream_info(CMD_STREAM)).state.last_seq
    clock = time.time() - time.monotonic()  # the log's times (ms of the epoch) -> monotonic
    with DomainWatch(daemons[hosts[victim]], victim) as watch, Requests(edge, vip) as requests:
        await asyncio.sleep(3.0)  # 12 requests: the victim gets none with odds of 2^-12
        stop_sent = time.monotonic()
        await world.send("user", type="StopInstance", id=victim)

        async def shut_off() -> float | None:
            return watch.first("shut off")

        stopped_at = await eventually(shut_off, timeout=60, interval=0.05)
        await asyncio.sleep(3.0)

    # The fold's timeline: the generation without the victim applied by both nodes, then
    # (only then) the instance's stop job.
    instance = await world.timeline("instance", victim, after=last_seq)
    stop = next(o for o in instance if o["type"] == "StopInstance")
    assert not stop.get("jobs"), stop  # held while the balancers drain it
    job = next(o for o in instance if o["seq"] > stop["seq"] and any(
        j.endswith(f".instance.{victim}") for j in o.get("jobs", ())))
    assert job["type"] == "MemberDrained", job
    lb_timeline = await world.timeline("lb", LB, after=stop["seq"])
    dropped = next(o for o in lb_timeline if "BackendsSet" in o.get("events", ()))
    without = world.lb_at(dropped["seq"])
    assert victim not in without["backends"], without
    applied: dict[str, dict[str, Any]] = {}
    for o in lb_timeline:
        if o["type"] == "LbApplied" and o["source"] not in applied:
            cmd = await world.command(o["seq"])
            assert isinstance(cmd, c.LbApplied)
            if cmd.generation >= without["generation"]:
                applied[o["source"]] = o
    assert set(applied) == set(NODES), applied
    assert max(o["seq"] for o in applied.values()) < job["seq"], (applied, job)

    def after_stop(at_ms: int) -> float:
        return at_ms / 1000 - clock - stop_sent

    done = sorted(requests.done, key=lambda r: r.started)
    by_victim = [r for r in done if r.answer == victim]
    assert by_victim and by_victim[0].started < stop_sent, "the victim got no traffic before"
    last = max(by_victim, key=lambda r: r.ended)
    # Reported by both after their nft transaction: a request started later met it there.
    drained = stop_sent + max(after_stop(o["at"]) for o in applied.values())
    later = [r for r in done if r.started > drained]
    latency = sorted(r.ended - r.started for r in done)
    print(f"{len(done)} GETs at {RATE_HZ:.0f}/s around the stop (latency median"
          f" {latency[len(latency) // 2] * 1000:.0f} ms, max {latency[-1] * 1000:.0f} ms):"
          f" {dict(Counter(r.answer for r in done))}")
    print(f"after StopInstance (s): backends without {victim} (generation"
          f" {without['generation']}) {after_stop(dropped['at']):+.2f}, applied by "
          + ", ".join(f"{n} {after_stop(o['at']):+.2f}" for n, o in sorted(applied.items()))
          + f", stop job {after_stop(job['at']):+.2f}; {victim}'s last answer started"
          f" {last.started - stop_sent:+.2f} and ended {last.ended - stop_sent:+.2f}; its"
          " domain: " + ", ".join(f"{s} {t - stop_sent:+.2f}" for t, s in watch.changes))
    assert not [r for r in done if r.answer is None], [r for r in done if r.answer is None]
    assert last.ended < stopped_at, (last, watch.changes)
    assert later and all(r.answer == other for r in later), later

    # Started again: it boots, rises on both nodes' health checks and serves again.
    restart = time.monotonic()
    await world.send("user", type="StartInstance", id=victim)

    async def running_again() -> bool:
        conn = daemons[hosts[victim]].connect()
        try:
            return domain_state(conn, domain_name(victim)) == "running"
        finally:
            conn.close()

    await eventually(running_again, timeout=30)
    print(f"{victim} restarted: {await asyncio.to_thread(boot_report, victim, restart)}")
    await eventually(lambda: world.serving(members), timeout=60)
    print(f"{victim} serving again {time.monotonic() - restart:.1f}s after StartInstance")
    answers = await asyncio.to_thread(spread, edge, vip, 40)
    assert set(answers) == members, Counter(answers)
