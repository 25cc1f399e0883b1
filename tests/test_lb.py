"""Load balancers end to end: two LB nodes announcing a VIP by BGP to a router, a client
behind it, and a pool of namespace guests on a private network behind the VIP.

One cloud for the module, built once (Fabric of 3 hypervisors and 2 LB nodes, the Edge's
router and client, nats-server, PostgreSQL, a replica, an agent per host); each test adds
to it and proves its claim with real connections from the client through the router's
ECMP route, the nodes' nftables and VXLAN, to the guests, and with what the router's and
the nodes' kernels hold.
"""

import asyncio
import collections
import concurrent.futures
import contextlib
import ipaddress
import itertools
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import msgspec
import pytest

from agents.drivers.netns_guest import guest_base, guest_netns
from agents.lb import nftplan
from events.bus import Publisher, connect
from events.topology import ensure_topology
from orchestrator.deciders.lb import LoadBalancer, healthy_ports
from orchestrator.edge import HOLD_S, Edge, Prober
from orchestrator.embedded import NatsServer, PostgresServer
from orchestrator.fabric import netns_socket
from tests.conftest import PARTITIONS, Processes, eventually, isolated
from tests.fabric import Fabric, unavailable
from tests.test_networks import Cloud, _connect, _underlays_known

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))

HYPERVISORS = ("h1", "h2", "h3")
NODES = ("lb1", "lb2")
CIDR = "10.61.0.0/24"
VNI = 610
GUEST_PORT = 8080
PORT = 80
INTERVAL_MS, TIMEOUT_MS, RISE, FALL = 400, 200, 2, 2
RULES = [{"protocol": "tcp", "port": GUEST_PORT, "source": CIDR}]
TEMPLATE = {"vcpus": 1, "memory_mib": 64, "image": "tiny", "nics": [{"network": "web"}],
            "rules": RULES}


class LbCloud(Cloud):
    edge: Edge

    def lb_agent(self, host: str) -> subprocess.Popen[bytes]:
        h = self.fabric[host]
        _, router_ip = self.edge.uplink(host)
        return self.processes.orch(
            "agent", "--host", host, "--lb", "--netns", h.netns, "--underlay-ip",
            h.underlay_ip, "--bgp-peer", router_ip, "--bgp-peer-asn",
            str(self.edge.router_asn), "--bgp-asn", str(self.edge.node_asn),
            "--resync", "2", "--heartbeat", "0.5", env=self.env.environ(),
            name=f"agent-{host}-{next(self.n)}")

    async def lb(self, id_: str = "web") -> LoadBalancer:
        raw = await self.pg.fetchval(
            "SELECT state FROM entities WHERE kind = 'lb' AND id = $1", id_)
        assert raw is not None
        return msgspec.json.decode(raw, type=LoadBalancer)

    async def healthy(self, id_: str = "web") -> set[str]:
        lb = await self.lb(id_)
        return {i for i, b in lb.backends.items() if PORT in healthy_ports(lb, b)}

    async def serving(self, members: set[str], id_: str = "web") -> bool:
        """Both nodes applied the newest job, whose healthy backends are ``members``."""
        lb = await self.lb(id_)
        nodes_done = all(s.node is not None and s.observed_generation == lb.generation
                         for s in lb.slots)
        return nodes_done and await self.healthy(id_) == members

    async def members(self) -> set[str]:
        """The pool's members now (a member scaled away leaves this set at once, and its
        instance goes once the balancers have drained it)."""
        pool = await self.state("pool", "pool")
        assert pool is not None
        return set(pool["members"])


def ask(netns: str, address: str, port: int = PORT, sport: int = 0,
        timeout_s: float = 3.0) -> str | None:
    """One TCP connection from ``netns`` (from ``sport`` if given): who answered, or None.
    Closed with a reset, so the same 5-tuple can be used again at once."""
    try:
        with netns_socket(netns, socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if sport:
                sock.bind(("0.0.0.0", sport))
            sock.connect((address, port))
            sock.sendall(b"?\n")
            answer = sock.recv(256).decode(errors="replace").strip()
            return answer or None
    except OSError:
        return None


def spread(edge: Edge, vip: str, n: int = 200, sports: range | None = None) -> list[str | None]:
    """n connections from the client to the VIP, 16 at a time: each one's answer."""
    ports = list(sports) if sports is not None else [0] * n
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda p: ask(edge.client, vip, sport=p), ports))


def node_counter(netns: str, lb_id: str = "web") -> int:
    """New flows the node DNATed for the service, as its kernel counted them."""
    out = subprocess.run(["ip", "netns", "exec", netns, "nft", "-j", "list", "chain",
                          nftplan.FAMILY, nftplan.table_name(lb_id), f"svc_tcp_{PORT}"],
                         capture_output=True, text=True, check=True).stdout
    for item in json.loads(out)["nftables"]:
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                return int(expr["counter"]["packets"])
    raise AssertionError(f"no counter in {out}")


