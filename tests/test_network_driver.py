"""The network dataplane against the real kernel: segments, ports and firewalls in network
namespaces, proven by packets (ping, TCP, raw frames), not by reading config back.

One fabric of three hosts (`tests.fabric`: a fabric namespace with the underlay bridge, a
namespace per host) is shared by the module; each test makes its own guests
(`tests.netns`) on its own VNI and removes them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import itertools
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from agents.drivers.network import NetworkDriver
from agents.drivers.vm import PermanentDriverError, TransientDriverError, tap_name
from agents.net import names
from agents.net.errors import TransientNetError
from agents.net.firewall import MARK_BASE, PortPolicy
from agents.net.ports import PortPlumbing
from schemas.specs import NetworkSpec, NicSpec, RemotePort, SecurityRule
from tests.fabric import FabricHost, free_underlay
from tests.netns import Guest, Topology, sh, topology

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


@dataclass
class Agent:
    host: FabricHost
    network: NetworkDriver
    ports: PortPlumbing

    @property
    def writes(self) -> int:
        """Netlink writes and nft commands of this host's namespace so far."""
        return self.ports.writes


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    with topology(3) as t:
        yield t


@pytest.fixture(scope="module")
def agents(topo: Topology) -> Iterator[list[Agent]]:
    made: list[Agent] = []
    try:
        for host in topo.hosts:
            made.append(Agent(host, NetworkDriver(host.underlay_ip, host.netns),
                              PortPlumbing(host.netns)))
        yield made
    finally:
        for agent in made:
            agent.network.close()
            agent.ports.close()


@dataclass
class Net:
    """One test's network: its guests, applied to the hosts as the fold would."""

    topo: Topology
    agents: list[Agent]
    id: str = field(default_factory=lambda: f"net-{secrets.token_hex(3)}")
    vni: int = field(default_factory=lambda: 100_000 + secrets.randbelow(16_000_000))
    cidr: str = field(default_factory=lambda: str(free_underlay()))
    guests: list[Guest] = field(default_factory=list)
    generation: int = 0
    others: list[Net] = field(default_factory=list)

    def agent(self, host: FabricHost) -> Agent:
        return next(a for a in self.agents if a.host is host)

    def guest(self, host: FabricHost, n: int, rules: tuple[SecurityRule, ...] = (),
              *, mac: str | None = None, plug: bool = True) -> Guest:
        mac = mac or "02:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))
        ip = self.address(n)
        g = self.topo.guest(host, names.port_name(f"{self.id}-{n}-{secrets.token_hex(2)}", 0),
                            mac, ip)
        self.guests.append(g)
        if plug:
            self.plug(g, rules)
        return g

    def address(self, n: int) -> str:
        return str(ipaddress.IPv4Network(self.cidr)[n])

    def nic(self, g: Guest) -> NicSpec:
        return NicSpec(network=self.id, vni=self.vni, mac=g.mac, ip=g.ip, prefix=24, mtu=1500)

    def plug(self, g: Guest, rules: tuple[SecurityRule, ...] = ()) -> None:
        self.agent(g.host).ports.plug(g.port, self.nic(g), rules, g.host.underlay_ip)

    def spec(self, host: FabricHost, extra: tuple[RemotePort, ...] = (),
             vteps: tuple[str, ...] = ()) -> NetworkSpec:
        remote = [g for g in self.guests if g.host is not host]
        ports = sorted([RemotePort(g.mac, g.ip, g.host.underlay_ip) for g in remote]
                       + list(extra), key=lambda p: p.mac)
        all_vteps = sorted({p.vtep for p in ports} | set(vteps))
        return NetworkSpec(vni=self.vni, cidr=self.cidr, mtu=1500, vteps=tuple(all_vteps),
                           ports=tuple(ports))

    def apply(self, *hosts: FabricHost) -> None:
        """The job of every host with a guest (or of ``hosts``), at a new generation."""
        self.generation += 1
        for host in hosts or {g.host.netns: g.host for g in self.guests}.values():
            assert self.agent(host).network.apply(self.id, self.spec(host),
                                                  self.generation) == "up"

    def close(self) -> None:
        for g in self.guests:
            self.agent(g.host).ports.unplug(g.port)
            self.topo.remove_guest(g)
        for agent in self.agents:
            agent.network.apply(self.id, None, 1 << 40)


@pytest.fixture
def net(topo: Topology, agents: list[Agent]) -> Iterator[Net]:
    made = Net(topo, agents)
    try:
        yield made
    finally:
        for n in [made, *made.others]:
            n.close()


def other_net(net: Net) -> Net:
    n = Net(net.topo, net.agents)
    net.others.append(n)
    return n


# -- raw frames, for what a guest's stack would never send ----------------------------------

ETH_P_ALL = 0x0003
ETH_P_IP, ETH_P_ARP, ETH_P_EXPERIMENTAL = 0x0800, 0x0806, 0x88B5


def _mac(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(dst_mac: str, src_mac: str, src_ip: str, dst_ip: str, marker: bytes) -> bytes:
    udp = struct.pack("!HHHH", 40000, 9999, 8 + len(marker), 0) + marker
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                         socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return _mac(dst_mac) + _mac(src_mac) + struct.pack("!H", ETH_P_IP) + header + udp


def arp_frame(dst_mac: str, src_mac: str, sender_mac: str, sender_ip: str,
              target_mac: str, target_ip: str) -> bytes:
    arp = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, 2, _mac(sender_mac),
                      socket.inet_aton(sender_ip), _mac(target_mac), socket.inet_aton(target_ip))
    return _mac(dst_mac) + _mac(src_mac) + struct.pack("!H", ETH_P_ARP) + arp


def other_frame(dst_mac: str, src_mac: str, marker: bytes) -> bytes:
    return _mac(dst_mac) + _mac(src_mac) + struct.pack("!H", ETH_P_EXPERIMENTAL) + marker


def raw_socket(g: Guest) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.bind(("eth0", 0))
        return s

    sock = g.inside(make)
    g.topology.sockets.append(sock)
    return sock


