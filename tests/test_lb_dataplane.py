"""The LB node's dataplane against the real kernel, proven by traffic.

One fabric for the module (`tests.fabric`): hypervisors h1..h3 running the network driver
and namespace guests (each answers TCP and UDP with its instance id), LB nodes lb1 and lb2
running `LbDriver` (and the network driver, for the backends' segment), and a client
namespace veth'd to both nodes with a plain route to the VIP through one node, the other,
or both (multipath). No BGP here: tests/test_bgp.py proves the announcement.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import os
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgspec
import pytest
from msgspec.structs import replace

from agents.drivers.errors import PermanentDriverError
from agents.drivers.lb import BgpConfig, LbDriver, health_cmd_id, port_names
from agents.drivers.netns_guest import NetnsGuestDriver
from agents.drivers.network import NetworkDriver
from agents.guest_service import PORT as GUEST_PORT
from agents.lb.health import Check, Prober, Target, Threshold, Transition
from agents.runtime import Agent, AgentConfig
from events.bus import read_stream
from events.subjects import CMD_STREAM, JOB_STREAM
from orchestrator.edge import Edge
from schemas import commands as c
from schemas.codec import command_from_dict
from schemas.ids import mac_address
from schemas.jobs import Job
from schemas.specs import (
    Backend,
    HealthCheck,
    InstanceSpec,
    InstanceTemplate,
    LbSpec,
    NetworkSpec,
    Nic,
    NicSpec,
    RemotePort,
    SecurityRule,
    Service,
)
from tests.conftest import Env, eventually
from tests.fabric import Fabric, FabricHost, free_underlay, netns_socket, unavailable

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

NET = "pool-net"
VNI = 4242
ECHO_PORT = 9000  # a test-owned echo server in each guest: long-lived flows
FAST = HealthCheck(interval_ms=200, timeout_ms=100, rise=2, fall=2)
LB = "web"
HYPERVISORS = ("h1", "h2", "h3")
NODES = ("lb1", "lb2")


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=20)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done


@dataclass
class Node:
    host: FabricHost
    network: NetworkDriver
    lb: LbDriver
    reports: list[c.Command] = field(default_factory=list)
    port_ip: str = ""
    client_side: str = ""  # the node's address on its link to the client


@dataclass
class Lab:
    fabric: Fabric
    cidr: ipaddress.IPv4Network
    vip: str
    client: str  # namespace
    client_ip: str  # on the client's lo: the same source through either node
    nodes: dict[str, Node]
    networks: dict[str, NetworkDriver]
    guests: dict[str, NetnsGuestDriver]
    members: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (host, ip)
    generation: int = 0
    echo: list[socket.socket] = field(default_factory=list)
    extra_ports: list[tuple[str, str, str]] = field(default_factory=list)  # mac, ip, node

    # -- the fold's part, by hand ---------------------------------------------------------

    def port(self, node: str) -> NicSpec:
        return NicSpec(network=NET, vni=VNI, mac=mac_address(f"lb.{LB}.{node}", 0),
                       ip=self.nodes[node].port_ip, prefix=self.cidr.prefixlen)

    def apply_network(self) -> None:
        """Every host's segment job: every port elsewhere (guests and LB nodes' ports)."""
        ports = [(mac_address(i, 0), ip, self.fabric.host(h).underlay_ip)
                 for i, (h, ip) in self.members.items()]
        ports += [(self.port(n).mac, self.nodes[n].port_ip, self.fabric.host(n).underlay_ip)
                  for n in NODES]
        ports += [(mac, ip, self.fabric.host(n).underlay_ip) for mac, ip, n in self.extra_ports]
        self.generation += 1
        for name, driver in [*self.networks.items(),
                             *((n, node.network) for n, node in self.nodes.items())]:
            own = self.fabric.host(name).underlay_ip
            remote = sorted((RemotePort(m, ip, v) for m, ip, v in ports if v != own),
                            key=lambda p: p.mac)
            spec = NetworkSpec(vni=VNI, cidr=str(self.cidr), mtu=1500,
                               vteps=tuple(sorted({p.vtep for p in remote})),
                               ports=tuple(remote))
            assert driver.apply(NET, spec, self.generation) == "up"

    def guest(self, instance: str, host: str, n: int, power: str = "running") -> None:
        ip = str(self.cidr[n])
        self.members[instance] = (host, ip)
        rules = tuple(SecurityRule(p, port, str(self.cidr)) for p in ("tcp", "udp")
                      for port in (GUEST_PORT, ECHO_PORT))
        spec = InstanceSpec(
            template=InstanceTemplate(vcpus=1, memory_mib=64, image="tiny",
                                      nics=(Nic(network=NET),), rules=rules),
            power=power, host=host,  # type: ignore[arg-type]
            nics=(NicSpec(network=NET, vni=VNI, mac=mac_address(instance, 0), ip=ip,
                          prefix=self.cidr.prefixlen),))
        self.generation += 1
        self.guests[host].apply(instance, spec, self.generation)

    def spec(self, services: tuple[Service, ...], healthy: dict[str, tuple[int, ...]] | None,
             node: str, seed: int = 0x5EED) -> LbSpec:
        ports = tuple(s.port for s in services)
        backends = tuple(Backend(instance=i, ip=ip, network=NET,
                                 healthy=ports if healthy is None else healthy.get(i, ()))
                         for i, (_h, ip) in sorted(self.members.items()))
        return LbSpec(vip=self.vip, services=services, backends=backends, seed=seed,
                      port=self.port(node))

    def serve(self, services: tuple[Service, ...],
              healthy: dict[str, tuple[int, ...]] | None = None) -> int:
        """Both nodes get the same job (each with its own port), as the fold sends it."""
        self.generation += 1
        for name, node in self.nodes.items():
            assert node.lb.apply(LB, self.spec(services, healthy, name),
                                 self.generation) == "serving"
        return self.generation

    # -- the client -----------------------------------------------------------------------

    def route(self, *via: str, vip: str | None = None) -> None:
        hops = [w for n in via for w in ("nexthop", "via", self.nodes[n].client_side)]
        sh("ip", "-n", self.client, "route", "replace", f"{vip or self.vip}/32", *hops)

    def ask(self, port: int, sport: int = 0, *, udp: bool = False, timeout: float = 2.0,
            vip: str | None = None) -> str:
        """One connection (or datagram) from the client's address: who answered."""
        vip = vip or self.vip
        kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
        with netns_socket(self.client, socket.AF_INET, kind) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.settimeout(timeout)
            sock.bind((self.client_ip, sport))
            if udp:
                sock.connect((vip, port))
                for _ in range(3):  # the first may be lost to ARP resolution
                    sock.send(b"?\n")
                    with contextlib.suppress(TimeoutError):
                        return sock.recv(200).decode().strip()
                raise TimeoutError(f"no UDP answer from {vip}:{port}")
            # No TIME_WAIT on close (RST): the same 5-tuple can be used again at once.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.connect((vip, port))
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(200):
                data += chunk
            return data.decode().strip()

    def reached(self, port: int, *, vip: str | None = None, most: int = 200) -> set[str]:
        """Who answers new connections, asked until every member has (at most ``most``
        times): 20 connections miss one of 4 backends 1.3 % of the time, 200 never."""
        seen: set[str] = set()
        for _ in range(most):
            seen.add(self.ask(port, vip=vip))
            if seen >= set(self.members):
                break
        return seen

    def echo_servers(self) -> dict[str, list[bytes]]:
        """A TCP echo server on ECHO_PORT in every guest; returns what each one got (the
        health probes only connect)."""
        got: dict[str, list[bytes]] = {i: [] for i in self.members}
        for instance in self.members:
            host = self.members[instance][0]
            ns = self.guests[host].netns_name(instance)
            listener = netns_socket(ns, socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("0.0.0.0", ECHO_PORT))
            listener.listen(16)
            self.echo.append(listener)

            def serve(listener: socket.socket = listener, who: str = instance) -> None:
                with contextlib.suppress(OSError):
                    while True:
                        conn, _ = listener.accept()
                        threading.Thread(target=echo, args=(conn, got[who]),
                                         daemon=True).start()

            threading.Thread(target=serve, daemon=True).start()
        return got


