"""Hosts as network namespaces on one underlay: the reusable topology of tests and `orch demo`.

`Fabric(hosts)` makes, and always removes again:

- a fabric namespace `<prefix>-fab` holding the underlay bridge `ulbr` (MTU 9000);
- per host a namespace `<prefix>-<host>` with `ul0` (MTU 9000, up) veth'd into the bridge
  (`ul<i>` on the fabric's side) and an address from a random `10.x.y.0/24` that overlaps
  nothing of the machine's (its addresses and routes were read first);
- per host, later, its own daemons (libvirtd for QEMU guests: `_start_daemons`).

`<prefix>` is `of` plus a random tag. Teardown, also after a failed test, kills every
process living in a namespace whose name starts with `<prefix>-`, deletes all those
namespaces (so the guest namespaces that drivers made under a host, named
`<host netns>.<instance>`, go too, and every veth with them), removes the drivers' state
directories `/run/orch-guests/<prefix>-*` and any root-namespace link named `<prefix>*`.

Probes run inside namespaces and use real packets: `ping` (the ping binary), `tcp` and
`udp` (a socket created in the namespace by this thread, setns() around socket(): no
process per probe, exact timeouts).

The standard library and the `ip` command only. It lives in `orchestrator/` so that
`orch demo` can build its hosts with it (the CLI may not import `tests/`); the tests use it
through `tests.fabric`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

NETNS_DIR = Path("/run/netns")
GUEST_RUN_DIR = Path("/run/orch-guests")  # agents.drivers.netns_guest.RUN_DIR
UNDERLAY_MTU = 9000
FIRST_HOST_ADDRESS = 11  # h1 is .11, h2 .12, ...

# ---- setns: a private copy -----------------------------------------------------------
# The same 20 lines as `agents.guest_service.in_netns` / `netns_socket`. Copied, not
# imported: the orchestrator never imports an agent (DESIGN.md, folders), `events/` and
# `schemas/` hold no I/O of this kind, and the guest service must stay standard-library
# only with no import of this project (it starts once per host, fast and small).

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(netns: str | int) -> Iterator[None]:
    """Run the block with the calling thread in another network namespace (a name under
    /run/netns, or an open namespace fd), and come back. Sockets made inside stay there."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(NETNS_DIR / netns, os.O_RDONLY) if isinstance(netns, str) else netns
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)
        if isinstance(netns, str):
            os.close(target)


