"""The namespace guest driver: real namespaces, veths, addresses and a service, no VM.

Until `agents.net.ports` lands, the ports are attached by `BridgePorts` below: a real
bridge `obr<vni>` in the host's namespace and a real `ip link set master` (no firewall).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from agents import guest_service
from agents.drivers.errors import PermanentDriverError
from agents.drivers.netns_guest import (
    ALIAS_TAG,
    NetnsGuestDriver,
    guest_netns,
    port_name,
)
from schemas.specs import InstanceSpec, InstanceTemplate, Nic, NicSpec, SecurityRule
from tests.fabric import GUEST_RUN_DIR, Fabric, FabricHost, _alive, netns_socket, unavailable

VNI = 100
SUBNET = "192.168.77"
PORT = guest_service.PORT


@pytest.fixture(scope="module", autouse=True)
def namespaces_available() -> None:
    reason = unavailable()
    if reason:
        pytest.skip(reason)


class BridgePorts:
    """Attaches a port to the segment bridge `obr<vni>` of its host and brings it up (test
    plumbing: no firewall)."""

    def __init__(self, fabric: Fabric, host: FabricHost) -> None:
        self.fabric, self.host = fabric, host
        self.plugged: list[str] = []
        self.unplugged: list[str] = []

    def plug(self, port: str, nic: NicSpec, rules: tuple[SecurityRule, ...]) -> None:
        self.fabric.exec(self.host.netns, "ip", "link", "set", port, "master", f"obr{nic.vni}",
                         "up")
        self.plugged.append(port)

    def unplug(self, port: str) -> None:
        self.unplugged.append(port)


@pytest.fixture
def fabric() -> Iterator[Fabric]:
    with Fabric(2) as fab:
        for host in fab.hosts:  # the segment's bridge, as the network driver would make it
            fab.exec(host.netns, "ip", "link", "add", f"obr{VNI}", "type", "bridge")
            fab.exec(host.netns, "sysctl", "-qw", f"net.ipv6.conf.obr{VNI}.disable_ipv6=1")
            fab.exec(host.netns, "ip", "link", "set", f"obr{VNI}", "up")
        yield fab
    services = [int(p.read_text()) for p in GUEST_RUN_DIR.glob(f"{fab.prefix}-*/service.pid")]
    assert fab.namespaces() == [] and fab.processes() == {}
    assert not any(_alive(pid) for pid in services)
    assert list(GUEST_RUN_DIR.glob(f"{fab.prefix}-*")) == []


def driver(fabric: Fabric, name: str = "h1") -> NetnsGuestDriver:
    host = fabric.host(name)
    return NetnsGuestDriver(host.netns, host.name, host.underlay_ip,
                            ports=BridgePorts(fabric, host))


def spec(n: int, power: str = "running", *, host: str = "h1", nics: int = 1,
         mac: str | None = None, ip: str | None = None) -> InstanceSpec:
    resolved = tuple(
        NicSpec(network="net-1", vni=VNI, mac=mac or f"02:00:00:00:{i:02x}:{n:02x}",
                ip=(ip or f"{SUBNET}.{n}") if i == 0 else f"192.168.{78 + i}.{n}",
                prefix=24)
        for i in range(nics))
    template = InstanceTemplate(vcpus=1, memory_mib=64, image="tiny",
                                nics=tuple(Nic(network="net-1") for _ in range(nics)))
    return InstanceSpec(template=template, power=power, host=host,  # type: ignore[arg-type]
                        nics=resolved)


def ip_of(n: int) -> str:
    return f"{SUBNET}.{n}"


def snapshot(fabric: Fabric, drv: NetnsGuestDriver, instance_id: str) -> dict[str, object]:
    """What must not change when nothing should: link indexes, the namespace, the service."""
    host = next(h for h in fabric.hosts if h.name == drv.host)
    name = drv.netns_name(instance_id)
    host_links = fabric.exec(host.netns, "ip", "-o", "link", "show",
                             port_name(instance_id, 0)).stdout.split(":")[0]
    guest_links = fabric.exec(name, "ip", "-o", "link", "show", "eth0").stdout.split(":")[0]
    addrs = fabric.exec(name, "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout.split()
    return {"netns": os.stat(f"/run/netns/{name}").st_ino, "host_link": host_links,
            "guest_link": guest_links, "addr": addrs[3], "service": drv.service_pid()}


def test_two_guests_ping_each_other_and_answer_with_their_id(fabric: Fabric) -> None:
    drv = driver(fabric)
    started = time.perf_counter()
    assert drv.apply("a", spec(2), 1) == "running"
    first = time.perf_counter() - started
    started = time.perf_counter()
    assert drv.apply("b", spec(3), 1) == "running"
    second = time.perf_counter() - started
    a, b = drv.netns_name("a"), drv.netns_name("b")
    assert a == f"{fabric.host('h1').netns}.a"
    assert drv.observe() == {"a": "running", "b": "running"}
    assert drv.generations() == {"a": 1, "b": 1}

    assert fabric.ping(a, ip_of(3)) and fabric.ping(b, ip_of(2))
    assert fabric.tcp(a, ip_of(3), PORT) == "b\n"
    assert fabric.tcp(b, ip_of(2), PORT) == "a\n"
    assert fabric.udp(a, ip_of(3), PORT) == "b\n"
    assert fabric.udp(b, ip_of(2), PORT) == "a\n"
    http = fabric.tcp(a, ip_of(3), PORT, b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
    assert http.startswith("HTTP/1.0 200 OK\r\n") and http.endswith("\r\n\r\nb\n")
    # A client that sends nothing and keeps its side open is answered all the same.
    with _raw_tcp(a, ip_of(3)) as sock:
        assert sock.recv(100) == b"b\n"

    # The guest as the fold made it: its MAC, address, MTU, an IPv4-only namespace.
    link = fabric.exec(a, "ip", "-o", "link", "show", "eth0").stdout
    assert "link/ether 02:00:00:00:00:02" in link and "mtu 1500" in link and "UP" in link
    assert fabric.exec(a, "ip", "-4", "-o", "addr", "show", "eth0").stdout.split()[3] \
        == f"{ip_of(2)}/24"
    assert fabric.exec(a, "sysctl", "-n", "net.ipv6.conf.eth0.disable_ipv6").stdout == "1\n"
    host_port = fabric.exec(fabric.host("h1").netns, "ip", "-o", "link", "show",
                            port_name("a", 0)).stdout
    assert f"master obr{VNI}" in host_port
    assert ALIAS_TAG in fabric.exec(a, "ip", "-o", "link", "show", "lo").stdout
    # One service serves both, living in the host's namespace, not a child of this process.
    pid = drv.service_pid()
    assert pid is not None and fabric.processes() == {pid: fabric.host("h1").netns}
    assert os.getsid(pid) == pid and os.getppid() != pid
    rss_kib = int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text()
                       .splitlines() if line.startswith("VmRSS:")))
    print(f"\nguest create: first (service start) {first * 1000:.0f} ms, "
          f"second {second * 1000:.0f} ms; service RSS {rss_kib / 1024:.1f} MiB")


def _raw_tcp(netns: str, address: str) -> socket.socket:
    sock = netns_socket(netns, socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(2)
    sock.connect((address, PORT))
    return sock


def test_guests_of_another_host_are_separate(fabric: Fabric) -> None:
    one, two = driver(fabric, "h1"), driver(fabric, "h2")
    assert one.apply("a", spec(2), 1) == "running"
    assert two.apply("c", spec(4, host="h2"), 1) == "running"
    assert one.observe() == {"a": "running"} and two.observe() == {"c": "running"}
    assert one.service_pid() != two.service_pid()
    # No VXLAN between the hosts here: their segment bridges are not connected.
    assert not fabric.ping(one.netns_name("a"), ip_of(4))
    assert two.remove("a") is False  # another host's guest is never touched
    assert one.observe() == {"a": "running"}


def test_applying_the_same_spec_again_changes_nothing(fabric: Fabric) -> None:
    drv = driver(fabric)
    drv.apply("a", spec(2), 1)
    drv.apply("b", spec(3), 1)
    before = snapshot(fabric, drv, "a")
    time.sleep(1.1)  # the kernel reports operstate changes up to 1 s late (linkwatch)
    # Every netlink change in the host's and the guest's namespace is printed by a monitor.
    monitors = [subprocess.Popen(["ip", "-n", ns, "monitor", "link", "address", "neigh"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                for ns in (fabric.host("h1").netns, drv.netns_name("a"))]
    times = []
    try:
        time.sleep(0.3)  # the monitors are listening
        for _ in range(3):
            started = time.perf_counter()
            assert drv.apply("a", spec(2), 1) == "running"
            times.append(time.perf_counter() - started)
        time.sleep(0.3)
    finally:
        for monitor in monitors:
            monitor.terminate()
    assert [_events(m.communicate()[0]) for m in monitors] == [[], []]
    assert snapshot(fabric, drv, "a") == before
    # A newer generation of the same spec: recorded, nothing else touched.
    assert drv.apply("a", spec(2), 2) == "running"
    assert snapshot(fabric, drv, "a") == before and drv.generations()["a"] == 2
    # A stale job (older generation) changes nothing, even when it says otherwise.
    assert drv.apply("a", spec(2, "stopped"), 1) == "running"
    assert drv.apply("a", None, 1) == "running"
    assert snapshot(fabric, drv, "a") == before and drv.generations()["a"] == 2
    assert fabric.tcp(drv.netns_name("b"), ip_of(2), PORT) == "a\n"
    print(f"\nno-op apply: {statistics.median(times) * 1000:.0f} ms")


def _events(output: bytes) -> list[str]:
    """`ip monitor`'s output, one string per event (continuation lines are indented)."""
    events: list[str] = []
    for line in output.decode().splitlines():
        if line.startswith((" ", "\t")) and events:
            events[-1] += "\n" + line
        else:
            events.append(line)
    return events