def received(sock: socket.socket, wait: float = 0.6) -> list[bytes]:
    """Every frame the socket got within ``wait`` seconds."""
    frames, deadline = [], time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            frames.append(sock.recv(65535))
        except TimeoutError:
            break
    return frames


# -- helpers --------------------------------------------------------------------------------

def exchange(client: socket.socket, server_side: socket.socket, text: bytes,
             timeout: float = 1.0) -> bool:
    """Whether ``text`` sent by the client arrives at the server's end within ``timeout``."""
    try:
        client.sendall(text)
    except OSError:
        return False
    server_side.settimeout(timeout)
    try:
        return server_side.recv(100) == text
    except (TimeoutError, OSError):
        return False


def bridge_fdb(host: FabricHost, vni: int) -> str:
    return sh("bridge", "-n", host.netns, "fdb", "show", "dev", names.vxlan_name(vni)).stdout


def link_exists(host: FabricHost, name: str) -> bool:
    return sh("ip", "-n", host.netns, "link", "show", name, check=False).returncode == 0


@contextlib.contextmanager
def underlay_arp(topo: Topology, mac: str | None = None) -> Iterator[Callable[[], int]]:
    """A count of the ARP frames (from ``mac``) that cross VXLAN on the underlay: nft in
    the fabric namespace, matching the inner ethertype (and source MAC), 28 (22) bytes
    into UDP."""
    fabric, table = topo.fabric.fabric_netns, f"arpobs{secrets.token_hex(3)}"
    source = f" @th,176,48 0x{mac.replace(':', '')}" if mac else ""
    sh("ip", "netns", "exec", fabric, "nft", "-f", "-",
       stdin=f"table bridge {table} {{\n chain watch {{\n type filter hook forward priority 0\n"
             f" udp dport 4789 @th,224,16 0x0806{source} counter\n }}\n}}\n")

    def count() -> int:
        out = sh("ip", "netns", "exec", fabric, "nft", "-j", "list", "chain", "bridge",
                 table, "watch").stdout
        rule = next(x["rule"] for x in json.loads(out)["nftables"] if "rule" in x)
        return next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)

    try:
        yield count
    finally:
        sh("ip", "netns", "exec", fabric, "nft", "delete", "table", "bridge", table,
           check=False)


# -- connectivity ---------------------------------------------------------------------------

