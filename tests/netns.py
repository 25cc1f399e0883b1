"""Guests on ports for the dataplane tests, on the hosts of a fabric.

The hosts are `tests.fabric.Fabric`'s (a fabric namespace with the underlay bridge, a
namespace per host with ``ul0`` on it). What only the dataplane tests need is here:
`Topology.guest()` makes a guest namespace whose ``eth0`` (its MAC and address) is veth'd
to a port in a host namespace, named as the dataplane names ports, left down and
unattached: plugging it is the code under test. `Guest` has socket helpers that run inside
its namespace (one `NamespaceThread` per namespace, so sockets made there stay there).

Guest namespaces are named ``<host netns>.g<n>``: under their host, so the fabric's
teardown (also after a failed test) removes them, their processes and their veths.
`close()` closes the sockets and threads, then tears the fabric down.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from agents.net.host import NamespaceThread
from tests.fabric import Fabric, FabricHost

T = TypeVar("T")


def sh(*args: str, check: bool = True, timeout: float = 15.0,
       stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          input=stdin)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


@dataclass
class Guest:
    netns: str
    port: str
    host: FabricHost
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
    """The hosts of a fabric, and guests made on demand on their ports."""

    def __init__(self, fabric: Fabric) -> None:
        self.fabric = fabric
        self.hosts = fabric.hosts
        self.sockets: list[socket.socket] = []
        self._threads: dict[str, NamespaceThread] = {}
        self._guests = 0

    def inside(self, netns: str, call: Callable[[], T]) -> T:
        """Run ``call`` in a thread inside ``netns`` (sockets made there stay there)."""
        thread = self._threads.get(netns)
        if thread is None:
            thread = self._threads[netns] = NamespaceThread(netns, 10.0)
        return thread.call(call, f"in {netns}")

    def guest(self, host: FabricHost, port: str, mac: str, ip: str, prefix: int = 24,
              mtu: int = 1500) -> Guest:
        self._guests += 1
        netns = f"{host.guest_prefix}g{self._guests}"
        sh("ip", "netns", "add", netns)
        sh("ip", "link", "add", "name", "eth0", "netns", netns, "mtu", str(mtu), "type", "veth",
           "peer", "name", port, "netns", host.netns, "mtu", str(mtu))
        sh("ip", "-n", netns, "-batch", "-",
           stdin=f"link set eth0 address {mac}\naddr add {ip}/{prefix} dev eth0\n"
                 "link set eth0 up\nlink set lo up\n")
        return Guest(netns, port, host, mac, ip, prefix, self)

    def remove_guest(self, guest: Guest) -> None:
        thread = self._threads.pop(guest.netns, None)
        if thread is not None:
            thread.close()
        sh("ip", "netns", "del", guest.netns, check=False)

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads.values():
            thread.close()
        self._threads.clear()
        self.fabric.teardown()


@contextlib.contextmanager
def topology(hosts: int = 3) -> Iterator[Topology]:
    with Fabric(hosts) as fabric:
        topo = Topology(fabric)
        try:
            yield topo
        finally:
            topo.close()
