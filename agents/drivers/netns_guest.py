"""Namespace guests (`--guests netns`): each instance is a network namespace, not a VM.

For broad and fast tests. The networking is real (a veth per NIC into the host's segment
bridge, the fold's MAC and address on it), and each guest answers with its instance id on
TCP and UDP port 8080 (`agents.guest_service`, one process per host serving every guest).
There is no CPU, memory, disk or image: the template's sizes are not enforced.

Names (what teardown and the network driver rely on):

- a guest's namespace is `<base>.<instance id>`, where `<base>` is the host's namespace
  (`host_netns`) or `orch-<host>` when the agent manages its own namespace; ids and host
  names carry no dot, so the prefix `<base>.` is this host's guests and nothing else.
  Whoever deletes the host's namespaces with the prefix `<host netns>` removes its guests;
- NIC i is a veth pair: `port_name(id, i)` in the host's namespace (the name a QEMU tap
  would have), `eth<i>` in the guest's;
- the host's state directory is `/run/orch-guests/<base>/` (the service's records, its
  control socket, pid file and log).

The generation last applied, with the instance id, host and number of NICs, is stored on
the guest's own kernel object: the alias (IFLA_IFALIAS) of the `lo` of its namespace,
`orch-guest id=<id> host=<host> gen=<generation> nics=<n>`. It lives exactly as
long as the guest, so a restarted agent adopts guests through `generations()`, and applying
the same spec again deletes or recreates nothing. The service runs detached (own session,
pid file), so it outlives the agent too.

Power: "running" is every link up (both ends) and the service answering for the guest;
"stopped" is the service no longer answering for it and the guest's ends down (its ports
then have no carrier; their admin state is the plumbing's); a spec of None removes the
namespace and its veths ("absent").

A live migration of a namespace guest is a real move, of its namespace and its ports:
there is no memory to copy, so on the source's job (``outgoing``) the guest is removed
here and the driver answers "migrated" (unless the deadline passed first: then it stays
and the migration fails); the destination's job (``incoming``) prepares nothing and
answers "incoming", and the guest is created there by the job the fold sends once it has
switched the instance over, after the source said it left. So there is never a moment with
two.

Ports are plugged by `agents.net.ports.PortPlumbing` of the host's namespace (the network
driver's: segment, firewall, master, up), or by any `Ports` given.

All calls are blocking netlink and file operations: the agent runs them in a thread. Two
calls for the same instance must not run concurrently (the agent's work queue guarantees
it); calls for different instances may.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pyroute2 import IPRoute, NetlinkError
from pyroute2 import netns as pyroute2_netns

from agents import guest_service
from agents.drivers.errors import PermanentDriverError, TransientDriverError
from agents.guest_service import in_netns
from agents.net.errors import NetError
from agents.net.iproute import iproute_in
from agents.net.names import port_name
from agents.net.rtnl import Link, Rtnl
from schemas.ids import is_valid_id
from schemas.specs import InstanceSpec, NicSpec, SecurityRule

RUN_DIR = Path("/run/orch-guests")
NETNS_DIR = Path("/run/netns")
ALIAS_TAG = "orch-guest"
MAX_NETNS_NAME = 80  # longer names get a hashed tail
SERVICE_PORT = guest_service.PORT
SERVICE_START_S = 5.0
READ_TIMEOUT_S = 5.0  # one netlink read of a namespace
IFF_UP = 0x1

Observed = Literal["running", "stopped"]

_ALIAS_RE = re.compile(rf"^{ALIAS_TAG} id=(\S+) host=(\S+) gen=(\d+) nics=(\d+)$")
# Errors that retrying the same request cannot fix; the rest may be races with the kernel.
_PERMANENT_ERRNOS = frozenset({errno.EINVAL, errno.ERANGE, errno.EOPNOTSUPP, errno.EPERM})


class Ports(Protocol):
    """Plugs a guest's port into its segment (bridge, firewall) and brings it up; unplugs.

    The host's end of a veth is the plumbing's from its creation on: its master, firewall
    and admin state. The driver owns the guest's end.
    """

    def plug(self, port: str, nic: NicSpec, rules: tuple[SecurityRule, ...]) -> None: ...

    def unplug(self, port: str) -> object: ...


class _NetPorts:
    """The network driver's plumbing (`agents.net.ports.PortPlumbing`) of the host's
    namespace, opened at first use; its errors become this driver's."""

    def __init__(self, host_netns: str | None, underlay_ip: str) -> None:
        self.host_netns, self.underlay_ip = host_netns, underlay_ip
        self._plumbing: Any = None
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _net(self, what: str) -> Iterator[Any]:
        try:
            from agents.net.errors import NetError
            from agents.net.ports import PortPlumbing
        except ImportError as exc:
            raise PermanentDriverError(f"{what}: agents.net.ports is not available") from exc
        try:
            with self._lock:
                if self._plumbing is None:
                    self._plumbing = PortPlumbing(self.host_netns)
            yield self._plumbing
        except NetError as exc:
            cls = TransientDriverError if exc.transient else PermanentDriverError
            raise cls(f"{what}: {exc}") from exc

    def plug(self, port: str, nic: NicSpec, rules: tuple[SecurityRule, ...]) -> None:
        with self._net(f"plug {port}") as plumbing:
            plumbing.plug(port, nic, rules, self.underlay_ip)

    def unplug(self, port: str) -> object:
        with self._net(f"unplug {port}") as plumbing:
            return plumbing.unplug(port)

    def close(self) -> None:
        with self._lock:
            if self._plumbing is not None:
                self._plumbing.close()
                self._plumbing = None