def test_ping_and_tcp_cross_hosts_once_segments_are_applied(net: Net) -> None:
    h1, h2, _h3 = net.topo.hosts
    a = net.guest(h1, 10)
    b = net.guest(h2, 11, (SecurityRule("tcp", 7000),))
    # Both segments exist (plugging made them) but no host knows the other: nothing crosses.
    assert link_exists(h1, names.vxlan_name(net.vni))
    assert not a.pings(b.ip)
    net.apply()
    assert a.pings(b.ip, attempts=3) and b.pings(a.ip)
    # A full-size frame with DF set crosses the VXLAN (the underlay has room for it).
    assert a.run("ping", "-c1", "-W1", "-M", "do", "-s", "1472", b.ip, check=False
                 ).returncode == 0
    listener = subprocess.Popen(["ip", "netns", "exec", b.netns, "nc", "-l", "7000"],
                                stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(30):
            sent = a.run("sh", "-c", f"echo hello-{a.ip} | nc -N -w 2 {b.ip} 7000", check=False)
            if sent.returncode == 0:
                break
            time.sleep(0.1)
        out, _ = listener.communicate(timeout=5)
        assert out.strip() == f"hello-{a.ip}"
    finally:
        listener.kill()
        listener.wait()


def test_networks_with_the_same_addresses_stay_apart(net: Net) -> None:
    h1, h2, h3 = net.topo.hosts
    other = other_net(net)
    other.cidr = net.cidr  # the same addresses, another VNI
    x1, x2 = net.guest(h1, 10), net.guest(h2, 11)
    y1, y2 = other.guest(h1, 10), other.guest(h3, 11)
    x3 = net.guest(h3, 12)
    net.apply()
    other.apply()
    assert x1.pings(x2.ip, attempts=3) and y2.pings(y1.ip, attempts=3)
    # y2's .10 is y1 (its MAC), never x1 on the same host with the same address.
    neigh = y2.run("ip", "neigh", "show", y1.ip).stdout
    assert y1.mac in neigh and x1.mac not in neigh
    assert not y2.pings(x3.ip)  # only the other network has .12


def _phantom_behind_h3(net: Net, n: int) -> tuple[Guest, RemotePort]:
    """A guest on h1, and a remote port behind h3 that does not exist: only h1's bridge
    can answer ARP for it."""
    h1, h2, h3 = net.topo.hosts
    a, _b = net.guest(h1, 10), net.guest(h2, 11)
    net.apply(h2)
    phantom = RemotePort(f"02:00:5e:00:00:{n:02x}", net.address(n), h3.underlay_ip)
    net.generation += 1
    net.agent(h1).network.apply(net.id, net.spec(h1, (phantom,)), net.generation)
    return a, phantom


def _answered_here(net: Net, a: Guest, phantom: RemotePort) -> None:
    with underlay_arp(net.topo) as arp_crossings:
        assert not a.pings(phantom.ip)  # nobody is there...
        assert phantom.mac in a.run("ip", "neigh", "show", phantom.ip).stdout  # ...yet answered
        assert arp_crossings() == 0


def test_arp_for_a_remote_address_is_answered_without_crossing(net: Net) -> None:
    a, phantom = _phantom_behind_h3(net, 0x99)
    _answered_here(net, a, phantom)
    with underlay_arp(net.topo) as arp_crossings:
        # Control: an address without a neighbour entry is asked for across the segment.
        assert not a.pings(net.address(98))
        assert arp_crossings() > 0


def test_a_port_joining_leaves_the_segments_answers_for_remote_addresses(net: Net) -> None:
    h1 = net.topo.hosts[0]
    a, phantom = _phantom_behind_h3(net, 98)
    bridge = names.bridge_name(net.vni)
    # A port whose host end has a lower address than every port before it: a bridge left
    # to take its ports' lowest address takes that one, and the kernel then flushes the
    # bridge's neighbour table, our permanent entries too.
    low = net.guest(h1, 12, plug=False)
    sh("ip", "-n", h1.netns, "link", "set", low.port, "address", "02:00:00:00:00:01")
    address = sh("ip", "-n", h1.netns, "link", "show", bridge).stdout
    net.plug(low)
    assert sh("ip", "-n", h1.netns, "link", "show", bridge).stdout == address
    assert phantom.mac in sh("ip", "-n", h1.netns, "neigh", "show", "dev", bridge).stdout
    _answered_here(net, a, phantom)  # still, by the bridge


# -- anti-spoofing --------------------------------------------------------------------------

def test_spoofed_source_ip_or_mac_gets_nothing_through(net: Net) -> None:
    h1, h2, _h3 = net.topo.hosts
    a = net.guest(h1, 10)
    b = net.guest(h2, 11, (SecurityRule("udp", 9999),))
    c = net.guest(h2, 12)
    net.apply()
    assert a.pings(b.ip, attempts=3)
    rx, tx = raw_socket(b), raw_socket(a)
    stranger = "02:11:22:33:44:55"
    frames = {
        b"honest": udp_frame(b.mac, a.mac, a.ip, b.ip, b"honest"),
        b"spoofed-ip": udp_frame(b.mac, a.mac, c.ip, b.ip, b"spoofed-ip"),
        b"spoofed-mac": udp_frame(b.mac, stranger, a.ip, b.ip, b"spoofed-mac"),
        b"other-ethertype": other_frame(b.mac, a.mac, b"other-ethertype"),
        b"arp-honest": arp_frame(b.mac, a.mac, a.mac, a.ip, b.mac, b.ip),
        b"arp-spoofed-ip": arp_frame(b.mac, a.mac, a.mac, c.ip, b.mac, b.ip),
        b"arp-spoofed-mac": arp_frame(b.mac, a.mac, stranger, a.ip, b.mac, b.ip),
    }
    for frame in frames.values():
        tx.send(frame)
    got = received(rx)
    seen = {marker for marker, frame in frames.items()
            if any(g[:len(frame)] == frame for g in got)}
    assert seen == {b"honest", b"arp-honest"}
    # Dropped before the bridge learns: a frame claiming b's MAC does not move b to a's
    # port (a's pings would then hairpin back to a and be lost).
    tx.send(udp_frame(c.mac, b.mac, b.ip, c.ip, b"claims-b"))
    assert f"{b.mac} dev {names.vxlan_name(net.vni)} master" in sh(
        "bridge", "-n", h1.netns, "fdb", "show", "br", names.bridge_name(net.vni)).stdout
    assert a.pings(b.ip)
    # The guest's own stack with a foreign MAC: nothing through; its own again: fine.
    a.run("ip", "link", "set", "eth0", "address", stranger)
    try:
        assert not a.pings(b.ip)
    finally:
        a.run("ip", "link", "set", "eth0", "address", a.mac)
    assert a.pings(b.ip, attempts=3)


# -- rules ----------------------------------------------------------------------------------

def test_a_rule_opens_tcp_8080_from_one_address_only(net: Net) -> None:
    h1, h2, h3 = net.topo.hosts
    a1, a2 = net.guest(h1, 10), net.guest(h3, 12)
    b = net.guest(h2, 11, (SecurityRule("tcp", 8080, f"{a1.ip}/32"),))
    net.apply()
    b.tcp_listen(8080)
    b.tcp_listen(8081)
    assert a1.tcp_connect(b.ip, 8080) is not None
    assert a2.tcp_connect(b.ip, 8080) is None  # another source
    assert a1.tcp_connect(b.ip, 8081) is None  # another port
    assert a2.pings(b.ip)  # ping is always allowed


def test_established_connection_survives_unrelated_changes_and_is_cut_with_its_rule(
        net: Net) -> None:
    h1, h2, _h3 = net.topo.hosts
    a = net.guest(h1, 10)
    own = SecurityRule("tcp", 8080, f"{a.ip}/32")
    b = net.guest(h2, 11, (own,))
    net.apply()
    server = b.tcp_listen(8080)
    client = a.tcp_connect(b.ip, 8080)
    assert client is not None
    server.settimeout(2)
    conn, _ = server.accept()
    net.topo.sockets.append(conn)
    assert exchange(client, conn, b"one")
    firewall = net.agent(h2).ports.firewall
    for rules in [(own, SecurityRule("udp", 53)),
                  (own, SecurityRule("udp", 53), SecurityRule("tcp", 22, "10.0.0.0/8")),
                  (SecurityRule("tcp", 22, "10.0.0.0/8"), own)]:
        forgotten = firewall.forgotten
        net.plug(b, rules)
        assert firewall.forgotten == forgotten
        assert exchange(client, conn, b"still")
    net.plug(b, (SecurityRule("tcp", 22, "10.0.0.0/8"),))
    assert firewall.forgotten > 0
    assert not exchange(client, conn, b"cut")
    assert a.tcp_connect(b.ip, 8080) is None


def test_ports_plugged_at_once_share_transactions_and_fail_alone(net: Net) -> None:
    h1, _h2, _h3 = net.topo.hosts
    agent = net.agent(h1)
    ports = [names.port_name(f"{net.id}-batch-{i}", 0) for i in range(12)]
    sh("ip", "-n", h1.netns, "-batch", "-",
       stdin="".join(f"link add {p} type veth peer name q{p[2:]}\n" for p in ports))
    nics = [NicSpec(network=net.id, vni=net.vni, mac=f"02:00:00:00:01:{i:02x}",
                    ip=net.address(20 + i), prefix=24) for i in range(len(ports))]
    rules = (SecurityRule("tcp", 80), SecurityRule("udp", 53, "10.0.0.0/8"))
    firewall = agent.ports.firewall
    try:
        agent.ports.plug(ports[0], nics[0], rules, h1.underlay_ip)  # the tables exist
        transactions = firewall.transactions
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda i: agent.ports.plug(ports[i], nics[i], rules,
                                                     h1.underlay_ip), range(1, len(ports))))
        assert firewall.transactions - transactions < len(ports) - 1
        before = agent.writes
        for port, nic in zip(ports, nics, strict=True):
            agent.ports.plug(port, nic, rules, h1.underlay_ip)
        assert agent.writes == before
        # One port whose rules the kernel refuses, among others: it fails alone.
        bad = PortPolicy(ports[0], names.bridge_name(net.vni), "not-a-mac", nics[0].ip, ())
        good = [PortPolicy(p, names.bridge_name(net.vni), n.mac, n.ip, rules[:1])
                for p, n in zip(ports[1:], nics[1:], strict=True)]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(firewall.converge, policy) for policy in [bad, *good]]
            with pytest.raises(TransientNetError, match="nft refused"):
                futures[0].result()
            assert all(f.result() > 0 for f in futures[1:])
        assert set(ports) <= agent.ports.plugged()
    finally:
        for port in ports:
            agent.ports.unplug(port)
            sh("ip", "-n", h1.netns, "link", "del", port, check=False)
    assert not set(ports) & agent.ports.plugged()