def nft_tables(netns: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "exec", netns, "nft", "-j", "list", "tables"],
                         capture_output=True, text=True, check=True).stdout
    return [i["table"]["name"] for i in json.loads(out)["nftables"] if "table" in i]


def guest_block(cloud: Cloud, instance: str, host: str, blocked: bool) -> None:
    """Make a backend's service stop answering for real (its guest drops the port), or
    answer again: behind the agents' backs."""
    netns = guest_netns(guest_base(cloud.fabric[host].netns, host), instance)
    script = ("add table inet test_block\n"
              "add chain inet test_block input { type filter hook input priority 0; }\n"
              f"add rule inet test_block input tcp dport {GUEST_PORT} drop\n"
              if blocked else "delete table inet test_block\n")
    subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=script, text=True,
                   check=True)


@pytest.fixture(scope="module")
def fabric() -> Iterator[Fabric]:
    with Fabric([*HYPERVISORS, *NODES]) as made:
        yield made


@pytest.fixture(scope="module")
def edge(fabric: Fabric) -> Iterator[Edge]:
    with Edge(fabric, list(NODES), avoid=[ipaddress.IPv4Network(CIDR)]) as made:
        yield made


@pytest.fixture(scope="module")
async def cloud(postgres: PostgresServer, fabric: Fabric, edge: Edge,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LbCloud]:
    root = tmp_path_factory.mktemp("lb")
    async with isolated(postgres, NatsServer(root / "nats"), root) as env:
        processes = Processes(root, dict(os.environ))
        nc = await connect(env.nats_url, "test")
        pg = None
        try:
            js = nc.jetstream()
            await ensure_topology(js, PARTITIONS)
            processes.orch("orchestrator", "--id", "r1", "--deadline", "3600",
                           "--down-after", "3", env=env.environ(), name="r1")
            pg = await eventually(lambda: _connect(env.pg_dsn))
            world = LbCloud(fabric, env, processes, js, pg, Publisher(js), itertools.count())
            world.edge = edge
            for name in HYPERVISORS:
                await world.send("admin", type="RegisterHost", id=name, vcpus=64,
                                 memory_mib=1 << 16)
                world.agent(name)
            for name in NODES:
                await world.send("admin", type="RegisterHost", id=name, vcpus=4,
                                 memory_mib=4096, role="lb")
                world.lb_agent(name)
            await eventually(lambda: _underlays_known(pg, len(fabric.hosts)), timeout=60)
            yield world
        finally:
            processes.stop(grace_s=10.0)
            if pg is not None:
                await pg.close()
            await nc.close()


@pytest.fixture(scope="module")
async def web(cloud: LbCloud) -> str:
    """A pool of 4 behind the VIP, every backend healthy on both nodes: the VIP."""
    vip = cloud.edge.vip(0)
    await cloud.send("user", type="CreateNetwork", id="web", vni=VNI, cidr=CIDR)
    await cloud.send("user", type="CreatePool", id="pool", size=4, template=TEMPLATE)
    health = {"interval_ms": INTERVAL_MS, "timeout_ms": TIMEOUT_MS, "rise": RISE,
              "fall": FALL}
    await cloud.send("user", type="CreateLoadBalancer", id="web", vip=vip, pool="pool",
                     services=[{"port": PORT, "target_port": GUEST_PORT, "health": health}])
    await cloud.settle(timeout=120)
    members = await cloud.members()
    assert len(members) == 4
    await eventually(lambda: cloud.serving(members), timeout=60)
    cloud.edge.wait_routes(vip, NODES, within_s=20)
    return vip


async def test_connections_spread_over_every_backend_and_both_nodes(cloud: LbCloud,
                                                                    web: str) -> None:
    before = {n: node_counter(cloud.fabric[n].netns) for n in NODES}
    answers = spread(cloud.edge, web, 200)
    assert None not in answers
    members = await cloud.members()
    seen = collections.Counter(answers)
    assert set(seen) == members, seen
    carried = {n: node_counter(cloud.fabric[n].netns) - before[n] for n in NODES}
    assert all(c > 0 for c in carried.values()), carried
    assert sum(carried.values()) == 200


def orch(cloud: LbCloud, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args],
                          env={**cloud.env.environ(), "COLUMNS": "200"}, capture_output=True,
                          text=True, timeout=60)


