"""Namespaces for the dataplane tests: hosts on an underlay bridge, guests on their ports.

`Topology()` makes a fabric namespace with an underlay bridge (MTU 9000) and N host
namespaces, each with ``ul0`` veth'd into it and an address of a random ``10.x.y.0/24``
that overlaps nothing of the root namespace. `guest()` makes a guest namespace whose
``eth0`` (its MAC and address) is veth'd to a port in a host namespace, named as the
dataplane names ports, left down and unattached: plugging it is the code under test.
Everything is removed on `close()` (the fixtures call it in ``finally``): the processes
started in the namespaces, then the namespaces (and every veth with them).

Names start with ``tnd`` and a random tag; traffic never leaves these namespaces.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from agents.net.host import NamespaceThread

PREFIX = "tnd"
UNDERLAY_MTU = 9000
T = TypeVar("T")


def sh(*args: str, check: bool = True, timeout: float = 15.0,
       stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          input=stdin)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = sh("ip", "-4", "-o", "addr").stdout
    nets = [ipaddress.ip_interface(line.split()[3]).network for line in out.splitlines()]
    for line in sh("ip", "-4", "route", "show", "table", "all").stdout.splitlines():
        word = line.split()[0] if line.split() else ""
        if word[:1].isdigit():
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.IPv4Network(word, strict=False))
    return nets


def free_network() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that overlaps nothing of the root namespace."""
    used = _used_networks()
    while True:
        net = ipaddress.IPv4Network(f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net


@dataclass
class Host:
    netns: str
    underlay_ip: str


@dataclass
class Guest:
    netns: str
    port: str
    host: Host
    mac: str
    ip: str
    prefix: int
    topology: Topology = field(repr=False)

    def run(self, *cmd: str, check: bool = True,
            timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.netns, *cmd, check=check, timeout=timeout)

    def pings(self, ip: str, *, attempts: int = 1, wait: float = 1.0) -> bool:
        for attempt in range(attempts):
            if self.run("ping", "-c1", "-W", f"{wait:g}", ip, check=False).returncode == 0:
                return True
            if attempt + 1 < attempts:
                time.sleep(0.2)
        return False

    def inside(self, call: Callable[[], T]) -> T:
        return self.topology.inside(self.netns, call)

    def tcp_listen(self, port: int) -> socket.socket:
        def listen() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((self.ip, port))
            s.listen(8)
            return s

        sock = self.inside(listen)
        self.topology.sockets.append(sock)
        return sock

    def tcp_connect(self, ip: str, port: int, timeout: float = 1.0) -> socket.socket | None:
        """A connected socket, or None if the connection was not made within ``timeout``."""
        sock = self.inside(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        self.topology.sockets.append(sock)
        sock.settimeout(timeout)
        try:
            sock.connect((ip, port))
        except OSError:
            sock.close()
            return None
        return sock

    def udp_socket(self, bind_ip: str | None = None, port: int = 0) -> socket.socket:
        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if bind_ip is not None:
                s.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND: a spoofed source is fine
                s.bind((bind_ip, port))
            return s

        sock = self.inside(make)
        self.topology.sockets.append(sock)
        return sock


class Topology:
    """A fabric namespace and ``hosts`` host namespaces; guests made on demand."""

    def __init__(self, hosts: int = 3) -> None:
        self.tag = secrets.token_hex(3)
        self.net = free_network()
        self.fabric = f"{PREFIX}{self.tag}f"
        self.namespaces: list[str] = []
        self.sockets: list[socket.socket] = []
        self._threads: dict[str, NamespaceThread] = {}
        self._guests = 0
        self.hosts: list[Host] = []
        try:
            self._add_netns(self.fabric)
            sh("ip", "-n", self.fabric, "link", "add", "ulbr", "mtu", str(UNDERLAY_MTU),
               "type", "bridge")
            sh("ip", "-n", self.fabric, "link", "set", "ulbr", "up")
            for i in range(1, hosts + 1):
                host = Host(f"{PREFIX}{self.tag}h{i}", str(self.net[i]))
                self._add_netns(host.netns)
                sh("ip", "link", "add", "name", "ul0", "netns", host.netns, "mtu",
                   str(UNDERLAY_MTU), "type", "veth", "peer", "name", f"ul{i}", "netns",
                   self.fabric, "mtu", str(UNDERLAY_MTU))
                sh("ip", "-n", self.fabric, "link", "set", f"ul{i}", "master", "ulbr", "up")
                batch = (f"addr add {host.underlay_ip}/24 dev ul0\n"
                         "link set ul0 up\nlink set lo up\n")
                sh("ip", "-n", host.netns, "-batch", "-", stdin=batch)
                self.hosts.append(host)
        except BaseException:
            self.close()
            raise

    def _add_netns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)

    def inside(self, netns: str, call: Callable[[], T]) -> T:
        """Run ``call`` in a thread inside ``netns`` (sockets made there stay there)."""
        thread = self._threads.get(netns)
        if thread is None:
            thread = self._threads[netns] = NamespaceThread(netns, 10.0)
        return thread.call(call, f"in {netns}")

    def guest(self, host: Host, port: str, mac: str, ip: str, prefix: int = 24,
              mtu: int = 1500) -> Guest:
        self._guests += 1
        netns = f"{PREFIX}{self.tag}g{self._guests}"
        self._add_netns(netns)
        sh("ip", "link", "add", "name", "eth0", "netns", netns, "mtu", str(mtu), "type", "veth",
           "peer", "name", port, "netns", host.netns, "mtu", str(mtu))
        sh("ip", "-n", netns, "-batch", "-",
           stdin=f"link set eth0 address {mac}\naddr add {ip}/{prefix} dev eth0\n"
                 "link set eth0 up\nlink set lo up\n")
        return Guest(netns, port, host, mac, ip, prefix, self)

    def remove_guest(self, guest: Guest) -> None:
        if guest.netns in self.namespaces:
            thread = self._threads.pop(guest.netns, None)
            if thread is not None:
                thread.close()
            sh("ip", "netns", "del", guest.netns, check=False)
            self.namespaces.remove(guest.netns)

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads.values():
            thread.close()
        self._threads.clear()
        for netns in reversed(self.namespaces):
            pids = sh("ip", "netns", "pids", netns, check=False).stdout.split()
            for pid in pids:
                sh("kill", "-9", pid, check=False)
            sh("ip", "netns", "del", netns, check=False)
        self.namespaces.clear()


@contextlib.contextmanager
def topology(hosts: int = 3) -> Iterator[Topology]:
    topo = Topology(hosts)
    try:
        yield topo
    finally:
        topo.close()