def netns_socket(netns: str | None, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket created in namespace `netns` (None: this thread's own)."""
    if netns is None:
        return socket.socket(family, kind, proto)
    with in_netns(netns):
        return socket.socket(family, kind, proto)

def _alive(pid: int) -> bool:
    """Running (a zombie is not: init reaps orphans here only about once a second)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can). For skips and `orch demo`."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    probe = f"of{secrets.token_hex(3)}-probe"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"cannot create network namespaces: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network of the root namespace: its addresses and its routes."""
    nets = []
    out = subprocess.run(["ip", "-4", "-o", "addr"], check=True, capture_output=True,
                         text=True).stdout
    nets += [ipaddress.ip_interface(line.split()[3]).network for line in out.splitlines()]
    out = subprocess.run(["ip", "-4", "route", "show", "table", "all"], check=True,
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        words = line.split()
        if words and words[0] in ("broadcast", "local", "unicast", "blackhole", "unreachable"):
            words = words[1:]
        if not words:
            continue
        dst = "0.0.0.0/0" if words[0] == "default" else words[0]
        with contextlib.suppress(ValueError):
            net = ipaddress.ip_network(dst, strict=False)
            if net.prefixlen > 0:  # a default route overlaps everything: not a use
                nets.append(net)  # type: ignore[arg-type]
    return nets


def free_underlay() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that overlaps no address or route of the machine."""
    used = _used_networks()
    for _ in range(1000):
        net = ipaddress.IPv4Network(
            f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.x.y.0/24 for an underlay")


@dataclass(frozen=True)
class FabricHost:
    """One host of the fabric: its agent's name, its namespace, its VTEP address."""

    name: str
    netns: str
    underlay_ip: str
    index: int  # 1-based
    # Daemons of this host (a per-host libvirtd, later), pid by name.
    daemons: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def guest_prefix(self) -> str:
        """The prefix of the guest namespaces drivers make on this host."""
        return self.netns + "."


class Fabric:
    """Hosts as network namespaces on an underlay bridge; a context manager.

    `Fabric(3)` names the hosts h1..h3; `Fabric(["a", "b"])` names them. `setup_s` and
    `teardown_s` are measured. Use it as `with Fabric(2) as fabric:` or through a fixture.
    """

    def __init__(self, hosts: int | Sequence[str] = 2, *, tag: str | None = None,
                 mtu: int = UNDERLAY_MTU, underlay: ipaddress.IPv4Network | None = None,
                 libvirtd: bool = False) -> None:
        names = [f"h{i + 1}" for i in range(hosts)] if isinstance(hosts, int) else list(hosts)
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"host names must be unique and at least one: {names}")
        if libvirtd:
            raise NotImplementedError("a per-host libvirtd is not built yet (issue 9)")
        self.prefix = f"of{tag or secrets.token_hex(3)}"
        self.fabric_netns = f"{self.prefix}-fab"
        self.bridge = "ulbr"
        self.mtu = mtu
        self.underlay = underlay or free_underlay()
        self.hosts = [
            FabricHost(name, f"{self.prefix}-{name}",
                       str(self.underlay[FIRST_HOST_ADDRESS + i]), i + 1)
            for i, name in enumerate(names)
        ]
        self._libvirtd = libvirtd
        self.setup_s: float | None = None
        self.teardown_s: float | None = None

    def host(self, name: str) -> FabricHost:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    def __getitem__(self, name: str) -> FabricHost:
        return self.host(name)

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> Fabric:
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.teardown()

    def setup(self) -> None:
        started = time.perf_counter()
        # One ip process for every namespace and link: veths are made with both ends in
        # place (PLATFORM-FACTS), the bridge inside the fabric namespace.
        batch = [f"netns add {self.fabric_netns}"]
        batch += [f"netns add {h.netns}" for h in self.hosts]
        batch += [f"link add name ul0 netns {h.netns} mtu {self.mtu} type veth "
                  f"peer name ul{h.index} netns {self.fabric_netns} mtu {self.mtu}"
                  for h in self.hosts]
        self._ip_batch(None, batch)
        # An IPv4 underlay: no link-local addresses, router solicitations or MLD on it.
        for netns, links in [(self.fabric_netns, ["all", "default"]),
                             *((h.netns, ["ul0"]) for h in self.hosts)]:
            with in_netns(netns):
                for link in links:
                    Path(f"/proc/sys/net/ipv6/conf/{link}/disable_ipv6").write_text("1")
        fabric = [f"link add {self.bridge} mtu {self.mtu} type bridge",
                  "link set lo up", f"link set {self.bridge} up"]
        fabric += [f"link set ul{h.index} master {self.bridge} up" for h in self.hosts]
        self._ip_batch(self.fabric_netns, fabric)
        for h in self.hosts:
            self._ip_batch(h.netns, [
                "link set lo up",
                f"addr add {h.underlay_ip}/{self.underlay.prefixlen} dev ul0",
                "link set ul0 up",
            ])
            self._start_daemons(h)
        self.setup_s = time.perf_counter() - started

    def _start_daemons(self, host: FabricHost) -> None:
        """The host's own daemons, in its namespace. Later: libvirtd in its own mount
        namespace (PLATFORM-FACTS, "Live migration"), recorded in `host.daemons`; teardown
        kills it with every other process of the host's namespace."""
        if self._libvirtd:  # pragma: no cover - refused in __init__ until built
            raise NotImplementedError

    def teardown(self) -> None:
        started = time.perf_counter()
        mine = self.namespaces()
        self.kill_processes(mine)
        # Guests first, then hosts, then the fabric (longest names first does it).
        for name in sorted(mine, key=len, reverse=True):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        for directory in GUEST_RUN_DIR.glob(f"{self.prefix}-*"):
            shutil.rmtree(directory, ignore_errors=True)
        for link in self.root_links():
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        self.teardown_s = time.perf_counter() - started

    # -- what it made -----------------------------------------------------------------------

    def namespaces(self) -> list[str]:
        """Every namespace of this fabric: its own, its hosts' and their guests'."""
        if not NETNS_DIR.exists():
            return []
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(self.prefix + "-"))

    def processes(self, namespaces: Sequence[str] | None = None) -> dict[int, str]:
        """Processes living in this fabric's namespaces: pid -> namespace."""
        inodes: dict[tuple[int, int], str] = {}
        for name in self.namespaces() if namespaces is None else namespaces:
            with contextlib.suppress(OSError):
                st = os.stat(NETNS_DIR / name)
                inodes[st.st_dev, st.st_ino] = name
        found: dict[int, str] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
            except OSError:
                continue
            name = inodes.get((st.st_dev, st.st_ino))
            if name is not None:
                found[int(entry)] = name
        return found

    def kill_processes(self, namespaces: Sequence[str] | None = None,
                       timeout_s: float = 5.0) -> None:
        pids = self.processes(namespaces)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout_s
        for pid in pids:
            while time.monotonic() < deadline and _alive(pid):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)  # a child of the test: reap it
                time.sleep(0.005)

    def root_links(self) -> list[str]:
        """Links in the root namespace named after this fabric (there should be none)."""
        out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]
        return [n for n in names if n.startswith(self.prefix)]

    def links(self, netns: str) -> list[str]:
        out = self.exec(netns, "ip", "-o", "link").stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]

    # -- running things in namespaces ---------------------------------------------------------

    @staticmethod
    def _ip_batch(netns: str | None, commands: Sequence[str]) -> None:
        argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
        done = subprocess.run(argv, input="\n".join(commands) + "\n", capture_output=True,
                              text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"ip {netns or ''} -batch failed: {done.stderr.strip()}")

    @staticmethod
    def exec(netns: str, *argv: str, check: bool = True, timeout: float = 30.0,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command in a namespace (`ip netns exec`), its output captured as text."""
        done = subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True,
                              text=True, timeout=timeout, input=input)
        if check and done.returncode != 0:
            raise RuntimeError(f"in {netns}: {' '.join(argv)} exited {done.returncode}: "
                               f"{done.stderr.strip()}")
        return done

    def ping(self, netns: str, address: str, *, count: int = 1, timeout_s: float = 1.0,
             size: int | None = None, dont_fragment: bool = False) -> bool:
        """True when `address` answers a ping sent from `netns`."""
        argv = ["ping", "-n", "-q", "-c", str(count), "-W", str(max(1, round(timeout_s)))]
        if count > 1:
            argv += ["-i", "0.01"]
        if size is not None:
            argv += ["-s", str(size)]
        if dont_fragment:
            argv += ["-M", "do"]
        return self.exec(netns, *argv, address, check=False,
                         timeout=timeout_s * count + 10).returncode == 0

    def wait_ping(self, netns: str, address: str, within_s: float = 5.0) -> float:
        """Seconds until `address` first answered from `netns`; TimeoutError if never."""
        started = time.monotonic()
        while True:
            if self.ping(netns, address, timeout_s=1.0):
                return time.monotonic() - started
            if time.monotonic() - started > within_s:
                raise TimeoutError(f"{address} does not answer ping from {netns}")
            time.sleep(0.05)

    @staticmethod
    def tcp(netns: str, address: str, port: int, send: bytes = b"", *,
            timeout_s: float = 2.0, source: str | None = None) -> str:
        """Connect from `netns`, send `send`, half-close, return all that came back."""
        with netns_socket(netns, socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            if source is not None:
                sock.bind((source, 0))
            sock.connect((address, port))
            if send:
                sock.sendall(send)
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    @staticmethod
    def udp(netns: str, address: str, port: int, send: bytes = b"?\n", *,
            timeout_s: float = 2.0, attempts: int = 3) -> str:
        """Send a datagram from `netns` and return the first answer (resent on timeout:
        the first may be lost to ARP resolution)."""
        with netns_socket(netns, socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout_s / attempts)
            sock.connect((address, port))
            for attempt in range(attempts):
                sock.send(send)
                try:
                    return sock.recv(65536).decode(errors="replace")
                except TimeoutError:
                    if attempt == attempts - 1:
                        raise
        raise AssertionError("unreachable")