def echo(conn: socket.socket, got: list[bytes]) -> None:
    with contextlib.suppress(OSError), conn:
        while data := conn.recv(1000):
            got.append(data)
            conn.sendall(data)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if reason := unavailable():
        pytest.skip(reason)
    with Fabric([*HYPERVISORS, *NODES]) as fabric:
        made: list[object] = []
        try:
            yield _build(fabric, made)
        finally:
            for thing in reversed(made):
                with contextlib.suppress(Exception):
                    thing.close()  # type: ignore[attr-defined]


def _build(fabric: Fabric, made: list[object]) -> Lab:
    cidr = free_underlay()
    vip = str(free_underlay()[10])
    client = f"{fabric.prefix}-client"
    client_ip = str(free_underlay()[100])
    sh("ip", "netns", "add", client)
    sh("ip", "-n", client, "link", "set", "lo", "up")
    sh("ip", "-n", client, "addr", "add", f"{client_ip}/32", "dev", "lo")
    # Spread multipath over both nodes by the 5-tuple, as the router does.
    sh("ip", "netns", "exec", client, "sysctl", "-qw", "net.ipv4.fib_multipath_hash_policy=1")
    networks = {h: NetworkDriver(fabric.host(h).underlay_ip, fabric.host(h).netns)
                for h in HYPERVISORS}
    made += networks.values()
    guests = {h: NetnsGuestDriver(fabric.host(h).netns, h, fabric.host(h).underlay_ip)
              for h in HYPERVISORS}
    made += guests.values()
    nodes = {}
    for i, name in enumerate(NODES):
        host = fabric.host(name)
        link = free_underlay()
        node_side, client_side = str(link[1]), str(link[2])
        sh("ip", "link", "add", f"c{i}", "netns", client, "type", "veth", "peer", "name",
           "cl0", "netns", host.netns)
        sh("ip", "-n", client, "addr", "add", f"{client_side}/24", "dev", f"c{i}")
        sh("ip", "-n", client, "link", "set", f"c{i}", "up")
        sh("ip", "-n", host.netns, "addr", "add", f"{node_side}/24", "dev", "cl0")
        sh("ip", "-n", host.netns, "link", "set", "cl0", "up")
        sh("ip", "-n", host.netns, "route", "add", f"{client_ip}/32", "via", client_side)
        network = NetworkDriver(host.underlay_ip, host.netns)
        made.append(network)
        node = Node(host, network, LbDriver(name, host.underlay_ip, host.netns),
                    port_ip=str(cidr[201 + i]), client_side=node_side)
        made.append(node.lb)

        def report(cmd: c.Command, node: Node = node) -> None:
            node.reports.append(cmd)

        node.lb.set_reporter(report)
        nodes[name] = node
    lab = Lab(fabric, cidr, vip, client, client_ip, nodes, networks, guests)
    for n, instance in enumerate(["b1", "b2", "b3", "b4"]):
        lab.guest(instance, HYPERVISORS[n % 3], 11 + n)
    lab.apply_network()
    return lab