def marks(host: FabricHost) -> dict[str, int]:
    """Port -> mark, as the kernel's bridge table holds them."""
    out = sh("ip", "netns", "exec", host.netns, "nft", "-j", "list", "map", "bridge",
             names.PORTS_TABLE, "to_mark").stdout
    elems = next(o["map"] for o in json.loads(out)["nftables"] if "map" in o).get("elem", [])
    return {port: mark for port, mark in elems}


def port_elements(host: FabricHost, set_name: str, port: str) -> list[str]:
    """What the bridge table's set (port_macs, port_ips) holds for one port."""
    out = sh("ip", "netns", "exec", host.netns, "nft", "-j", "list", "set", "bridge",
             names.PORTS_TABLE, set_name).stdout
    elems = next(o["set"] for o in json.loads(out)["nftables"] if "set" in o).get("elem", [])
    values = [e["elem"]["val"] if "elem" in e else e for e in elems]  # with a comment or not
    return sorted(v["concat"][1] for v in values if v["concat"][0] == port)


def test_a_port_whose_mac_and_address_changed_is_left_only_the_new_ones(net: Net) -> None:
    """Its elements are replaced, not accumulated: frames with the old MAC or address are
    dropped from then on."""
    h1, h2, _h3 = net.topo.hosts
    a = net.guest(h1, 10, (SecurityRule("udp", 9999),))
    b = net.guest(h2, 11)
    net.apply()
    assert a.pings(b.ip, attempts=3)
    new_mac, new_ip = "02:00:00:00:77:77", net.address(21)
    firewall = net.agent(h2).ports.firewall
    assert firewall.converge(PortPolicy(b.port, names.bridge_name(net.vni), new_mac, new_ip,
                                        ())) > 0
    assert port_elements(h2, "port_macs", b.port) == [new_mac]
    assert port_elements(h2, "port_ips", b.port) == [new_ip]
    rx, tx = raw_socket(a), raw_socket(b)
    tx.send(udp_frame(a.mac, b.mac, b.ip, a.ip, b"old-mac"))
    tx.send(udp_frame(a.mac, new_mac, b.ip, a.ip, b"old-ip"))
    tx.send(udp_frame(a.mac, new_mac, new_ip, a.ip, b"new-both"))
    got = b"".join(received(rx))
    assert b"new-both" in got and b"old-mac" not in got and b"old-ip" not in got


def test_a_mark_another_writer_took_is_not_given_again(net: Net) -> None:
    """The firewall keeps the marks maps between plugs, keyed by the ruleset's generation:
    a write by anyone else in between makes it read them again."""
    h1 = net.topo.hosts[0]
    a = net.guest(h1, 10)
    held = marks(h1)
    free = next(m for m in itertools.count(MARK_BASE + 1) if m not in held.values())
    sh("ip", "netns", "exec", h1.netns, "nft", "add", "element", "bridge", names.PORTS_TABLE,
       "to_mark", f"{{ \"op-squatter\" : {free} }}")
    try:
        b = net.guest(h1, 11)
        now = marks(h1)
        assert now[b.port] != free
        assert len({now[a.port], now[b.port], free}) == 3
    finally:
        sh("ip", "netns", "exec", h1.netns, "nft", "delete", "element", "bridge",
           names.PORTS_TABLE, "to_mark", '{ "op-squatter" }')


# -- convergence ----------------------------------------------------------------------------

def test_a_second_apply_or_plug_writes_nothing(net: Net) -> None:
    h1, h2, _h3 = net.topo.hosts
    a = net.guest(h1, 10, (SecurityRule("tcp", 80), SecurityRule("udp", 53, "10.0.0.0/8")))
    net.guest(h2, 11)
    net.apply()
    agent = net.agent(h1)
    before = agent.writes
    assert agent.network.apply(net.id, net.spec(h1), net.generation) == "up"
    net.plug(a, (SecurityRule("udp", 53, "10.0.0.0/8"), SecurityRule("tcp", 80)))
    assert agent.writes == before
    assert a.port in agent.ports.plugged()