def guest_base(host_netns: str | None, host: str) -> str:
    """The prefix of a host's guest namespaces and the name of its state directory."""
    return host_netns or f"orch-{host}"


def guest_netns(base: str, instance_id: str) -> str:
    name = f"{base}.{instance_id}"
    if len(name) <= MAX_NETNS_NAME:
        return name
    return f"{base}.{instance_id[:24]}~{hashlib.sha256(instance_id.encode()).hexdigest()[:16]}"


@dataclass(frozen=True)
class _Guest:
    """A managed guest as the kernel holds it."""

    id: str
    netns: str
    generation: int
    nics: int


def _up(links: dict[str, Link | None]) -> dict[str, bool]:
    return {name: link.up for name, link in links.items() if link is not None}


def _reader_in(netns: str | None) -> Rtnl:
    """Our own netlink reader in a namespace, for observing: pyroute2 took ~0.9 ms to open
    and decode each guest's namespace, and half a second for a host's 700 links, on every
    resync. FileNotFoundError if there is no such namespace."""
    if netns is None:
        return Rtnl(READ_TIMEOUT_S)
    with in_netns(netns):
        return Rtnl(READ_TIMEOUT_S)


class _Netns:
    """One namespace's netlink for one call: reads through our own reader, writes through
    pyroute2, opened at the first write only (a converged guest needs none; reading it
    all through pyroute2 took ~10 ms per guest and resync)."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self.read = _reader_in(netns)
        self._write: IPRoute | None = None

    @property
    def write(self) -> IPRoute:
        if self._write is None:
            self._write = iproute_in(self.netns)
        return self._write

    def links(self) -> dict[str, Link]:
        return {link.name: link for link in self.read.links()}

    def link(self, name: str) -> Link | None:
        return self.read.link(name)

    def close(self) -> None:
        self.read.close()
        if self._write is not None:
            self._write.close()


def _parse_alias(alias: str | None) -> tuple[str | None, str | None, int, int]:
    """(id, host, generation, NICs) from the alias of a guest's lo; Nones and zeros if
    unset."""
    match = _ALIAS_RE.match(alias or "")
    if match is None:
        return None, None, 0, 0
    return match[1], match[2], int(match[3]), int(match[4])


def _is_eth(ifname: str) -> bool:
    return ifname.startswith("eth") and ifname[3:].isdigit()


class NetnsGuestDriver:
    # Netlink and service round trips: run in a thread.
    blocking = True

    def __init__(self, host_netns: str | None, host: str, underlay_ip: str, *,
                 ports: Ports | None = None, run_dir: Path | None = None,
                 port: int = SERVICE_PORT) -> None:
        self.host_netns = host_netns
        self.host = host
        self.underlay_ip = underlay_ip
        self.ports: Ports = ports if ports is not None else _NetPorts(host_netns, underlay_ip)
        self.base = guest_base(host_netns, host)
        self.run_dir = run_dir if run_dir is not None else RUN_DIR / self.base
        self.records = self.run_dir / "guests"
        self.service_port = port
        self._spawn_lock = threading.Lock()

    def netns_name(self, instance_id: str) -> str:
        return guest_netns(self.base, instance_id)

    def close(self) -> None:
        """Release the plumbing (this driver's netlink sockets live for one call only).
        Guests keep running."""
        close = getattr(self.ports, "close", None)
        if close is not None:
            close()

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except (TransientDriverError, PermanentDriverError):
            raise
        except NetlinkError as exc:
            cls = PermanentDriverError if exc.code in _PERMANENT_ERRNOS else TransientDriverError
            raise cls(f"{what}: {exc}") from exc
        except (OSError, subprocess.SubprocessError) as exc:
            raise TransientDriverError(f"{what}: {exc}") from exc
        except NetError as exc:  # our reader's (agents.net), a timeout say
            cls = TransientDriverError if exc.transient else PermanentDriverError
            raise cls(f"{what}: {exc}") from exc

    # -- reading ----------------------------------------------------------------------------

    def _alias(self, instance_id: str, generation: int, nics: int) -> str:
        return f"{ALIAS_TAG} id={instance_id} host={self.host} gen={generation} nics={nics}"

    @staticmethod
    def _read(links: dict[str, Link]) -> tuple[str | None, str | None, int, int]:
        """(id, host, generation, NICs) from the alias of the namespace's lo."""
        lo = links.get("lo")
        return _parse_alias(lo.alias if lo is not None else None)

    def _guests(self) -> dict[str, tuple[_Guest, dict[str, bool]]]:
        """Managed guests of this host, by instance id, with whether each link of their
        namespace is up."""
        out: dict[str, tuple[_Guest, dict[str, bool]]] = {}
        prefix = self.base + "."
        for name in sorted(os.listdir(NETNS_DIR) if NETNS_DIR.exists() else ()):
            if not name.startswith(prefix):
                continue
            try:
                with contextlib.closing(_reader_in(name)) as g:
                    links = {link.name: link for link in g.links()}
            except FileNotFoundError:
                continue  # removed meanwhile
            guest_id, host, generation, nics = self._read(links)
            if guest_id is None:
                # Made but never finished (a crash between the namespace and its alias):
                # ours by name, at generation 0, so a job or the sweep converges it.
                guest_id = name[len(prefix):]
                if not is_valid_id(guest_id) or self.netns_name(guest_id) != name:
                    continue
            elif host != self.host or self.netns_name(guest_id) != name:
                continue
            out[guest_id] = (_Guest(guest_id, name, generation, nics), _up(links))
        return out

    def generations(self) -> dict[str, int]:
        """The generation last applied to every managed guest on this host."""
        with self._errors("list guests"):
            return {i: g.generation for i, (g, _) in self._guests().items()}

    def observe(self) -> dict[str, str]:
        """Power state of every managed guest on this host."""
        with self._errors("observe guests"):
            guests = self._guests()
            if not guests:
                return {}
            serving = self._serving(start=False)
            with contextlib.closing(_reader_in(self.host_netns)) as h:
                host_up = h.link_states()
            return {i: self._power(i, g.netns, g.nics, up, host_up, serving)
                    for i, (g, up) in guests.items()}

    @staticmethod
    def _power(instance_id: str, name: str, nics: int, up: dict[str, bool],
               host_up: dict[str, bool], serving: dict[str, str]) -> Observed:
        """Running: the service answers for the guest, and lo and every NIC it was given
        are there and up at both ends (``up``: the guest's links, ``host_up``: the host's)."""
        if serving.get(instance_id) != name:
            return "stopped"
        ends = [up.get(ifname) for ifname in ("lo", *(f"eth{i}" for i in range(nics)))]
        ends += [host_up.get(port_name(instance_id, i)) for i in range(nics)]
        return "running" if all(ends) else "stopped"

    # -- converging -------------------------------------------------------------------------

    def apply(self, instance_id: str, spec: InstanceSpec | None, generation: int) -> str:
        """Converge one guest to `spec` (None: absent); returns the observed power state.

        Idempotent: what already matches is left alone (no link deleted and recreated, the
        service untouched). A job older than the generation applied changes nothing.
        """
        name = self.netns_name(instance_id)
        with self._errors(f"guest {instance_id}"), contextlib.ExitStack() as stack:
            g = self._open(name, stack)
            h = stack.enter_context(contextlib.closing(_Netns(self.host_netns)))
            links = g.links() if g is not None else {}
            if g is not None and self._applied(instance_id, name, links) > generation:
                # A stale job: leave the newer state alone.
                return self._power(instance_id, name, self._read(links)[3], _up(links),
                                   h.read.link_states(), self._serving(start=False))
            if spec is not None and spec.incoming:
                return "incoming"  # it is created here once the fold has switched it over
            if spec is not None and spec.outgoing is not None:
                if g is not None and time.time() * 1000 >= spec.outgoing.deadline_at:
                    raise PermanentDriverError(
                        f"deadline passed: guest {instance_id} stays on {self.host}")
                if g is not None:  # handed over: the destination creates it, never before
                    stack.close()
                    self._remove(instance_id, name)
                return "migrated"
            if spec is None:
                if g is not None:
                    stack.close()  # no socket of ours may keep the namespace alive
                    self._remove(instance_id, name)
                return "absent"
            if g is None:
                self._create_netns(name)
                g = self._open(name, stack)
                if g is None:
                    raise TransientDriverError(f"namespace {name} vanished after creation")
                links = g.links()
            running = spec.power == "running"
            serving: dict[str, str] = {}
            if not running:
                serving = self._serve(instance_id, name, False)  # the service goes first
            self._converge_links(instance_id, spec, running, g, h, links)
            alias = self._alias(instance_id, generation, len(spec.nics))
            if links["lo"].alias != alias:
                g.write.link("set", index=links["lo"].index, ifalias=alias)
            if running:
                serving = self._serve(instance_id, name, True)
            if not running or serving.get(instance_id) != name:
                return "stopped"
            # Read back as observe() reads it: the host's ends are the plumbing's to bring up.
            ports = {p: h.link(p) for p in (port_name(instance_id, i)
                                             for i in range(len(spec.nics)))}
            return self._power(instance_id, name, len(spec.nics), _up(g.links()), _up(ports),
                               serving)

    def remove(self, instance_id: str) -> bool:
        """Remove the guest's namespace, veths and service here; False if there is none."""
        name = self.netns_name(instance_id)
        with self._errors(f"remove guest {instance_id}"):
            with contextlib.ExitStack() as stack:
                g = self._open(name, stack)
                if g is None:
                    return False
                guest_id, host, _, _ = self._read(g.links())
                if guest_id is not None and (guest_id, host) != (instance_id, self.host):
                    return False  # not ours: never touched
            self._remove(instance_id, name)
            return True

    @staticmethod
    def _open(name: str, stack: contextlib.ExitStack) -> _Netns | None:
        """Netlink in the guest's namespace, None if there is no such namespace."""
        try:
            return stack.enter_context(contextlib.closing(_Netns(name)))
        except FileNotFoundError:
            return None

    def _applied(self, instance_id: str, name: str, links: dict[str, Link]) -> int:
        """The generation applied to the guest in this namespace; an error if not ours."""
        guest_id, host, generation, _ = self._read(links)
        if guest_id is not None and (guest_id, host) != (instance_id, self.host):
            raise PermanentDriverError(
                f"namespace {name} exists but belongs to {guest_id} on {host}")
        return generation

    def _create_netns(self, name: str) -> None:
        done = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True,
                              timeout=10)
        if done.returncode != 0 and not (NETNS_DIR / name).exists():
            raise TransientDriverError(f"ip netns add {name}: {done.stderr.strip()}")
        with in_netns(name):
            # An IPv4-only guest, as the model has it: no link-local chatter on the segment.
            for conf in ("all", "default"):
                Path(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6").write_text("1")

    def _converge_links(self, instance_id: str, spec: InstanceSpec, running: bool,
                        g: _Netns, h: _Netns, links: dict[str, Link]) -> None:
        lo = links["lo"]
        if not lo.up:
            g.write.link("set", index=lo.index, state="up")
        for i, nic in enumerate(spec.nics):
            self._converge_nic(instance_id, i, nic, spec, running, g, h, links.get(f"eth{i}"))
        for ifname, link in links.items():
            if _is_eth(ifname) and int(ifname[3:]) >= len(spec.nics):  # a NIC removed
                self.ports.unplug(port_name(instance_id, int(ifname[3:])))
                g.write.link("del", index=link.index)  # and its peer on the host

    def _converge_nic(self, instance_id: str, i: int, nic: NicSpec, spec: InstanceSpec,
                      running: bool, g: _Netns, h: _Netns, inner: Link | None) -> None:
        port, eth = port_name(instance_id, i), f"eth{i}"
        outer = h.link(port)
        paired = (outer is not None and inner is not None
                  and inner.peer == outer.index and outer.peer == inner.index)
        if not paired:
            if inner is not None:
                g.write.link("del", index=inner.index)
            if outer is not None and h.link(port) is not None:  # not gone with its peer
                self.ports.unplug(port)
                h.write.link("del", index=outer.index)
            # Both ends where they belong, the guest's with its MAC, in one call; both down.
            h.write.link("add", ifname=port, kind="veth", mtu=nic.mtu,
                         peer={"ifname": eth, "net_ns_fd": self.netns_name(instance_id),
                               "address": nic.mac, "mtu": nic.mtu})
            outer, inner = h.link(port), g.link(eth)
            if outer is None or inner is None:
                raise TransientDriverError(f"veth {port} / {eth} vanished after creation")
            with in_netns(self.host_netns) if self.host_netns else contextlib.nullcontext():
                # A bridge port has no address of its own: no IPv6 link-local chatter.
                Path(f"/proc/sys/net/ipv6/conf/{port}/disable_ipv6").write_text("1")
        index = inner.index
        if inner.address != nic.mac:
            self._set_mac(g.write, index, nic.mac)
        if inner.mtu != nic.mtu:
            g.write.link("set", index=index, mtu=nic.mtu)
        if outer.mtu != nic.mtu:
            h.write.link("set", index=outer.index, mtu=nic.mtu)
        have = g.read.addresses(index)
        want = (nic.ip, nic.prefix)
        for address, prefixlen in have - {want}:
            g.write.addr("del", index=index, address=address, prefixlen=prefixlen)
        if want not in have:
            g.write.addr("add", index=index, address=nic.ip, prefixlen=nic.prefix)
        # Attached, filtered and up (the plumbing's) before the guest's end can carry a
        # frame: a veth has carrier only with both ends up.
        self.ports.plug(port, nic, spec.template.rules)
        if inner.up != running:
            g.write.link("set", index=index, state="up" if running else "down")

    @staticmethod
    def _set_mac(g: IPRoute, index: int, mac: str) -> None:
        try:
            g.link("set", index=index, address=mac)
        except NetlinkError as exc:
            if exc.code != errno.EBUSY:
                raise
            up = bool(g.link("get", index=index)[0]["flags"] & IFF_UP)
            g.link("set", index=index, state="down")
            g.link("set", index=index, address=mac)
            if up:
                g.link("set", index=index, state="up")

    def _remove(self, instance_id: str, name: str) -> None:
        # The service first: its sockets would keep the namespace (and the veths) alive.
        self._serve(instance_id, name, False)
        try:
            with contextlib.closing(iproute_in(name)) as g:
                for link in g.get_links():
                    ifname = link.get("IFLA_IFNAME")
                    if _is_eth(ifname):
                        self.ports.unplug(port_name(instance_id, int(ifname[3:])))
                        g.link("del", index=link["index"])  # the host's end goes with it
        except FileNotFoundError:
            pass
        with contextlib.suppress(FileNotFoundError):
            pyroute2_netns.remove(name)

    # -- the service ------------------------------------------------------------------------

    def _serve(self, instance_id: str, name: str, serve: bool) -> dict[str, str]:
        """Make the host's service answer for the guest (or not), check that it does, and
        return what it serves now."""
        record = self.records / instance_id
        if serve:
            content = json.dumps({"id": instance_id, "netns": name})
            if not record.exists() or record.read_text() != content:
                self.records.mkdir(parents=True, exist_ok=True)
                scratch = self.records / f".{instance_id}.tmp"
                scratch.write_text(content)
                scratch.replace(record)
        else:
            with contextlib.suppress(FileNotFoundError):
                record.unlink()
        # Asked even when the record was gone: a failed call may have left it serving.
        serving = self._serving(start=serve, only=instance_id)
        if serve and serving.get(instance_id) != name:
            raise TransientDriverError(
                f"the guest service does not answer for {instance_id} (see "
                f"{self.run_dir / 'service.log'})")
        if not serve and instance_id in serving:
            raise TransientDriverError(f"the guest service still answers for {instance_id}")
        return serving

    def _ask(self, request: str) -> dict[str, object]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(self.run_dir / "control.sock"))
            sock.sendall(request.encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        answer = json.loads(reply)
        if "error" in answer:
            raise TransientDriverError(f"guest service: {answer['error']}")
        return answer  # type: ignore[no-any-return]

    def _serving(self, *, start: bool, only: str | None = None) -> dict[str, str]:
        """What the service serves after reading its records (all, or one); {} when it is
        not running and `start` is False, else it is started first."""
        request = "sync" if only is None else f"sync {only}"
        try:
            return self._ask(request)["serving"]  # type: ignore[return-value]
        except (ConnectionRefusedError, FileNotFoundError):
            if not start:
                return {}
        with self._spawn_lock:
            try:
                return self._ask(request)["serving"]  # type: ignore[return-value]
            except (ConnectionRefusedError, FileNotFoundError):
                self._start_service()
            deadline = time.monotonic() + SERVICE_START_S
            while True:
                try:
                    return self._ask(request)["serving"]  # type: ignore[return-value]
                except (ConnectionRefusedError, FileNotFoundError):
                    if time.monotonic() > deadline:
                        raise TransientDriverError(
                            f"the guest service of {self.base} did not start (see "
                            f"{self.run_dir / 'service.log'})") from None
                    time.sleep(0.02)

    def _start_service(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-S", guest_service.__file__, "--dir", str(self.run_dir),
                "--port", str(self.service_port), "--daemonize"]
        if self.host_netns:
            argv += ["--netns", self.host_netns]
        # It forks and this child exits at once: the service is no child of the agent.
        done = subprocess.run(argv, start_new_session=True, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=10)
        if done.returncode != 0:
            raise TransientDriverError(f"cannot start the guest service: {done.stderr[-500:]}")

    def service_pid(self) -> int | None:
        """The pid of this host's guest service, None if it is not running."""
        try:
            pid = int((self.run_dir / "service.pid").read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def stop_service(self, timeout_s: float = 5.0) -> None:
        """Stop this host's guest service (its guests stop answering until the next apply)."""
        pid = self.service_pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.01)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


__all__ = ["ALIAS_TAG", "RUN_DIR", "SERVICE_PORT", "NetnsGuestDriver", "Ports", "guest_base",
           "guest_netns", "port_name"]