AGENT = """
import subprocess, sys, time
from agents.drivers.netns_guest import NetnsGuestDriver
from schemas.specs import InstanceSpec
import msgspec

class Ports:
    def plug(self, port, nic, rules):
        subprocess.run(["ip", "-n", sys.argv[1], "link", "set", port, "master",
                        f"obr{nic.vni}", "up"], check=True)
    def unplug(self, port):
        pass

drv = NetnsGuestDriver(sys.argv[1], sys.argv[2], sys.argv[3], ports=Ports())
for instance_id, generation, spec in msgspec.json.decode(sys.argv[4]):
    drv.apply(instance_id, msgspec.convert(spec, InstanceSpec), generation)
print("applied", flush=True)
time.sleep(600)
"""


def test_a_restarted_agent_adopts_its_guests_without_disturbing_them(fabric: Fabric) -> None:
    # The first agent is a process of its own, SIGKILLed with its whole process group.
    host = fabric.host("h1")
    jobs = msgspec.json.encode([("a", 4, spec(2)), ("b", 7, spec(3))]).decode()
    agent = subprocess.Popen([sys.executable, "-c", AGENT, host.netns, host.name,
                              host.underlay_ip, jobs], stdout=subprocess.PIPE,
                             start_new_session=True, cwd=Path(__file__).parent.parent)
    try:
        assert agent.stdout is not None and agent.stdout.readline() == b"applied\n"
    finally:
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()
    first = driver(fabric)
    assert first.service_pid() is not None  # the service outlived its agent
    before = snapshot(fabric, first, "a")

    answers: list[str] = []
    stop = threading.Event()

    def probe() -> None:  # b asks a all along
        while not stop.is_set():
            try:
                answers.append(fabric.tcp(f"{fabric.host('h1').netns}.b", ip_of(2), PORT,
                                          timeout_s=1))
            except OSError as exc:
                answers.append(repr(exc))
            time.sleep(0.01)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        time.sleep(0.1)
        second = driver(fabric)
        assert second.generations() == {"a": 4, "b": 7}
        assert second.observe() == {"a": "running", "b": "running"}
        assert second.apply("a", spec(2), 4) == "running"
        assert second.apply("b", spec(3), 7) == "running"
        time.sleep(0.1)
    finally:
        stop.set()
        prober.join()
    assert snapshot(fabric, second, "a") == before
    assert len(answers) > 5 and set(answers) == {"a\n"}