@pytest.fixture
def clean(lab: Lab) -> Iterator[Lab]:
    """Each test starts with the four backends running and leaves nothing of the LB."""
    for instance, (host, _ip) in lab.members.items():
        lab.guest(instance, host, int(ipaddress.IPv4Address(_ip)) - int(lab.cidr[0]))
    yield lab
    for listener in lab.echo:
        listener.close()
    lab.echo.clear()
    lab.generation += 1
    for node in lab.nodes.values():
        assert node.lb.apply(LB, None, lab.generation) == "absent"
        node.reports.clear()


TCP = Service(port=80, target_port=GUEST_PORT, protocol="tcp", strategy="maglev",
              health=FAST)  # type: ignore[arg-type]


def sports(n: int, base: int = 41000) -> list[int]:
    return [base + i for i in range(n)]


# -- traffic ---------------------------------------------------------------------------------

def test_200_connections_spread_over_all_backends_and_both_nodes(clean: Lab) -> None:
    lab = clean
    lab.serve((TCP,))
    lab.route(*NODES)
    answers = Counter(lab.ask(80) for _ in range(200))
    assert sum(answers.values()) == 200
    assert set(answers) == set(lab.members), answers
    carried = {n: node.lb.counters(LB)["tcp_80"] for n, node in lab.nodes.items()}
    assert all(v > 0 for v in carried.values()), carried
    assert sum(carried.values()) >= 200
    print(f"\nspread: backends {dict(answers)}, nodes {carried}")