def test_drift_is_repaired_by_the_next_apply(net: Net) -> None:
    h1, h2, h3 = net.topo.hosts
    a, a2 = net.guest(h1, 10, (SecurityRule("udp", 9999),)), net.guest(h3, 12)
    rules = (SecurityRule("tcp", 8080, f"{a.ip}/32"),)
    b = net.guest(h2, 11, rules)
    net.apply()
    assert a.pings(b.ip, attempts=3)
    vx = names.vxlan_name(net.vni)
    # Forwarding entries deleted by hand: b is unreachable from h1...
    sh("bridge", "-n", h1.netns, "fdb", "del", b.mac, "dev", vx, "dst", h2.underlay_ip)
    sh("bridge", "-n", h1.netns, "fdb", "del", "00:00:00:00:00:00", "dev", vx, "dst",
       h2.underlay_ip)
    assert not a.pings(b.ip)
    # ...until the same job is applied again.
    before = net.agent(h1).writes
    net.agent(h1).network.apply(net.id, net.spec(h1), net.generation)
    assert net.agent(h1).writes - before == 2
    assert a.pings(b.ip, attempts=3)
    # An nft table flushed by hand: the rules are gone (a2 gets in)...
    b.tcp_listen(8080)
    assert a2.tcp_connect(b.ip, 8080) is None
    sh("ip", "netns", "exec", h2.netns, "nft", "flush", "table", "inet", names.GUESTS_TABLE)
    assert a2.tcp_connect(b.ip, 8080) is not None
    # ...until the port is plugged again.
    net.plug(b, rules)
    assert a2.tcp_connect(b.ip, 8080) is None
    assert a.tcp_connect(b.ip, 8080) is not None
    # The bridge table deleted altogether: anti-spoofing comes back with the next plug.
    sh("ip", "netns", "exec", h2.netns, "nft", "delete", "table", "bridge", names.PORTS_TABLE)
    net.plug(b, rules)
    rx, tx = raw_socket(a), raw_socket(b)
    tx.send(udp_frame(a.mac, b.mac, a2.ip, a.ip, b"spoofed"))
    tx.send(udp_frame(a.mac, b.mac, b.ip, a.ip, b"honest"))
    got = b"".join(received(rx))
    assert b"honest" in got and b"spoofed" not in got


def _older_layout(bridge: str, ports: list[tuple[Guest, int]], source: str) -> str:
    """Our tables as an agent of layout "orch:v1" wrote them (per-port chains and sets),
    for ``ports`` (guest, mark) on one segment that allows TCP 8080 from ``source``."""
    guard = ("ether saddr != {mac} drop\narp saddr ether != {mac} drop\n"
             "arp saddr ip != {ip} drop\nether type arp accept\nip saddr != {ip} drop\n"
             "ether type ip accept\ndrop comment \"orch:v1 {mac} {ip}\"")
    to = ("ct state established,related accept\nct state invalid drop\n"
          "icmp type echo-request accept\nmeta l4proto . th dport . ip saddr @allow_{port} "
          "accept\ndrop comment \"orch:v1 {ip} {bridge}\"")
    out = [f"delete table bridge {names.PORTS_TABLE}", f"delete table inet {names.GUESTS_TABLE}",
           f"table bridge {names.PORTS_TABLE} {{"]
    out += [f"chain in_{g.port} {{\n{guard.format(mac=g.mac, ip=g.ip)}\n}}" for g, _ in ports]
    out += ["map from_port { type ifname : verdict; elements = { "
            + ", ".join(f'"{g.port}" : jump in_{g.port}' for g, _ in ports) + " } }",
            "map to_mark { type ifname : mark; elements = { "
            + ", ".join(f'"{g.port}" : {mark}' for g, mark in ports) + " } }",
            "chain prerouting {\ntype filter hook prerouting priority -200; policy accept;\n"
            "iifname vmap @from_port comment \"orch:v1 base\"\n}",
            "chain forward {\ntype filter hook forward priority -200; policy accept;\n"
            "meta mark set oifname map @to_mark comment \"orch:v1 base\"\n}",
            "}", f"table inet {names.GUESTS_TABLE} {{"]
    for g, _ in ports:
        out += [f"set allow_{g.port} {{ type inet_proto . inet_service . ipv4_addr; "
                f"flags interval; elements = {{ tcp . 8080 . {source} }} }}",
                f"chain to_{g.port} {{\n{to.format(port=g.port, ip=g.ip, bridge=bridge)}\n}}"]
    out += ["chain zone_1 {\nct zone set 1 comment \"orch:v1 zone 1\"\n}",
            f'map zone_of {{ type ifname : verdict; elements = {{ "{bridge}" : jump zone_1 }} }}',
            "map to_port { type mark : verdict; elements = { "
            + ", ".join(f"{mark} : jump to_{g.port}" for g, mark in ports) + " } }",
            "chain prerouting {\ntype filter hook prerouting priority -300; policy accept;\n"
            "iifname vmap @zone_of comment \"orch:v1 base\"\n}",
            "chain forward {\ntype filter hook forward priority 0; policy accept;\n"
            "meta mark vmap @to_port comment \"orch:v1 base\"\n}", "}"]
    return "\n".join(out) + "\n"


def test_tables_of_the_older_layout_are_replaced_with_every_port_they_held(net: Net) -> None:
    """A host upgraded from "orch:v1" (chains in_/to_<port>, sets allow_<port>, maps
    from_port/to_port): its next converge replaces the tables in one transaction and
    carries over the ports they held, also one that is not plugged again."""
    h1, h2, _h3 = net.topo.hosts
    a, a2 = net.guest(h1, 10, (SecurityRule("udp", 9999),)), net.guest(h1, 12)
    rules = (SecurityRule("tcp", 8080, f"{a.ip}/32"),)
    b, c = net.guest(h2, 11, rules), net.guest(h2, 13, rules)
    net.apply()
    held = marks(h2)
    sh("ip", "netns", "exec", h2.netns, "nft", "-f", "-",
       stdin=_older_layout(names.bridge_name(net.vni), [(b, held[b.port]), (c, held[c.port])],
                           f"{a.ip}/32"))
    ruleset = sh("ip", "netns", "exec", h2.netns, "nft", "list", "ruleset").stdout
    assert f"chain in_{c.port}" in ruleset and "from_port" in ruleset
    b.tcp_listen(8080)
    c.tcp_listen(8080)
    assert a.tcp_connect(c.ip, 8080) is not None and a2.tcp_connect(c.ip, 8080) is None
    net.plug(b, rules)
    ruleset = sh("ip", "netns", "exec", h2.netns, "nft", "list", "ruleset").stdout
    for older in ("in_ot", "to_ot", "allow_ot", "from_port", "to_port", "orch:v1"):
        assert older not in ruleset
    assert c.port in ruleset and marks(h2) == held
    # c, not plugged again, is behind its firewall: its rule, and its anti-spoofing.
    for g in (b, c):
        assert a.tcp_connect(g.ip, 8080) is not None
        assert a2.tcp_connect(g.ip, 8080) is None
    rx, tx = raw_socket(a), raw_socket(c)
    tx.send(udp_frame(a.mac, c.mac, a2.ip, a.ip, b"spoofed"))
    tx.send(udp_frame(a.mac, c.mac, c.ip, a.ip, b"honest"))
    got = b"".join(received(rx))
    assert b"honest" in got and b"spoofed" not in got
    # Carried over exactly: plugging both again writes nothing.
    agent = net.agent(h2)
    before = agent.writes
    net.plug(b, rules)
    net.plug(c, rules)
    assert agent.writes == before