async def test_the_cli_shows_nodes_health_and_an_alert_when_no_backend_answers(
        cloud: LbCloud, web: str) -> None:
    members = sorted(await cloud.members())
    shown = orch(cloud, "get", "lb/web").stdout
    assert web in shown and shown.count("serving") == 2, shown
    for m in members:
        assert re.search(rf"{m}[\s│]+[\d.]+[\s│]+80 up[\s│]+80 up[\s│]+80\b", shown), shown
    hosts = orch(cloud, "hosts").stdout
    for node in NODES:
        assert re.search(rf"{node}[\s│]+lb[\s│]+up[\s│].*lb: web", hosts), hosts
    assert re.search(r"h1[\s│]+hypervisor[\s│]+up[\s│].*\d+ instances?", hosts), hosts
    assert orch(cloud, "alerts").returncode == 0
    hosts_of = {m: (await cloud.state("instance", m))["host"] for m in members}  # type: ignore[index]
    for m in members:
        guest_block(cloud, m, hosts_of[m], blocked=True)
    try:
        await eventually(lambda: cloud.serving(set()), timeout=30, interval=0.1)
        alerts = orch(cloud, "alerts")
        assert alerts.returncode == 1
        assert re.search(r"lb/web[\s│].*no healthy backend on port 80", alerts.stdout), \
            alerts.stdout
    finally:
        for m in members:
            guest_block(cloud, m, hosts_of[m], blocked=False)
    await eventually(lambda: cloud.serving(set(members)), timeout=30, interval=0.1)


async def test_one_5_tuple_reaches_the_same_backend_through_either_node(cloud: LbCloud,
                                                                        web: str) -> None:
    """The router is made to send one source port through lb1, then lb2."""
    edge = cloud.edge
    router = edge.router
    rule = ["rule", "add", "priority", "50", "from", edge.client_ip, "ipproto", "tcp",
            "sport", "41001", "lookup", "150"]
    subprocess.run(["ip", "-n", router, *rule], check=True)
    try:
        answers = []
        for node in NODES:
            up = edge.uplinks[node]
            subprocess.run(["ip", "-n", router, "route", "replace", f"{web}/32", "via",
                            up.local_ip, "dev", up.router_dev, "table", "150"], check=True)
            before = node_counter(cloud.fabric[node].netns)
            answers.append(ask(edge.client, web, sport=41001))
            assert node_counter(cloud.fabric[node].netns) == before + 1  # it went there
        assert answers[0] is not None and answers[0] == answers[1]
    finally:
        subprocess.run(["ip", "-n", router, "rule", "del", "priority", "50"], check=False)
        subprocess.run(["ip", "-n", router, "route", "flush", "table", "150"], check=False)


async def test_an_unhealthy_backend_is_taken_out_and_comes_back(cloud: LbCloud,
                                                                web: str) -> None:
    members = await cloud.members()
    victim = sorted(members)[0]
    host = (await cloud.state("instance", victim))["host"]  # type: ignore[index]
    guest_block(cloud, victim, host, blocked=True)
    try:
        started = time.monotonic()
        await eventually(lambda: cloud.serving(members - {victim}), timeout=30, interval=0.05)
        out_s = time.monotonic() - started
        answers = spread(cloud.edge, web, 100)
        assert None not in answers and victim not in answers
        # fall x interval, plus a probe's timeout, the report, the fold and both nodes' jobs
        assert out_s < 10, out_s
    finally:
        guest_block(cloud, victim, host, blocked=False)
    await eventually(lambda: cloud.serving(members), timeout=30, interval=0.05)
    got = spread(cloud.edge, web, 100)
    assert victim in got
    # The timeline says who saw what.
    rows = await cloud.pg.fetch(
        "SELECT outcome->>'source' AS source, outcome->>'reason' AS reason FROM history"
        " WHERE kind = 'lb'"
        " AND id = 'web' AND outcome->>'type' = 'BackendHealth' ORDER BY seq")
    seen = [(r["source"], r["reason"]) for r in rows if r["reason"] and victim in r["reason"]]
    assert any("unhealthy as" in why for _, why in seen), seen
    assert {src for src, why in seen if "unhealthy as" in why} <= set(NODES)
    assert any(f"{victim}:{PORT} healthy as" in why for _, why in seen[-2:]), seen