@pytest.mark.parametrize("strategy", ["maglev", "source_hash"])
def test_one_5_tuple_reaches_the_same_backend_through_either_node(clean: Lab,
                                                                 strategy: str) -> None:
    lab = clean
    lab.serve((replace(TCP, strategy=strategy),))
    for sport in sports(12):
        lab.route("lb1")
        first = lab.ask(80, sport)
        lab.route("lb2")
        assert lab.ask(80, sport) == first, sport


def test_round_robin_takes_turns(clean: Lab) -> None:
    lab = clean
    lab.serve((replace(TCP, strategy="round_robin"),))
    lab.route("lb1")
    answers = Counter(lab.ask(80) for _ in range(40))
    assert answers == {i: 10 for i in lab.members}, answers


def test_removing_a_backend_moves_only_its_flows(clean: Lab) -> None:
    lab = clean
    lab.serve((TCP,))
    lab.route("lb1")
    flows = sports(120)
    before = {s: lab.ask(80, s) for s in flows}
    gone = Counter(before.values()).most_common(1)[0][0]
    healthy = {i: (80,) for i in lab.members if i != gone}
    lab.serve((TCP,), healthy)
    after = {s: lab.ask(80, s) for s in flows}
    assert gone not in after.values()
    others = [s for s in flows if before[s] != gone]
    moved = [s for s in others if after[s] != before[s]]
    assert len(moved) <= 0.02 * len(others), (moved, before, after)
    # Through the other node, the same choices.
    lab.route("lb2")
    assert {s: lab.ask(80, s) for s in flows[:20]} == {s: after[s] for s in flows[:20]}