def test_stop_and_start(fabric: Fabric) -> None:
    drv = driver(fabric)
    drv.apply("a", spec(2), 1)
    drv.apply("b", spec(3), 1)
    a, b = drv.netns_name("a"), drv.netns_name("b")
    before = snapshot(fabric, drv, "a")
    assert drv.apply("a", spec(2, "stopped"), 2) == "stopped"
    assert drv.observe() == {"a": "stopped", "b": "running"}
    assert "state DOWN" in fabric.exec(a, "ip", "-o", "link", "show", "eth0").stdout
    host_port = fabric.exec(fabric.host("h1").netns, "ip", "-o", "link", "show",
                            port_name("a", 0)).stdout
    assert "NO-CARRIER" in host_port and "LOWER_UP" not in host_port
    assert not fabric.ping(b, ip_of(2))
    with pytest.raises(OSError):
        fabric.tcp(b, ip_of(2), PORT, timeout_s=0.5)
    assert drv.apply("a", spec(2, "stopped"), 2) == "stopped"  # idempotent too

    assert drv.apply("a", spec(2), 3) == "running"
    assert drv.observe() == {"a": "running", "b": "running"}
    fabric.wait_ping(b, ip_of(2))
    assert fabric.tcp(b, ip_of(2), PORT) == "a\n"
    assert fabric.udp(b, ip_of(2), PORT) == "a\n"
    after = snapshot(fabric, drv, "a")
    assert after == before  # the same links, brought down and up again