def test_a_restarted_agent_adopts_its_segment_from_the_kernel(net: Net) -> None:
    h1, h2, _h3 = net.topo.hosts
    a, b = net.guest(h1, 10), net.guest(h2, 11)
    net.generation = 6
    net.apply()
    assert a.pings(b.ip, attempts=3)
    # A new process knows nothing but the kernel: it finds the network and its generation.
    probe = ("import json, sys; from agents.drivers.network import NetworkDriver; "
             "d = NetworkDriver(sys.argv[1], sys.argv[2]); "
             "print(json.dumps([d.generations(), d.observe()]))")
    out = subprocess.run([sys.executable, "-c", probe, h1.underlay_ip, h1.netns], check=True,
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__)))).stdout
    generations, observed = json.loads(out)
    assert generations[net.id] == 7 and observed[net.id] == "up"
    # A new driver object converges without a single write; a stale job changes nothing.
    fresh = NetworkDriver(h1.underlay_ip, h1.netns)
    try:
        before = fresh.writes
        assert fresh.apply(net.id, net.spec(h1), 7) == "up"
        assert fresh.apply(net.id, NetworkSpec(vni=net.vni, cidr=net.cidr, mtu=1500, vteps=(),
                                               ports=()), 5) == "up"
        assert fresh.writes == before
    finally:
        fresh.close()
    assert a.pings(b.ip)


def test_a_late_removal_does_not_undo_a_move(net: Net) -> None:
    h1, h2, h3 = net.topo.hosts
    a = net.guest(h1, 10)
    m = net.guest(h2, 11)
    net.apply()
    old = net.spec(h1)
    assert a.pings(m.ip, attempts=3)
    # m moves to h3: same MAC and address, another VTEP.
    net.agent(h2).ports.unplug(m.port)
    net.topo.remove_guest(m)
    net.guests.remove(m)
    moved = net.guest(h3, 11, mac=m.mac)
    net.apply()
    assert a.pings(moved.ip, attempts=3)
    # The job that still says "m is behind h2" comes late: it is older, nothing changes.
    before = net.agent(h1).writes
    assert net.agent(h1).network.apply(net.id, old, net.generation - 1) == "up"
    assert net.agent(h1).writes == before
    # And the kernel ignores a removal of (MAC, old VTEP) once the MAC points elsewhere.
    vx = names.vxlan_name(net.vni)
    sh("bridge", "-n", h1.netns, "fdb", "del", m.mac, "dev", vx, "dst", h2.underlay_ip,
       check=False)
    assert f"{m.mac} dst {h3.underlay_ip}" in bridge_fdb(h1, net.vni)
    assert a.pings(moved.ip)
    # m moves onto h1 itself: the job that no longer lists it as remote leaves it local.
    net.agent(h3).ports.unplug(moved.port)
    net.topo.remove_guest(moved)
    net.guests.remove(moved)
    local = net.guest(h1, 11, mac=m.mac)
    net.apply(h1)
    assert a.pings(local.ip, attempts=3)
    assert m.mac not in bridge_fdb(h1, net.vni)  # neither remote nor sent to the VXLAN


# -- announcements of reused addresses ------------------------------------------------------

def neighbour(g: Guest, ip: str) -> str:
    """The guest kernel's ARP entry for ``ip`` (``ip neigh show``), "" if it has none."""
    return g.run("ip", "neigh", "show", ip, "dev", "eth0").stdout.strip()


def garps(frames: list[bytes], ip: str) -> list[bytes]:
    """The gratuitous ARPs for ``ip`` among raw frames (sender ip == target ip == ip)."""
    address = socket.inet_aton(ip)
    return [f for f in frames if f[12:14] == b"\x08\x06" and f[28:32] == address == f[38:42]]


def drop(net: Net, g: Guest) -> None:
    """The instance of ``g`` is deleted: its port unplugged, its guest gone."""
    net.agent(g.host).ports.unplug(g.port)
    net.topo.remove_guest(g)
    net.guests.remove(g)


def test_a_reused_address_is_announced_to_local_peers_at_its_new_mac(net: Net) -> None:
    h1, h2, h3 = net.topo.hosts
    peer, old = net.guest(h1, 10), net.guest(h2, 20)
    net.apply()
    assert peer.pings(old.ip, attempts=3)  # real traffic: the peer's entry is old's MAC
    assert old.mac in neighbour(peer, old.ip)
    # old is deleted; its address goes to a new instance, on h3, with another MAC.
    drop(net, old)
    new = net.guest(h3, 20)
    assert new.ip == old.ip and new.mac != old.mac
    with underlay_arp(net.topo, new.mac) as crossed:
        net.apply()
        # h1 announced it on its port itself: nothing crossed the VXLAN...
        assert crossed() == 0
    # ...and the peer's kernel has the new MAC now, not after its own 10-48 s of probing,
    assert new.mac in neighbour(peer, new.ip)
    # and h1's bridge did not learn new's MAC on a local port (its only entry sends it to
    # the VXLAN device).
    fdb = sh("bridge", "-n", h1.netns, "fdb", "show", "br", names.bridge_name(net.vni)).stdout
    lines = [line for line in fdb.splitlines() if line.startswith(new.mac)]
    assert lines and all(f"dev {names.vxlan_name(net.vni)}" in line for line in lines)
    assert peer.pings(new.ip, wait=2)