def test_established_flows_survive_table_changes_even_to_a_removed_backend(clean: Lab) -> None:
    lab = clean
    got = lab.echo_servers()
    echo_service = replace(TCP, port=90, target_port=ECHO_PORT)
    lab.serve((echo_service,))
    lab.route("lb1")
    with netns_socket(lab.client, socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(3)
        sock.bind((lab.client_ip, 0))
        sock.connect((lab.vip, 90))
        sock.sendall(b"one\n")
        assert sock.recv(100) == b"one\n"
        [owner] = [i for i, data in got.items() if data]
        # Its backend leaves the table, and another change follows: the flow stays.
        lab.serve((echo_service,), {i: (90,) for i in lab.members if i != owner})
        lab.serve((echo_service, replace(TCP, port=91, target_port=ECHO_PORT)),
                  {i: (90, 91) for i in lab.members if i != owner})
        sock.sendall(b"two\n")
        assert sock.recv(100) == b"two\n"
        assert [i for i, data in got.items() if data] == [owner]
        assert got[owner] == [b"one\n", b"two\n"]


def test_udp_entries_of_a_removed_backend_are_deleted(clean: Lab) -> None:
    lab = clean
    udp = Service(port=53, target_port=GUEST_PORT, protocol="udp", strategy="source_hash",
                  health=FAST)  # type: ignore[arg-type]
    lab.serve((udp,))
    lab.route("lb1")
    node = lab.nodes["lb1"].host.netns
    first = lab.ask(53, 42000, udp=True)
    ip = lab.members[first][1]

    def entries() -> str:
        return sh("ip", "netns", "exec", node, "conntrack", "-L", "-p", "udp",
                  "--reply-src", ip, check=False).stdout

    assert lab.vip in entries()
    lab.serve((udp,), {i: (53,) for i in lab.members if i != first})
    assert lab.vip not in entries()
    # The same flow (5-tuple) now reaches another backend instead of a black hole.
    again = lab.ask(53, 42000, udp=True)
    assert again != first and again in lab.members


def test_health_transitions_are_reported_when_a_service_stops_and_comes_back(
        clean: Lab) -> None:
    lab = clean
    generation = lab.serve((TCP,))

    def seen(node: Node, instance: str, healthy: bool, within: float) -> c.BackendHealth:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for cmd in node.reports:
                if (isinstance(cmd, c.BackendHealth) and cmd.instance == instance
                        and cmd.healthy is healthy):
                    return cmd
            time.sleep(0.05)
        raise AssertionError(f"{node.host.name}: no {healthy} report for {instance}: "
                             f"{node.reports}")

    # Every backend comes up healthy on both nodes (rise x interval).
    for node in lab.nodes.values():
        for instance in lab.members:
            cmd = seen(node, instance, True, 3.0)
            assert cmd.id == LB and cmd.port == 80 and cmd.generation == generation
            assert cmd.cmd_id.startswith(f"health-{node.host.name}-{LB}-{instance}-80-")
    host, ip = lab.members["b2"]
    lab.guest("b2", host, int(ipaddress.IPv4Address(ip)) - int(lab.cidr[0]), power="stopped")
    started = time.monotonic()
    for node in lab.nodes.values():
        down = seen(node, "b2", False, 3.0)
        assert down.detail
    print(f"\nhealth: b2 down reported after {time.monotonic() - started:.2f} s "
          f"(fall x interval = 0.4 s): {down.detail}")
    lab.guest("b2", host, int(ipaddress.IPv4Address(ip)) - int(lab.cidr[0]))
    for node in lab.nodes.values():
        deadline = time.monotonic() + 3.0
        while (seq := [r.healthy for r in node.reports if isinstance(r, c.BackendHealth)
                       and r.instance == "b2"]) != [True, False, True]:
            assert time.monotonic() < deadline and len(seq) < 3, node.reports
            time.sleep(0.05)
    ids = [r.cmd_id for n in lab.nodes.values() for r in n.reports]
    assert len(ids) == len(set(ids))


def test_two_balancers_on_one_network_share_both_nodes(clean: Lab) -> None:
    """Each node then has two ports on one subnet: the flows of both balancers leave by
    whichever the kernel routes through, with that port's address."""
    lab = clean
    lab.serve((TCP,))
    vip2 = str(free_underlay()[10])
    ports = {n: NicSpec(network=NET, vni=VNI, mac=mac_address(f"lb.api.{n}", 0),
                        ip=str(lab.cidr[211 + i]), prefix=lab.cidr.prefixlen)
             for i, n in enumerate(NODES)}
    lab.extra_ports = [(p.mac, p.ip, n) for n, p in ports.items()]
    lab.apply_network()
    try:
        lab.generation += 1
        for n, node in lab.nodes.items():
            spec = replace(lab.spec((TCP,), None, n), vip=vip2, port=ports[n], seed=1)
            assert node.lb.apply("api", spec, lab.generation) == "serving"
        for via in NODES:
            lab.route(via)
            lab.route(via, vip=vip2)
            assert lab.reached(80) == set(lab.members)
            assert lab.reached(80, vip=vip2) == set(lab.members)
    finally:
        lab.generation += 1
        for node in lab.nodes.values():
            assert node.lb.apply("api", None, lab.generation) == "absent"
        lab.extra_ports = []
        lab.apply_network()
    for via in NODES:
        lab.route(via)
        assert lab.reached(80) == set(lab.members)


def test_each_node_announces_the_vip_by_bgp_while_it_serves(clean: Lab) -> None:
    """With a router (bird, ECMP): both nodes announce, connections through the router
    reach the backends through both nodes, and a node that stops serving withdraws."""
    lab = clean
    ports = {n: NicSpec(network=NET, vni=VNI, mac=mac_address(f"lb.bgp.{n}", 0),
                        ip=str(lab.cidr[221 + i]), prefix=lab.cidr.prefixlen)
             for i, n in enumerate(NODES)}
    lab.extra_ports = [(p.mac, p.ip, n) for n, p in ports.items()]
    lab.apply_network()
    drivers: dict[str, LbDriver] = {}
    with Edge(lab.fabric, NODES, avoid=[lab.cidr]) as edge:
        vip = edge.vip(0)
        try:
            for n in NODES:
                local, router = edge.uplink(n)
                drivers[n] = LbDriver(n, lab.fabric.host(n).underlay_ip,
                                      lab.fabric.host(n).netns, bgp=BgpConfig(
                                          router, edge.router_asn, edge.node_asn, local))
                spec = replace(lab.spec((TCP,), None, n), vip=vip, port=ports[n])
                assert drivers[n].apply("bgp", spec, 1) == "serving"
            print(f"\nbgp: both nexthops after {edge.wait_routes(vip, NODES):.2f} s")
            answers = Counter(edge.connect(vip, 80) for _ in range(100))
            assert set(answers) == set(lab.members), answers
            assert all(d.counters("bgp")["tcp_80"] > 0 for d in drivers.values())
            assert drivers["lb1"].apply("bgp", None, 2) == "absent"
            edge.wait_routes(vip, ["lb2"])
            assert {edge.connect(vip, 80) for _ in range(30)} <= set(lab.members)
            assert drivers["lb2"].apply("bgp", None, 2) == "absent"
            edge.wait_routes(vip, [])
        finally:
            for driver in drivers.values():
                driver.close()  # stops bird: the router withdraws whatever is left
            lab.extra_ports = []
            lab.apply_network()


def test_removal_leaves_no_nft_state_no_port_and_no_vip(clean: Lab) -> None:
    lab = clean
    lab.serve((TCP, Service(port=53, target_port=GUEST_PORT, protocol="udp",
                            strategy="round_robin", health=FAST)))  # type: ignore[arg-type]
    for node in lab.nodes.values():
        assert node.lb.observe() == {LB: "serving"}
        assert node.lb.generations() == {LB: lab.generation}
    lab.generation += 1
    for node in lab.nodes.values():
        ns = node.host.netns
        assert node.lb.apply(LB, None, lab.generation) == "absent"
        assert node.lb.observe() == {}
        assert "orch_lb" not in sh("ip", "netns", "exec", ns, "nft", "list", "tables").stdout
        links = sh("ip", "-n", ns, "-o", "link").stdout
        assert not any(name in links for name in port_names(LB))
        assert lab.vip not in sh("ip", "-n", ns, "-o", "addr", "show", "dev", "lo").stdout
        assert node.lb.prober.states() == {}
        assert not node.lb.remove(LB)


def test_an_older_job_changes_nothing_and_a_restarted_driver_adopts(clean: Lab) -> None:
    lab = clean
    generation = lab.serve((TCP,))
    node = lab.nodes["lb1"]
    written = node.lb.transactions
    assert node.lb.apply(LB, lab.spec((TCP,), None, "lb1"), generation) == "serving"
    assert node.lb.transactions == written  # the same job again: no transaction
    stale = lab.spec((TCP,), {"b1": (80,)}, "lb1")
    assert node.lb.apply(LB, stale, generation - 1) == "serving"
    lab.route("lb1")
    assert len({lab.ask(80) for _ in range(30)}) > 1
    # A new driver (an agent restart) sees the generation and rewrites the table once.
    fresh = LbDriver("lb1", node.host.underlay_ip, node.host.netns)
    try:
        assert fresh.generations() == {LB: generation}
        assert fresh.apply(LB, lab.spec((TCP,), None, "lb1"), generation) == "serving"
        assert len({lab.ask(80) for _ in range(30)}) > 1
    finally:
        fresh.prober.close()


@pytest.mark.parametrize(("change", "message"), [
    (dict(vip="10.0.0.256"), "is not an IPv4 address"),
    (dict(vip="INSIDE"), "lies inside the backends' network"),
    (dict(services=(TCP, replace(TCP, target_port=81))), "two services on tcp port 80"),
    (dict(services=(replace(TCP, strategy="least_conn"),)), "strategy least_conn is not"),
    (dict(services=(replace(TCP, health=HealthCheck(interval_ms=200, timeout_ms=200)),)),
     "timeout 200 ms >= interval 200 ms"),
    (dict(backends="OTHER-NET"), "not on this node's port network"),
])
def test_bad_specs_fail_clearly(clean: Lab, change: dict[str, object], message: str) -> None:
    lab = clean
    spec = lab.spec((TCP,), None, "lb1")
    if change.get("vip") == "INSIDE":
        change = dict(vip=str(lab.cidr[77]))
    if change.get("backends") == "OTHER-NET":
        change = dict(backends=(replace(spec.backends[0], network="elsewhere"),))
    with pytest.raises(PermanentDriverError, match=message):
        lab.nodes["lb1"].lb.apply(LB, replace(spec, **change), lab.generation + 1)
    assert lab.nodes["lb1"].lb.observe() == {}


def test_the_prober_checks_http_and_udp_from_the_node(clean: Lab) -> None:
    lab = clean
    lab.serve((TCP,))  # the node's port on the backends' network
    ip = lab.members["b1"][1]
    seen: list[Transition] = []
    prober = Prober(lab.nodes["lb1"].host.netns, seen.append)
    check = Check(0.6, 0.5, 1, 1)
    try:
        prober.update("p", [
            Target("p", "http", 80, ip, GUEST_PORT, dataclasses.replace(check, http_path="/"), 1),
            Target("p", "udp", 53, ip, GUEST_PORT, dataclasses.replace(check, protocol="udp"), 1),
            Target("p", "closed", 81, ip, 1, check, 1),
            Target("p", "silent", 54, ip, 1, dataclasses.replace(check, protocol="udp"), 1)])
        deadline = time.monotonic() + 3
        while len({t.target.instance for t in seen}) < 4:
            assert time.monotonic() < deadline, seen
            time.sleep(0.02)
    finally:
        prober.close()
    first = {t.target.instance: t for t in reversed(seen)}
    assert first["http"].healthy and first["http"].detail.startswith("HTTP 200")
    assert first["udp"].healthy and first["udp"].detail.startswith("answered")
    assert not first["closed"].healthy and not first["silent"].healthy


def test_a_job_that_contradicts_what_the_node_saw_gets_the_state_again(clean: Lab) -> None:
    """A report lost on the way (the fold still counts a backend healthy that this node saw
    fall): the next job makes the node say it again; a job that agrees does not."""
    lab = clean
    lab.serve((TCP,))
    lab.route("lb1")
    node = lab.nodes["lb1"]

    def ups() -> int:
        return sum(1 for r in node.reports if isinstance(r, c.BackendHealth) and r.healthy)

    deadline = time.monotonic() + 3
    while ups() < len(lab.members):
        assert time.monotonic() < deadline, node.reports
        time.sleep(0.05)
    lab.serve((TCP,))  # agrees with what the node saw: nothing more
    assert ups() == len(lab.members)
    lab.serve((TCP,), {"b1": (80,), "b2": (80,)})  # b3, b4 out: the node says they are up
    again = [r for r in node.reports if isinstance(r, c.BackendHealth)][len(lab.members):]
    assert sorted((r.instance, r.healthy) for r in again) == [("b3", True), ("b4", True)]
    assert all(r.detail.startswith("still up") for r in again)


def test_a_service_with_an_http_path_is_checked_by_http_get(clean: Lab) -> None:
    lab = clean
    http = HealthCheck(interval_ms=200, timeout_ms=100, rise=1, fall=1, http_path="/")
    lab.serve((replace(TCP, health=http),))
    node = lab.nodes["lb1"]
    deadline = time.monotonic() + 3
    while {r.instance for r in node.reports if isinstance(r, c.BackendHealth)
           and r.healthy and r.detail.startswith("HTTP 200")} != set(lab.members):
        assert time.monotonic() < deadline, node.reports
        time.sleep(0.05)


def test_thresholds_rise_and_fall() -> None:
    t = Threshold(rise=2, fall=3)
    assert [t.observe(ok) for ok in (True, False, True, True)] == [False, False, False, True]
    assert t.healthy is True
    assert [t.observe(ok) for ok in (False, False, True, False, False, False)] == [
        False, False, False, False, False, True]
    assert t.healthy is False
    assert [t.observe(ok) for ok in (False, True, True, True)] == [False, False, True, False]
    first_down = Threshold(rise=1, fall=1)
    assert first_down.observe(False) and first_down.healthy is False


def test_transition_keys_stay_valid_for_long_names() -> None:
    target = Target("l" * 63, "i_" * 31, 80, "10.0.0.1", 8080, Check(1, 0.5, 2, 2), 7)
    key = health_cmd_id("h" * 63, Transition(target, False, "refused", 3), "abc123")
    assert len(key) <= 128 and key.startswith("health-") and key.endswith("-7-abc1233")
    cmd = c.BackendHealth(cmd_id=key, id="l" * 63, instance="i_" * 31, port=80,
                          healthy=False, generation=7)
    assert msgspec.json.decode(msgspec.json.encode(cmd), type=c.BackendHealth) == cmd


async def test_an_agent_applies_lb_jobs_and_publishes_health_from_its_own_source(
        clean: Lab, env: Env, js) -> None:
    """The runtime's part: a job on job.<node>.lb.<id> is applied and reported as
    LbApplied, and the prober's transitions reach the log as BackendHealth from the node."""
    lab = clean
    node = lab.nodes["lb1"]
    driver = LbDriver("lb1", node.host.underlay_ip, node.host.netns)  # the agent closes it
    agent = Agent(AgentConfig(env.nats_url, "lb1", "none", resync_s=3600),
                  lambda: {"lb": driver})
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))

    async def publish(generation: int, spec: LbSpec | None) -> None:
        job = Job(kind="lb", id=LB, host="lb1", generation=generation, spec=spec)
        await js.publish(f"job.lb1.lb.{LB}", msgspec.json.encode(job), stream=JOB_STREAM)

    async def reports() -> list[c.Command]:
        return [command_from_dict(msgspec.json.decode(m.data)) async for batch in
                read_stream(js, CMD_STREAM, f"cmd.*.lb1.lb.{LB}") for m in batch]

    try:
        lab.generation += 1
        await publish(lab.generation, lab.spec((TCP,), None, "lb1"))

        async def all_healthy() -> bool:
            got = await reports()
            return (any(isinstance(r, c.LbApplied) and r.observed == "serving" for r in got)
                    and {r.instance for r in got if isinstance(r, c.BackendHealth)
                         and r.healthy} == set(lab.members))

        await eventually(all_healthy, timeout=10)
        lab.route("lb1")
        assert lab.ask(80) in lab.members
        lab.generation += 1
        await publish(lab.generation, None)

        async def removed() -> bool:
            return any(isinstance(r, c.LbApplied) and r.observed == "absent"
                       and r.generation == lab.generation for r in await reports())

        await eventually(removed, timeout=10)
    finally:
        stop.set()
        await running
    assert driver.prober._loop.is_closed()