def test_remove_cleans_everything(fabric: Fabric) -> None:
    drv = driver(fabric)
    ports = drv.ports
    assert isinstance(ports, BridgePorts)
    drv.apply("a", spec(2, nics=2), 1)
    drv.apply("b", spec(3), 1)
    host = fabric.host("h1")
    assert {port_name("a", 0), port_name("a", 1)} <= set(fabric.links(host.netns))
    assert drv.remove("a") is True
    assert drv.netns_name("a") not in fabric.namespaces()
    assert not {port_name("a", 0), port_name("a", 1)} & set(fabric.links(host.netns))
    assert sorted(ports.unplugged) == sorted([port_name("a", 0), port_name("a", 1)])
    assert not (drv.records / "a").exists()
    assert drv.observe() == {"b": "running"} and drv.generations() == {"b": 1}
    assert drv.remove("a") is False
    assert drv.apply("a", None, 2) == "absent"
    # Through a removal job (spec None) too; the service stays for the host's next guest.
    assert drv.apply("b", None, 2) == "absent"
    assert drv.observe() == {}
    assert fabric.links(host.netns) == ["lo", "ul0", f"obr{VNI}"]
    assert fabric.namespaces() == sorted([fabric.fabric_netns, *(h.netns for h in
                                                                 fabric.hosts)])
    assert drv.service_pid() is not None


def test_a_changed_spec_converges_in_place(fabric: Fabric) -> None:
    drv = driver(fabric)
    drv.apply("a", spec(2, nics=2), 1)
    drv.apply("b", spec(3), 1)
    a = drv.netns_name("a")
    before = snapshot(fabric, drv, "a")
    # New address and MAC on eth0, the second NIC gone, a new MTU.
    changed = spec(9, nics=1, mac="02:00:00:00:aa:09")
    assert drv.apply("a", changed, 2) == "running"
    after = snapshot(fabric, drv, "a")
    assert after["addr"] == f"{ip_of(9)}/24"
    assert {k: v for k, v in after.items() if k != "addr"} == \
        {k: v for k, v in before.items() if k != "addr"}
    assert "02:00:00:00:aa:09" in fabric.exec(a, "ip", "-o", "link", "show", "eth0").stdout
    assert "eth1" not in fabric.links(a)
    assert port_name("a", 1) not in fabric.links(fabric.host("h1").netns)
    assert fabric.tcp(drv.netns_name("b"), ip_of(9), PORT) == "a\n"