def test_an_address_reused_on_the_same_host_is_announced_when_plugged(net: Net) -> None:
    h1, h2, _h3 = net.topo.hosts
    peer, other, old = net.guest(h1, 10), net.guest(h1, 11), net.guest(h2, 20)
    net.apply()
    assert peer.pings(old.ip, attempts=3)
    assert old.mac in neighbour(peer, old.ip)
    drop(net, old)
    # The address was remote and is local now; h1's network job has not come yet.
    new = net.guest(h1, 20)
    assert new.mac in neighbour(peer, new.ip)
    assert peer.pings(new.ip, wait=2)
    # The bridge no longer answers for it with old's MAC: a guest that asks gets new's.
    assert other.pings(new.ip, wait=2)
    assert new.mac in neighbour(other, new.ip)
    net.apply()
    assert peer.pings(new.ip)


def test_a_second_apply_restart_or_plug_announces_nothing(net: Net) -> None:
    h1, h2, _h3 = net.topo.hosts
    a, b = net.guest(h1, 10), net.guest(h2, 11)
    rx = raw_socket(a)
    net.apply()
    # b's address is new to h1: announced to a (whose kernel has no entry: ignored).
    assert garps(received(rx, 0.3), b.ip)
    announced = net.agent(h1).ports.host.announced
    net.agent(h1).network.apply(net.id, net.spec(h1), net.generation)
    net.plug(a)
    fresh = NetworkDriver(h1.underlay_ip, h1.netns)  # a restarted agent adopting it
    try:
        fresh.apply(net.id, net.spec(h1), net.generation)
    finally:
        fresh.close()
    assert not garps(received(rx, 0.3), b.ip)
    assert net.agent(h1).ports.host.announced == announced


# -- removal --------------------------------------------------------------------------------

def test_removal_keeps_a_bridge_with_ports_until_they_leave(net: Net) -> None:
    h1, h2, _h3 = net.topo.hosts
    a, _b = net.guest(h1, 10), net.guest(h2, 11)
    net.apply()
    d1 = net.agent(h1).network
    br, vx = names.bridge_name(net.vni), names.vxlan_name(net.vni)
    assert d1.apply(net.id, None, net.generation + 1) == "held"
    assert link_exists(h1, br) and not link_exists(h1, vx)
    assert d1.observe()[net.id] == "held"
    assert d1.generations()[net.id] == net.generation + 1
    assert d1.remove(net.id) is False  # its port is still attached
    assert net.agent(h1).ports.unplug(a.port)
    assert not link_exists(h1, br)
    assert net.id not in d1.observe()
    # A host whose ports are gone loses the whole segment at once.
    net.agent(h2).ports.unplug(_b.port)
    assert net.agent(h2).network.apply(net.id, None, net.generation + 1) == "absent"
    assert not link_exists(h2, br) and not link_exists(h2, vx)


def test_a_sweep_removes_what_no_job_wants(net: Net) -> None:
    h1, _h2, _h3 = net.topo.hosts
    agent = net.agent(h1)
    # A port plugged before its network's job came, whose guest then went away unplugged.
    a = net.guest(h1, 10, (SecurityRule("tcp", 22),))
    br, vx = names.bridge_name(net.vni), names.vxlan_name(net.vni)
    net.topo.remove_guest(a)  # its veth goes with its namespace
    net.guests.remove(a)
    # A VXLAN device of ours without its bridge.
    stray = names.vxlan_name(net.vni + 1)
    sh("ip", "-n", h1.netns, "link", "add", stray, "type", "vxlan", "id", str(net.vni + 1),
       "local", h1.underlay_ip, "dstport", "4789", "nolearning")
    # Neither a segment a network holds, nor one that a port still uses, goes.
    held, waiting = other_net(net), other_net(net)
    h = held.guest(h1, 10)
    held.apply()
    w = waiting.guest(h1, 10)
    assert sorted(agent.network.sweep()) == sorted([br, stray])
    assert not any(link_exists(h1, name) for name in (br, vx, stray))
    assert link_exists(h1, names.bridge_name(held.vni))
    assert link_exists(h1, names.bridge_name(waiting.vni))
    assert agent.network.sweep() == []
    # The gone port's firewall is what a guest driver's sweep removes.
    assert {a.port, h.port, w.port} <= agent.ports.plugged()
    assert agent.ports.unplug(a.port)
    assert a.port not in agent.ports.plugged()


# -- errors ---------------------------------------------------------------------------------

def test_errors_are_clear_and_classified(net: Net, agents: list[Agent]) -> None:
    h1, _h2, _h3 = net.topo.hosts
    nic = NicSpec(network=net.id, vni=net.vni, mac="02:00:00:00:00:01", ip="10.9.9.9",
                  prefix=24)
    with pytest.raises(TransientNetError, match="does not exist"):
        agents[0].ports.plug(names.port_name("nobody", 0), nic, (), h1.underlay_ip)
    with pytest.raises(TransientDriverError, match="does not exist"):
        NetworkDriver(h1.underlay_ip, f"{net.topo.fabric.fabric_netns}-missing")
    other = other_net(net)
    other.vni = net.vni
    net.guest(h1, 10)
    net.apply(h1)
    with pytest.raises(PermanentDriverError, match="is held here by network"):
        agents[0].network.apply(other.id, other.spec(h1), 1)
    # A job's remote ports are checked by the driver, not by their decoding.
    for bad, why in (("02:00:5f:00:00", "is not a MAC address"),
                     ("02:00:5f:00:00:zz", "is not a MAC address")):
        port = RemotePort(bad, net.address(40), _h2.underlay_ip)
        with pytest.raises(PermanentDriverError, match=why):
            agents[0].network.apply(net.id, net.spec(h1, (port,)), net.generation + 1)
    port = RemotePort("02:00:5f:00:00:40", net.address(40), "10.0.0")
    with pytest.raises(PermanentDriverError, match=r"vtep: '10\.0\.0' is not an IPv4"):
        agents[0].network.apply(net.id, net.spec(h1, (port,)), net.generation + 1)


