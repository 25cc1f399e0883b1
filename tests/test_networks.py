"""Private networks end to end: 3 hosts as namespaces, their agents, namespace guests.

One cloud for the module (a fabric of 3 hosts, nats-server, PostgreSQL, a replica and an
agent per host with `--guests netns`), built once: every test below adds to it and proves
what it claims with packets between guests, or with what the kernel of a host holds.
"""

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from nats.js import JetStreamContext

from agents.drivers.netns_guest import guest_base, guest_netns
from agents.guest_service import netns_socket
from agents.net import names
from events.bus import Publisher, connect
from events.topology import ensure_topology
from orchestrator.embedded import NatsServer, PostgresServer
from orchestrator.store import connect_pg
from schemas.codec import command_from_dict
from tests.conftest import PARTITIONS, Env, Processes, eventually, isolated, settled
from tests.fabric import Fabric, unavailable

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))

CIDR = "10.50.0.0/24"  # both networks: overlapping, isolated by their VNIs
VNI_A, VNI_B = 100, 200
SERVICE = 8080
RESYNC_S = 2.0
OPEN_RULES = [{"protocol": "tcp", "port": SERVICE, "source": CIDR},
              {"protocol": "udp", "port": SERVICE, "source": CIDR}]


@dataclass
class Cloud:
    fabric: Fabric
    env: Env
    processes: Processes
    js: JetStreamContext
    pg: asyncpg.Connection
    publisher: Publisher
    n: itertools.count

    async def send(self, source: str, **fields: Any) -> None:
        fields.setdefault("cmd_id", f"t{next(self.n)}")
        await self.publisher.publish(source, command_from_dict(fields))

    def agent(self, host: str) -> subprocess.Popen[bytes]:
        h = self.fabric[host]
        return self.processes.orch(
            "agent", "--host", host, "--guests", "netns", "--netns", h.netns,
            "--underlay-ip", h.underlay_ip, "--resync", str(RESYNC_S), "--heartbeat", "0.5",
            env=self.env.environ(), name=f"agent-{host}-{next(self.n)}")

    def kill_agent(self, host: str) -> None:
        """SIGKILL the host's agent: what its host's kernel holds stays as it was."""
        (name,) = [n for n in self.processes.procs if n.startswith(f"agent-{host}-")]
        agent = self.processes.procs.pop(name)
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()

    @contextlib.contextmanager
    def paused_agent(self, host: str) -> Iterator[None]:
        """SIGSTOP the host's agent for the block: drift made in it stays until it resumes,
        so that a test can see its own change before the agent repairs it."""
        (agent,) = [p for n, p in self.processes.procs.items() if n.startswith(f"agent-{host}-")]
        os.killpg(agent.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.killpg(agent.pid, signal.SIGCONT)

    async def state(self, kind: str, id_: str) -> dict[str, Any] | None:
        raw = await self.pg.fetchval(
            "SELECT state FROM entities WHERE kind = $1 AND id = $2", kind, id_)
        return None if raw is None else msgspec.json.decode(raw)

    async def converged(self) -> bool:
        """Every live instance and every network applied at its newest generation."""
        rows = await self.pg.fetch("SELECT kind, state FROM entities"
                                   " WHERE kind IN ('instance', 'network')")
        for row in rows:
            s = msgspec.json.decode(row["state"])
            if row["kind"] == "instance":
                if s["status"] == "pending" or (
                        s["host"] and s["observed_generation"] != s["generation"]):
                    return False
            elif any(h["observed_generation"] != s["generation"] for h in s["hosts"].values()):
                return False
        return True

    async def settle(self, timeout: float = 60) -> None:
        """Everything sent so far is folded, and applied where it had to be."""
        self.processes.check()

        async def done() -> bool:
            return await settled(self.pg, self.js) and await self.converged()

        await eventually(done, timeout=timeout, interval=0.1)

    async def guest(self, id_: str) -> "Guest":
        s = await self.state("instance", id_)
        assert s is not None and s["host"], s
        h = self.fabric[s["host"]]
        return Guest(id_, s["host"], guest_netns(guest_base(h.netns, s["host"]), id_),
                     s["nics"][0]["ip"], s["nics"][0]["mac"])


@dataclass(frozen=True)
class Guest:
    id: str
    host: str
    netns: str
    ip: str
    mac: str


def tcp(src: Guest, dst_ip: str, port: int = SERVICE, timeout_s: float = 1.0,
        source: str | None = None) -> str | None:
    """The answer of dst_ip:port to a connection from src, or None if nothing answers."""
    try:
        return Fabric.tcp(src.netns, dst_ip, port, timeout_s=timeout_s, source=source).strip()
    except OSError:
        return None


def ping(src: Guest, dst_ip: str) -> bool:
    return subprocess.run(["ip", "netns", "exec", src.netns, "ping", "-n", "-q", "-c1", "-W1",
                           dst_ip], capture_output=True).returncode == 0


def ip(netns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True,
                          text=True).stdout


def flood_entries(netns: str, vni: int) -> list[str]:
    """The VTEPs a host floods the segment's broadcasts to (all-zero MAC entries)."""
    try:
        out = subprocess.run(["bridge", "-n", netns, "fdb", "show", "dev",
                              names.vxlan_name(vni)], check=True, capture_output=True,
                             text=True).stdout
    except subprocess.CalledProcessError:
        return []  # no such device: the host has no segment of that network
    return sorted(line.split(" dst ")[1].split()[0] for line in out.splitlines()
                  if line.startswith("00:00:00:00:00:00") and " dst " in line)


def link_indexes(netns: str) -> dict[str, int]:
    links = json.loads(ip(netns, "-j", "link", "show"))
    return {link["ifname"]: link["ifindex"] for link in links}


@pytest.fixture(scope="module")
def fabric() -> Iterator[Fabric]:
    with Fabric(3) as made:
        yield made


@pytest.fixture(scope="module")
async def cloud(postgres: PostgresServer, fabric: Fabric,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cloud]:
    async with open_cloud(postgres, fabric, tmp_path_factory.mktemp("networks")) as world:
        yield world


@contextlib.asynccontextmanager
async def open_cloud(postgres: PostgresServer, fabric: Fabric, root: Path,
                     *replica_args: str,
                     cloud_type: Callable[..., Cloud] = Cloud) -> AsyncIterator[Cloud]:
    """nats-server, PostgreSQL, a replica (with ``replica_args``) and an agent per host of
    ``fabric`` (``cloud_type``'s `agent`: a subclass may start other agents), every host
    registered and its underlay known; all stopped on exit."""
    async with isolated(postgres, NatsServer(root / "nats"), root) as env:
        processes = Processes(root, dict(os.environ))
        nc = await connect(env.nats_url, "test")
        pg = None
        try:
            js = nc.jetstream()
            await ensure_topology(js, PARTITIONS)
            processes.orch("orchestrator", "--id", "r1", "--deadline", "3600", *replica_args,
                           env=env.environ(), name="r1")
            pg = await eventually(lambda: _connect(env.pg_dsn))
            world = cloud_type(fabric, env, processes, js, pg, Publisher(js),
                               itertools.count())
            for h in fabric.hosts:
                await world.send("admin", type="RegisterHost", id=h.name, vcpus=64,
                                 memory_mib=1 << 16)
                world.agent(h.name)
            await eventually(lambda: _underlays_known(pg, len(fabric.hosts)), timeout=60)
            yield world
        finally:
            processes.stop(grace_s=10.0)
            if pg is not None:
                await pg.close()
            await nc.close()


async def _connect(dsn: str) -> asyncpg.Connection | None:
    with contextlib.suppress(OSError, asyncpg.PostgresError):
        conn = await connect_pg(dsn)
        try:
            await conn.fetchval("SELECT count(*) FROM entities")
            return conn
        except asyncpg.PostgresError:
            await conn.close()
    return None


async def _underlays_known(pg: asyncpg.Connection, hosts: int) -> bool:
    return await pg.fetchval("SELECT count(*) FROM entities WHERE kind = 'host'"
                             " AND state->>'underlay' IS NOT NULL") == hosts


@pytest.fixture(scope="module")
async def guests(cloud: Cloud) -> dict[str, list[Guest]]:
    """30 guests placed by the scheduler: 15 on each of two networks with one CIDR."""
    await cloud.send("user", type="CreateNetwork", id="a", vni=VNI_A, cidr=CIDR)
    await cloud.send("user", type="CreateNetwork", id="b", vni=VNI_B, cidr=CIDR)
    for i in range(30):
        net = "ab"[i % 2]
        await cloud.send("user", type="CreateInstance", id=f"{net}{i // 2}", template=dict(
            vcpus=1, memory_mib=64, image="tiny", nics=[dict(network=net)],
            rules=OPEN_RULES))
    await cloud.settle(timeout=120)
    found = {net: [await cloud.guest(f"{net}{k}") for k in range(15)] for net in "ab"}
    assert {g.host for g in found["a"]} == {"h1", "h2", "h3"}
    return found


async def test_every_pair_on_a_network_pings_and_connects_across_hosts(
        guests: dict[str, list[Guest]]) -> None:
    for net, members in guests.items():
        for src, dst in itertools.combinations(members, 2):
            assert ping(src, dst.ip), f"{src.id}@{src.host} -> {dst.id}@{dst.host} ({net})"
            # The answer says who answered: the guest of this network at that address.
            assert tcp(src, dst.ip) == dst.id, (src, dst)
            assert Fabric.udp(dst.netns, src.ip, SERVICE).strip() == src.id


async def test_nothing_crosses_between_networks_with_the_same_addresses(
        cloud: Cloud, guests: dict[str, list[Guest]]) -> None:
    # The same addresses exist on both networks, and each answer came from its own one
    # (above). An address only b has is unreachable from a, on every host.
    await cloud.send("user", type="CreateInstance", id="only-b", template=dict(
        vcpus=1, memory_mib=64, image="tiny", nics=[dict(network="b", ip="10.50.0.200")],
        rules=OPEN_RULES))
    await cloud.settle()
    only_b = await cloud.guest("only-b")
    assert tcp(guests["b"][0], only_b.ip) == "only-b"
    for src in guests["a"][:3]:
        assert not ping(src, only_b.ip)
        assert tcp(src, only_b.ip) is None


def _frame(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, payload: bytes) -> bytes:
    """An Ethernet frame carrying one UDP datagram to the port the guests allow (UDP
    checksum 0: none)."""
    udp = struct.pack("!HHHH", 40000, SERVICE, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                         socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    checksum = sum(struct.unpack("!10H", header))
    checksum = (checksum & 0xFFFF) + (checksum >> 16)
    header = header[:10] + struct.pack("!H", ~checksum & 0xFFFF) + header[12:]
    return (bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", ""))
            + b"\x08\x00" + header + udp)


def arrives(src: Guest, dst: Guest, src_mac: str, src_ip: str) -> bool:
    """Whether a frame sent from src's NIC, claiming src_mac and src_ip, reaches dst's NIC.

    Raw frames on both ends: what the guest's own stack or addresses are plays no part.
    """
    marker = os.urandom(8).hex().encode()
    with netns_socket(dst.netns, socket.AF_PACKET, socket.SOCK_RAW,
                      socket.htons(0x0003)) as listen, \
            netns_socket(src.netns, socket.AF_PACKET, socket.SOCK_RAW) as send:
        listen.bind(("eth0", 0))
        send.bind(("eth0", 0))
        send.send(_frame(src_mac, dst.mac, src_ip, dst.ip, marker))
        deadline = time.monotonic() + 1.0
        while (left := deadline - time.monotonic()) > 0:
            listen.settimeout(left)
            try:
                if marker in listen.recv(65536):
                    return True
            except TimeoutError:
                break
    return False


async def test_a_guest_sending_with_a_spoofed_address_gets_nothing_through(
        guests: dict[str, list[Guest]]) -> None:
    src, dst = next((s, d) for s, d in itertools.product(guests["a"], guests["a"])
                    if s.host != d.host)
    assert arrives(src, dst, src.mac, src.ip)  # the control: its own addresses pass
    assert not arrives(src, dst, src.mac, "10.50.0.222")  # another IP
    assert not arrives(src, dst, "02:00:00:00:be:ef", src.ip)  # another MAC
    other = guests["a"][-1]
    assert not arrives(src, dst, other.mac, other.ip)  # another guest's, both


class EchoServer:
    """A TCP echo server in a guest's namespace, on a port of the test's own choosing."""

    def __init__(self, guest: Guest, port: int) -> None:
        code = (f"import socket\ns=socket.create_server(('0.0.0.0',{port}))\n"
                "while True:\n c,_=s.accept()\n"
                " while (d:=c.recv(100)): c.sendall(d)\n")
        self.proc = subprocess.Popen(["ip", "netns", "exec", guest.netns, sys.executable,
                                      "-c", code], start_new_session=True)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def echoes(sock: socket.socket, payload: bytes) -> bool:
    try:
        sock.sendall(payload)
        return sock.recv(100) == payload
    except OSError:
        return False


async def test_rules_open_a_port_to_one_source_and_a_removed_rule_cuts_its_connections(
        cloud: Cloud, guests: dict[str, list[Guest]]) -> None:
    target, allowed, other = guests["a"][12], guests["a"][13], guests["a"][14]
    echo = EchoServer(target, 9000)
    try:
        rules = [{"protocol": "tcp", "port": SERVICE, "source": f"{allowed.ip}/32"},
                 {"protocol": "tcp", "port": 9000, "source": f"{allowed.ip}/32"}]
        await cloud.send("user", type="SetRules", id=target.id, rules=rules)
        await cloud.settle()
        assert tcp(allowed, target.ip) == target.id
        assert tcp(other, target.ip) is None
        with netns_socket(allowed.netns, socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(2.0)
            await eventually(lambda: asyncio.to_thread(_connects, sock, target.ip, 9000))
            assert echoes(sock, b"one")
            # Another rule changes: the established connection goes on.
            await cloud.send("user", type="SetRules", id=target.id, rules=rules[1:])
            await cloud.settle()
            assert tcp(allowed, target.ip) is None
            assert echoes(sock, b"two")
            # Its own rule goes: the connection is cut.
            await cloud.send("user", type="SetRules", id=target.id, rules=[])
            await cloud.settle()
            sock.settimeout(1.0)
            assert not echoes(sock, b"three")
    finally:
        echo.stop()
        await cloud.send("user", type="SetRules", id=target.id, rules=OPEN_RULES)
        await cloud.settle()


def _connects(sock: socket.socket, address: str, port: int) -> bool:
    try:
        sock.connect((address, port))
        return True
    except ConnectionRefusedError:  # the echo server is not listening yet
        return False


async def test_the_first_and_last_port_on_a_host_add_and_remove_its_flood_entries(
        cloud: Cloud, guests: dict[str, list[Guest]]) -> None:
    # Network a spans every host: each floods to exactly the two others.
    for h in cloud.fabric.hosts:
        others = sorted(o.underlay_ip for o in cloud.fabric.hosts if o is not h)
        assert flood_entries(h.netns, VNI_A) == others
    await cloud.send("user", type="CreateNetwork", id="c", vni=300, cidr="10.60.0.0/24")
    rules = [{"protocol": "tcp", "port": SERVICE, "source": "10.60.0.0/24"}]
    made: list[Guest] = []
    while len({g.host for g in made}) < 2:  # the scheduler spreads: two hosts soon
        await cloud.send("user", type="CreateInstance", id=f"c{len(made)}", template=dict(
            vcpus=1, memory_mib=64, image="tiny", nics=[dict(network="c")], rules=rules))
        await cloud.settle()
        made.append(await cloud.guest(f"c{len(made)}"))
    last = made[-1]  # the only port of c on its host
    spanned = {g.host for g in made}
    for h in cloud.fabric.hosts:
        others = sorted(cloud.fabric[o].underlay_ip for o in spanned - {h.name})
        assert flood_entries(h.netns, 300) == (others if h.name in spanned else [])
    assert tcp(made[0], last.ip) == last.id
    freed = last.ip
    await cloud.send("user", type="DeleteInstance", id=last.id)
    await cloud.settle()
    gone = cloud.fabric[last.host]
    assert names.bridge_name(300) not in link_indexes(gone.netns)
    assert names.vxlan_name(300) not in link_indexes(gone.netns)
    for h in cloud.fabric.hosts:
        assert gone.underlay_ip not in flood_entries(h.netns, 300)
    # Its address is given to the next instance that asks for one.
    await cloud.send("user", type="CreateInstance", id="c-next", template=dict(
        vcpus=1, memory_mib=64, image="tiny", nics=[dict(network="c")], rules=rules))
    await cloud.settle()
    reused = await cloud.guest("c-next")
    assert reused.ip == freed
    # made[0] talked to the old holder: its host announced the new MAC as it applied the
    # jobs, so made[0] reaches the new holder now, not once its ARP entry times out.
    assert reused.mac in ip(made[0].netns, "neigh", "show", freed)
    assert tcp(made[0], freed) == "c-next"


async def test_an_agent_sigkilled_and_restarted_disrupts_nothing(
        cloud: Cloud, guests: dict[str, list[Guest]]) -> None:
    src, dst = next((s, d) for s, d in itertools.product(guests["a"], guests["a"])
                    if s.host == "h1" and d.host == "h2")
    before = link_indexes(cloud.fabric["h2"].netns)
    pinger = subprocess.Popen(["ip", "netns", "exec", src.netns, "ping", "-n", "-q",
                               "-i", "0.01", "-c", "400", "-W", "1", dst.ip],
                              stdout=subprocess.PIPE, text=True)
    await asyncio.sleep(0.5)
    cloud.kill_agent("h2")
    cloud.agent("h2")
    out, _ = await asyncio.to_thread(pinger.communicate, timeout=60)
    assert " 0% packet loss" in out, out
    await cloud.settle()
    await asyncio.sleep(RESYNC_S * 1.5)  # and a resync of the new agent on top
    assert link_indexes(cloud.fabric["h2"].netns) == before  # nothing deleted and recreated


async def test_an_agent_restarted_after_its_segments_were_deleted_restores_them(
        cloud: Cloud, guests: dict[str, list[Guest]]) -> None:
    host = cloud.fabric["h3"]
    src = next(g for g in guests["a"] if g.host == "h1")
    dst = next(g for g in guests["a"] if g.host == "h3")
    cloud.kill_agent("h3")
    for vni in (VNI_A, VNI_B):
        ip(host.netns, "link", "del", names.vxlan_name(vni))
        ip(host.netns, "link", "del", names.bridge_name(vni))
    assert tcp(src, dst.ip) is None
    cloud.agent("h3")
    await eventually(lambda: asyncio.to_thread(tcp, src, dst.ip), timeout=30)
    assert tcp(src, dst.ip) == dst.id


async def test_drift_is_repaired_within_the_resync_interval(
        cloud: Cloud, guests: dict[str, list[Guest]]) -> None:
    host = cloud.fabric["h1"]
    remote = next(g for g in guests["a"] if g.host != "h1")
    vtep = cloud.fabric[remote.host].underlay_ip
    vxlan = names.vxlan_name(VNI_A)

    def fdb_has_remote() -> bool:
        out = subprocess.run(["bridge", "-n", host.netns, "fdb", "show", "dev", vxlan],
                             capture_output=True, text=True).stdout
        return any(line.startswith(remote.mac) and f"dst {vtep}" in line
                   for line in out.splitlines())

    assert fdb_has_remote()
    with cloud.paused_agent("h1"):  # a resync in between would repair it before we look
        subprocess.run(["bridge", "-n", host.netns, "fdb", "del", remote.mac, "dev", vxlan,
                        "dst", vtep], check=True)
        assert not fdb_has_remote()
    await eventually(lambda: asyncio.to_thread(fdb_has_remote), timeout=RESYNC_S * 4)

    def rules_of(table: str) -> str:
        return subprocess.run(["ip", "netns", "exec", host.netns, "nft", "list", "table",
                               *table.split()], capture_output=True, text=True).stdout

    whole = rules_of(f"bridge {names.PORTS_TABLE}")
    with cloud.paused_agent("h1"):
        subprocess.run(["ip", "netns", "exec", host.netns, "nft", "flush", "table", "bridge",
                        names.PORTS_TABLE], check=True)
        assert rules_of(f"bridge {names.PORTS_TABLE}").count("ether saddr") == 0
    await eventually(lambda: asyncio.to_thread(
        lambda: rules_of(f"bridge {names.PORTS_TABLE}").count("ether saddr")
        == whole.count("ether saddr")), timeout=RESYNC_S * 4)

    stray = names.bridge_name(4242)
    ip(host.netns, "link", "add", stray, "type", "bridge")
    await eventually(lambda: asyncio.to_thread(
        lambda: stray not in link_indexes(host.netns)), timeout=RESYNC_S * 4)


async def test_replay_reproduces_the_projection(cloud: Cloud,
                                                guests: dict[str, list[Guest]]) -> None:
    await cloud.settle()
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "orchestrator.cli", "replay", "--verify"],
        env=cloud.env.environ(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