def test_the_service_comes_back_after_it_died(fabric: Fabric) -> None:
    drv = driver(fabric)
    drv.apply("a", spec(2), 1)
    drv.apply("b", spec(3), 1)
    old = drv.service_pid()
    drv.stop_service()
    assert drv.service_pid() is None
    assert drv.observe() == {"a": "stopped", "b": "stopped"}  # honest: nobody answers
    assert drv.apply("a", spec(2), 1) == "running"  # resync's apply repairs it
    assert drv.service_pid() not in (None, old)
    # The new service read every record: b answers again too.
    assert drv.observe() == {"a": "running", "b": "running"}
    assert fabric.tcp(drv.netns_name("a"), ip_of(3), PORT) == "b\n"


def test_a_namespace_of_another_guest_is_not_taken(fabric: Fabric) -> None:
    mine, other = driver(fabric), NetnsGuestDriver(fabric.host("h1").netns, "elsewhere", "")
    name = mine.netns_name("a")
    assert other.netns_name("a") == name  # same prefix: only the alias tells them apart
    mine.apply("a", spec(2), 1)
    with pytest.raises(PermanentDriverError, match="belongs to a on h1"):
        other.apply("a", spec(2), 5)
    assert other.observe() == {} and other.remove("a") is False
    assert mine.generations() == {"a": 1}


def test_long_ids_get_a_bounded_namespace_name() -> None:
    long_id = "x" * 63
    name = guest_netns("ofabcdef-h1", long_id)
    assert name.startswith("ofabcdef-h1.") and len(name) <= 80
    assert name != guest_netns("ofabcdef-h1", "x" * 62 + "y")


def test_tcp_answer_plain_or_http() -> None:
    assert guest_service.answer("g-1", b"") == b"g-1\n"
    assert guest_service.answer("g-1", b"hello") == b"g-1\n"
    http = guest_service.answer("g-1", b"GET /health HTTP/1.1\r\n\r\n")
    assert http.startswith(b"HTTP/1.0 200 OK\r\n") and http.endswith(b"\r\n\r\ng-1\n")
    assert b"Content-Length: 4\r\n" in http
    assert guest_service.answer("g-1", b"HEAD / HTTP/1.0\r\n\r\n").endswith(b"\r\n\r\n")


def test_ten_guests_create_time_and_service_memory(fabric: Fabric) -> None:
    drv = driver(fabric)
    drv.apply("g-1", spec(10), 1)  # the service starts with the first
    times = []
    for n in range(11, 21):
        started = time.perf_counter()
        assert drv.apply(f"g-{n - 10}x", spec(n), 1) == "running"
        times.append(time.perf_counter() - started)
    observed = drv.observe()
    assert len(observed) == 11 and set(observed.values()) == {"running"}
    src = drv.netns_name("g-1")
    assert all(fabric.tcp(src, ip_of(n), PORT) == f"g-{n - 10}x\n" for n in range(11, 21))
    pid = drv.service_pid()
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    rss_kib = int(next(line.split()[1] for line in status if line.startswith("VmRSS:")))
    started = time.perf_counter()
    for n in range(11, 21):
        drv.remove(f"g-{n - 10}x")
    removal = (time.perf_counter() - started) / 10
    print(f"\n10 guests: create p50 {statistics.median(times) * 1000:.0f} ms, max "
          f"{max(times) * 1000:.0f} ms; remove {removal * 1000:.0f} ms each; service RSS "
          f"with 11 guests {rss_kib / 1024:.1f} MiB")
    assert subprocess.run(["ip", "netns", "list"], capture_output=True,
                          text=True).stdout.count(drv.base + ".") == 1