def test_port_names_are_the_taps_agents_have_always_made() -> None:
    """Pinned: guests defined by older agents have taps of these names (and the VM driver
    names its taps with port_name)."""
    assert names.port_name("vm1", 0) == "otea9799e1b20"
    assert names.port_name("a-long-instance-id", 3) == "ot9d7131c81b3"
    assert tap_name is names.port_name
    for instance, index in [("i-1", 0), ("web-7", 3), ("x" * 63, 17)]:
        assert names.is_port_name(names.port_name(instance, index))
        assert len(names.port_name(instance, index)) <= 15


# -- scale ----------------------------------------------------------------------------------

def _phantom(net: Net, n: int, host: FabricHost, mac: int | None = None) -> RemotePort:
    """A remote port nobody holds: entries only."""
    return RemotePort(f"02:00:5f:00:00:{n if mac is None else mac:02x}", net.address(n),
                      host.underlay_ip)


def test_a_newer_job_is_converged_as_its_changes_and_the_same_one_again_in_full(
        net: Net) -> None:
    h1, h2, h3 = net.topo.hosts
    a, b = net.guest(h1, 10), net.guest(h2, 11)
    net.apply()
    assert a.pings(b.ip, attempts=3)
    d1 = net.agent(h1).network
    gone, moved, kept = _phantom(net, 20, h3), _phantom(net, 21, h3), _phantom(net, 22, h3)
    net.generation += 1
    assert d1.apply(net.id, net.spec(h1, (gone, moved, kept)), net.generation) == "up"
    # The changes: a port gone, one moved to another VTEP, one new, and the address of the
    # one gone reused at another MAC.
    reused = _phantom(net, 20, h2, mac=0x99)
    new = _phantom(net, 23, h2)
    moved_now = RemotePort(moved.mac, moved.ip, h2.underlay_ip)
    changed = net.spec(h1, (moved_now, kept, reused, new))
    # A hand-made drift on an entry that the change leaves alone...
    sh("bridge", "-n", h1.netns, "fdb", "del", kept.mac, "dev", names.vxlan_name(net.vni),
       "dst", h3.underlay_ip)
    net.generation += 1
    assert d1.apply(net.id, changed, net.generation) == "up"
    fdb = bridge_fdb(h1, net.vni)
    assert f"{moved.mac} dst {h2.underlay_ip}" in fdb and gone.mac not in fdb
    assert f"{new.mac} dst {h2.underlay_ip}" in fdb and f"{reused.mac} dst" in fdb
    neighbours = sh("ip", "-n", h1.netns, "neigh", "show", "dev",
                    names.bridge_name(net.vni)).stdout
    assert f"{reused.ip} lladdr {reused.mac}" in neighbours
    assert f"{new.ip} lladdr {new.mac}" in neighbours
    # ...is still there: only what changed was read and written,
    assert f"{kept.mac} dst" not in fdb
    # while a driver with nothing converged (an agent restarted) converges it in full,
    # finding the rest exactly as a full convergence makes it: one write, the drift's.
    with NetworkDriver(h1.underlay_ip, h1.netns) as fresh:
        before = fresh.writes
        assert fresh.apply(net.id, changed, net.generation) == "up"
        assert fresh.writes - before == 1
    assert f"{kept.mac} dst {h3.underlay_ip}" in bridge_fdb(h1, net.vni)
    # The same generation again (a resync) is converged in full too.
    sh("bridge", "-n", h1.netns, "fdb", "del", kept.mac, "dev", names.vxlan_name(net.vni),
       "dst", h3.underlay_ip)
    before = d1.writes
    assert d1.apply(net.id, changed, net.generation) == "up"
    assert d1.writes - before == 1 and f"{kept.mac} dst" in bridge_fdb(h1, net.vni)
    assert a.pings(b.ip, attempts=3)


def test_after_a_failed_apply_the_next_job_is_converged_in_full(net: Net) -> None:
    h1, h2, h3 = net.topo.hosts
    a, b = net.guest(h1, 10), net.guest(h2, 11)
    net.apply()
    d1 = net.agent(h1).network
    sh("bridge", "-n", h1.netns, "fdb", "del", b.mac, "dev", names.vxlan_name(net.vni),
       "dst", h2.underlay_ip)
    net.generation += 1
    bad = RemotePort("02:00:5f:00:00:30", "10.0.0.300", h3.underlay_ip)
    with pytest.raises(PermanentDriverError, match="not an IPv4 address"):
        d1.apply(net.id, net.spec(h1, (bad,)), net.generation)
    net.generation += 1
    before = d1.writes
    assert d1.apply(net.id, net.spec(h1), net.generation) == "up"
    assert d1.writes - before == 2  # the entry deleted by hand, and the new generation
    assert a.pings(b.ip, attempts=3)


def test_a_segment_of_1000_remote_ports_converges_from_empty_and_again_writes_nothing(
        net: Net) -> None:
    h1, h2, h3 = net.topo.hosts
    ports = tuple(sorted((RemotePort(f"02:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:"
                                     f"{i & 255:02x}:01", f"10.{i >> 16}.{i >> 8 & 255}."
                                     f"{i & 255}", (h2, h3)[i % 2].underlay_ip)
                          for i in range(1, 1001)), key=lambda p: p.mac))
    spec = NetworkSpec(vni=net.vni, cidr="10.0.0.0/8", mtu=1500,
                       vteps=(h2.underlay_ip, h3.underlay_ip), ports=ports)
    d1 = net.agent(h1).network
    before = d1.writes
    started = time.perf_counter()
    assert d1.apply(net.id, spec, 1) == "up"
    first = time.perf_counter() - started
    writes = d1.writes - before
    started = time.perf_counter()
    assert d1.apply(net.id, spec, 1) == "up"
    second = time.perf_counter() - started
    fdb = bridge_fdb(h1, net.vni)
    assert fdb.count(" dst ") == 1002 and d1.writes - before == writes
    print(f"\n1000 remote ports from empty: {first:.3f} s, {writes} netlink writes "
          f"({writes / first:.0f}/s); again: {second:.3f} s, 0 writes (bench/network.py"
          " --part b times it)")