async def test_scaling_changes_who_answers_and_one_leaving_moves_few_other_flows(
        cloud: LbCloud, web: str) -> None:
    await cloud.send("user", type="ScalePool", id="pool", size=6)
    await cloud.settle(timeout=90)
    six = await cloud.members()
    assert len(six) == 6
    await eventually(lambda: cloud.serving(six), timeout=60)
    assert set(spread(cloud.edge, web, 200)) == six
    # The same 300 flows (source ports) before and after one backend leaves.
    flows = range(42000, 42300)
    before = dict(zip(flows, spread(cloud.edge, web, sports=flows), strict=True))
    await cloud.send("user", type="ScalePool", id="pool", size=5)
    await cloud.settle(timeout=90)
    five = await cloud.members()
    (gone,) = six - five
    await eventually(lambda: cloud.serving(five), timeout=60)
    # The same 5-tuples again within seconds (no client does that): the nodes' conntrack
    # would still hold some of the first round's entries, and an entry, not the table,
    # decides its flow (established flows stay on their backend). The table is what is
    # measured here, so each flow must be new to the nodes.
    for node in NODES:
        subprocess.run(["ip", "netns", "exec", cloud.fabric[node].netns, "conntrack", "-D",
                        "-p", "tcp", "--orig-dst", web], capture_output=True, check=False)
    after = dict(zip(flows, spread(cloud.edge, web, sports=flows), strict=True))
    others = [p for p in flows if before[p] != gone]
    moved = sum(1 for p in others if after[p] != before[p])
    assert None not in after.values(), collections.Counter(after.values())
    assert gone not in after.values(), collections.Counter(after.values())
    assert moved / len(others) <= 0.02, (moved, len(others))
    await cloud.send("user", type="ScalePool", id="pool", size=3)
    await cloud.settle(timeout=90)
    three = await cloud.members()
    await eventually(lambda: cloud.serving(three), timeout=60)
    assert set(spread(cloud.edge, web, 200)) == three


async def test_a_killed_or_hung_node_fails_over_within_the_hold_time(cloud: LbCloud,
                                                                     web: str) -> None:
    edge = cloud.edge
    for stop in (signal.SIGKILL, signal.SIGSTOP):
        edge.wait_routes(web, NODES, within_s=30)
        # A connection through lb2, held open across lb1's death.
        held = held_connection(cloud, web, through="lb2")
        victims = [cloud.processes.procs[name].pid for name in cloud.processes.procs
                   if name.startswith("agent-lb1-")]
        victims += list(cloud.fabric.processes([cloud.fabric["lb1"].netns]))
        with Prober(edge, web, PORT, rate_hz=50, timeout_s=0.5) as probe:
            time.sleep(0.5)
            died = time.monotonic()
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, stop)
            time.sleep(HOLD_S + 2.0)
        last = probe.last_failure()
        if last is not None:
            assert last.started - died <= HOLD_S + 1.0, (stop, last.started - died)
        assert edge.router_routes(web) == [edge.uplink("lb2")[0]]
        held.sendall(b"?\n")
        assert held.recv(256).strip(), "the connection through the survivor was cut"
        held.close()
        # Bring lb1 back: a fresh agent (its old one killed for good), and it serves again.
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for name in [n for n in cloud.processes.procs if n.startswith("agent-lb1-")]:
            cloud.processes.procs.pop(name).wait()
        cloud.lb_agent("lb1")
        edge.wait_routes(web, NODES, within_s=60)
        members = await cloud.members()
        await eventually(lambda members=members: cloud.serving(members), timeout=60)


def held_connection(cloud: LbCloud, vip: str, through: str) -> socket.socket:
    """An established connection from the client to the VIP that the router sent through
    ``through`` (tried source port by source port), answered once."""
    for sport in range(43000, 43200):
        sock = netns_socket(cloud.edge.client, socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(2.0)
        sock.bind(("0.0.0.0", sport))
        before = node_counter(cloud.fabric[through].netns)
        sock.connect((vip, PORT))
        if node_counter(cloud.fabric[through].netns) > before:
            return sock
        sock.close()
    raise AssertionError(f"no source port went through {through}")


async def test_deleting_the_balancer_withdraws_the_vip_and_leaves_nothing_on_the_nodes(
        cloud: LbCloud, web: str) -> None:
    await cloud.send("user", type="DeleteLoadBalancer", id="web")
    await cloud.settle()
    lb = await cloud.lb()
    assert lb.status == "deleted"

    async def withdrawn() -> bool:
        return cloud.edge.router_routes(web) == []

    await eventually(withdrawn, timeout=20)
    for node in NODES:
        netns = cloud.fabric[node].netns
        await eventually(lambda netns=netns: _no_lb_state(netns), timeout=20)
    assert ask(cloud.edge.client, web, timeout_s=0.5) is None


async def _no_lb_state(netns: str) -> bool:
    tables = [t for t in nft_tables(netns) if t.startswith(nftplan.TABLE_PREFIX)]
    lo = subprocess.run(["ip", "-n", netns, "-j", "addr", "show", "dev", "lo"],
                        capture_output=True, text=True, check=True).stdout
    vips = [a["local"] for i in json.loads(lo) for a in i.get("addr_info", [])
            if a["family"] == "inet" and a["local"] != "127.0.0.1"]
    return not tables and not vips


async def test_replay_verifies(cloud: LbCloud, web: str) -> None:
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "orchestrator.cli", "replay", "--verify"],
        env=cloud.env.environ(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