def test_guests_applied_concurrently(fabric: Fabric) -> None:
    """The agent applies up to 8 jobs at once, each in its own thread: namespaces entered
    by one thread must not leak into another's calls."""
    drv = driver(fabric)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda n: drv.apply(f"c-{n}", spec(n), 1), range(2, 18)))
    assert results == ["running"] * 16
    assert drv.observe() == {f"c-{n}": "running" for n in range(2, 18)}
    assert fabric.tcp(drv.netns_name("c-2"), ip_of(17), PORT) == "c-17\n"
    assert fabric.udp(drv.netns_name("c-17"), ip_of(2), PORT) == "c-2\n"
    # Nothing was made in the wrong namespace: the ports are all on the host, none in root.
    host_links = set(fabric.links(fabric.host("h1").netns))
    assert {port_name(f"c-{n}", 0) for n in range(2, 18)} <= host_links
    assert not any(link.startswith("ot") for link in fabric.root_links() + _root_links())
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(lambda n: drv.remove(f"c-{n}"), range(2, 18)))
    assert drv.observe() == {}


def _root_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


def test_a_port_deleted_by_hand_comes_back(fabric: Fabric) -> None:
    drv = driver(fabric)
    drv.apply("a", spec(2), 1)
    drv.apply("b", spec(3), 1)
    fabric.exec(fabric.host("h1").netns, "ip", "link", "del", port_name("a", 0))
    assert "eth0" not in fabric.links(drv.netns_name("a"))  # a veth dies as a pair
    assert drv.observe()["a"] == "stopped"
    assert drv.apply("a", spec(2), 1) == "running"  # what a resync does
    fabric.wait_ping(drv.netns_name("b"), ip_of(2))
    assert fabric.tcp(drv.netns_name("b"), ip_of(2), PORT) == "a\n"


def test_guests_plugged_by_the_network_plumbing(fabric: Fabric) -> None:
    """With no `ports` given, the driver plugs through `agents.net.ports` (the segment, its
    firewall): the guests' rules open their service to each other."""
    pytest.importorskip("agents.net.ports")
    host = fabric.host("h2")  # the fixture's bridge on h1 is not the plumbing's: use h2
    fabric.exec(host.netns, "ip", "link", "del", f"obr{VNI}")
    drv = NetnsGuestDriver(host.netns, host.name, host.underlay_ip)
    rules = (SecurityRule(protocol="tcp", port=PORT), SecurityRule(protocol="udp", port=PORT))
    try:
        for n in (2, 3):
            base = spec(n, host="h2")
            wanted = msgspec.structs.replace(
                base, template=msgspec.structs.replace(base.template, rules=rules))
            assert drv.apply(f"p-{n}", wanted, 1) == "running"
        a, b = drv.netns_name("p-2"), drv.netns_name("p-3")
        assert fabric.tcp(a, ip_of(3), PORT) == "p-3\n"
        assert fabric.udp(b, ip_of(2), PORT) == "p-2\n"
        assert drv.apply("p-2", None, 2) == "absent" and drv.apply("p-3", None, 2) == "absent"
        assert f"obr{VNI}" not in fabric.links(host.netns)  # the last port took its segment
    finally:
        drv.close()


def test_a_port_the_plumbing_left_down_is_reported_stopped(fabric: Fabric) -> None:
    class AttachOnly(BridgePorts):
        def plug(self, port: str, nic: NicSpec, rules: tuple[SecurityRule, ...]) -> None:
            self.fabric.exec(self.host.netns, "ip", "link", "set", port, "master",
                             f"obr{nic.vni}")

    host = fabric.host("h1")
    drv = NetnsGuestDriver(host.netns, host.name, host.underlay_ip,
                           ports=AttachOnly(fabric, host))
    assert drv.apply("a", spec(2), 1) == "stopped"  # honest: its port carries nothing
    assert drv.observe() == {"a": "stopped"}
    assert driver(fabric).apply("a", spec(2), 1) == "running"  # once the plumbing does
