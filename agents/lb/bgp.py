"""The BGP speaker of an LB node: one bird2 per node namespace announcing the VIPs it serves.

`Speaker.announce(vips)` makes bird export exactly those /32s to the upstream router (over
eBGP, next hop self), starting bird on first use and after it died, and otherwise
reconfiguring the running daemon (`birdc configure`: only the static protocol of the VIPs
changes, so the session stays up). A bird that is alive but does not answer its control
socket within 5 s (hung, or its socket removed) is replaced by a new one. A restarted
agent finds its bird by the pid file and keeps it. `close()` stops bird, whose Cease
makes the router withdraw everything at once, and removes its files. `announced()` asks
bird what it really exports, for observe and drift repair.

The settings are PLATFORM-FACTS' ("BGP from LB nodes to a router"): hold 3 s (the floor),
keepalive 1 s, connect delay and retry 1 s, error wait 1-5 s (bird's defaults of 60-300 s
made one recovery take 54 s), BFD at 100 ms x 3, and graceful restart OFF (with it the
router keeps a dead node's nexthop for 120 s). The VIP itself sits on the node's `lo`
(set by the dataplane): bird only announces it, as a blackhole route it never installs
(no kernel protocol here).

Every file is under `run_dir`: bird.conf, bird.ctl (control socket), bird.pid, bird.log.
Failures raise TransientDriverError (a daemon that does not start or answer) or
PermanentDriverError (bad input, no such namespace, bird not installed).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from agents.drivers.errors import PermanentDriverError, TransientDriverError

HOLD_S = 3
KEEPALIVE_S = 1
BFD_INTERVAL_MS = 100
BFD_MULTIPLIER = 3
BGP_PROTOCOL = "uplink"
STATIC_PROTOCOL = "vips"
BIRDC_TIMEOUT_S = 5.0  # longer than the hold time: a bird this slow has lost its session
START_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 3.0
_SOCKET_PATH_MAX = 107  # sun_path
_RECONFIGURED = ("Reconfigured", "Reconfiguration in progress",
                 "Reconfiguration already in progress")


def _address(value: str, what: str) -> str:
    """A unicast IPv4 address as a plain string ("10.0.0.1/32" is accepted for a VIP)."""
    try:
        if "/" in value:
            net = ipaddress.IPv4Network(value)
            if net.prefixlen != 32:
                raise ValueError("not a /32")
            addr = net.network_address
        else:
            addr = ipaddress.IPv4Address(value)
    except ValueError as exc:
        raise PermanentDriverError(f"{what} {value!r} is not an IPv4 address: {exc}") from exc
    if addr.is_unspecified or addr.is_multicast or addr.is_loopback:
        raise PermanentDriverError(f"{what} {value!r} is not a unicast address")
    return str(addr)


def _asn(value: int, what: str) -> int:
    if not 1 <= value <= 0xFFFFFFFF:
        raise PermanentDriverError(f"{what} {value} is not an AS number")
    return value


def render(router_id: str, local_asn: int, peer_ip: str, peer_asn: int, vips: set[str],
           log: Path, bfd: bool = True) -> str:
    """bird.conf of an LB node. Deterministic: the same VIPs give the same text, so a
    reconfigure with nothing new touches no protocol."""
    routes = "".join(f"    route {vip}/32 blackhole;\n"
                     for vip in sorted(vips, key=ipaddress.IPv4Address))
    # The BFD session is static (a `neighbor`), not only BGP's request: a request's session
    # is removed and made anew with every BGP restart, and the router's half of the old
    # one then came Up from a resumed (SIGCONT) node's stale packets and expired 3 s
    # later, taking the new BGP session down with it.
    bfd_protocol = (f"protocol bfd {{\n    interface \"*\" {{ min rx interval {BFD_INTERVAL_MS} ms;"
                    f" min tx interval {BFD_INTERVAL_MS} ms; multiplier {BFD_MULTIPLIER}; }};\n"
                    f"    neighbor {peer_ip};\n}}\n"
                    if bfd else "")
    return (
        f"router id {router_id};\n"
        f"log \"{log}\" {{ info, warning, error, auth, fatal, bug }};\n"
        "timeformat log iso long ms;\n"
        "protocol device { scan time 10; }\n"
        f"{bfd_protocol}"
        f"protocol static {STATIC_PROTOCOL} {{\n    ipv4;\n{routes}}}\n"
        f"protocol bgp {BGP_PROTOCOL} {{\n"
        f"    local as {local_asn};\n"
        f"    neighbor {peer_ip} as {peer_asn};\n"
        f"    hold time {HOLD_S}; keepalive time {KEEPALIVE_S};\n"
        "    connect delay time 1; connect retry time 1; error wait time 1, 5;\n"
        "    graceful restart off;\n"
        f"    bfd {'on' if bfd else 'off'};\n"
        f"    ipv4 {{ import none; export where proto = \"{STATIC_PROTOCOL}\"; }};\n"
        "}\n"
    )


def parse_exported(text: str) -> set[str]:
    """The /32 addresses in `birdc show route export ...` output ("No valid tables" while
    the session is down: nothing is exported then)."""
    found = set()
    for line in text.splitlines():
        prefix = line.split(" ", 1)[0]
        if prefix.endswith("/32"):
            with contextlib.suppress(ValueError):
                found.add(str(ipaddress.IPv4Network(prefix).network_address))
    return found


def _alive(pid: int) -> bool:
    """Running or stopped, not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class Speaker:
    """bird2 announcing VIP/32s from one LB node (namespace `netns`, None: this one) to
    its router `peer_ip` (AS `peer_asn`) as AS `local_asn`."""

    def __init__(self, netns: str | None, run_dir: Path, router_id: str, local_asn: int,
                 peer_ip: str, peer_asn: int, *, bfd: bool = True) -> None:
        self.netns = netns
        self.run_dir = Path(run_dir)
        self.router_id = _address(router_id, "router id")
        self.local_asn = _asn(local_asn, "local AS")
        self.peer_ip = _address(peer_ip, "peer")
        self.peer_asn = _asn(peer_asn, "peer AS")
        self.bfd = bfd
        self.conf = self.run_dir / "bird.conf"
        self.ctl = self.run_dir / "bird.ctl"
        self.pidfile = self.run_dir / "bird.pid"
        self.log = self.run_dir / "bird.log"
        if len(str(self.ctl)) > _SOCKET_PATH_MAX:
            raise PermanentDriverError(f"control socket path too long: {self.ctl}")
        self._lock = threading.Lock()  # one change of bird at a time, from any thread

    # -- the interface -----------------------------------------------------------------------

    def announce(self, vips: set[str]) -> None:
        """Announce exactly `vips` (and withdraw any other VIP this speaker announced)."""
        wanted = {_address(vip, "VIP") for vip in vips}
        self._check_environment()
        with self._lock:
            self._announce(wanted)

    def _announce(self, wanted: set[str]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        text = render(self.router_id, self.local_asn, self.peer_ip, self.peer_asn, wanted,
                      self.log, self.bfd)
        tmp = self.conf.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.conf)  # bird never reads half a file
        pid = self.pid()
        if pid is not None:
            try:
                out = self._birdc("configure")
            except TransientDriverError:
                # Alive but not answering (hung, or its socket gone): its session is lost
                # with the hold timer anyway, and a new bird is the quickest way back.
                self._stop(pid)
            else:
                if not any(marker in out for marker in _RECONFIGURED):
                    raise PermanentDriverError(f"bird refused its configuration: {out.strip()}")
                return
        self._start()

    def announced(self) -> set[str]:
        """The VIPs bird exports to the router now: empty while bird is not running or
        its session is not established."""
        if self.pid() is None:
            return set()
        return parse_exported(self._birdc(f"show route export {BGP_PROTOCOL}"))

    def session(self) -> str | None:
        """The BGP session's state as bird says it ("Established", "Active", "Connect",
        ...); None while bird is not running."""
        if self.pid() is None:
            return None
        for line in self._birdc(f"show protocols all {BGP_PROTOCOL}").splitlines():
            key, _, value = line.strip().partition(":")
            if key == "BGP state":
                return value.strip()
        return None

    def close(self) -> None:
        """Stop bird (the router withdraws every VIP on its Cease) and remove its files."""
        with self._lock:
            pid = self.pid()
            if pid is not None:
                self._withdraw()
                self._stop(pid)
            for path in (self.conf, self.conf.with_suffix(".tmp"), self.ctl, self.pidfile,
                         self.log):
                path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # only if nothing else lives there

    def pid(self) -> int | None:
        """bird's pid, if the pid file names a live bird of this run_dir."""
        try:
            pid = int(self.pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        if str(self.ctl).encode() not in cmdline or not _alive(pid):
            return None  # a stale pid file, maybe of a pid reused since
        return pid

    # -- the daemon --------------------------------------------------------------------------

    def _check_environment(self) -> None:
        if shutil.which("bird") is None or shutil.which("birdc") is None:
            raise PermanentDriverError("bird2 is not installed (bird, birdc)")
        if self.netns is not None and not Path("/run/netns", self.netns).exists():
            raise PermanentDriverError(f"no network namespace {self.netns}")

    def _argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else list(argv)

    def _start(self) -> None:
        for stale in (self.ctl, self.pidfile):
            stale.unlink(missing_ok=True)
        argv = self._argv("bird", "-c", str(self.conf), "-s", str(self.ctl),
                          "-P", str(self.pidfile))
        try:
            # bird parses its configuration, then forks into the background: the exit
            # status is the parse's.
            done = subprocess.run(argv, capture_output=True, text=True,
                                  timeout=START_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise TransientDriverError(f"bird did not start within {START_TIMEOUT_S} s") from exc
        if done.returncode != 0:
            raise PermanentDriverError(
                f"bird refused to start: {(done.stderr or done.stdout).strip()}")
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.pid() is not None:
                with contextlib.suppress(TransientDriverError):
                    if "Daemon is up" in self._birdc("show status"):
                        return
            if time.monotonic() > deadline:
                raise TransientDriverError(
                    f"bird started but its control socket {self.ctl} does not answer")
            time.sleep(0.02)

    def _withdraw(self) -> None:
        """Close the BGP session first, with a Cease (Administrative shutdown), and wait
        until bird says it is down: bird's own SIGTERM path may stop its BFD sessions
        first, and a router that sees BFD go down before the Cease arrives tears the
        session down as a failure, not as a withdrawal."""
        with contextlib.suppress(TransientDriverError):
            self._birdc(f"disable {BGP_PROTOCOL}")
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while self.session() == "Established" and time.monotonic() < deadline:
                time.sleep(0.01)

    def _stop(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)  # a stopped bird cannot act on SIGTERM
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.01)

    def _birdc(self, command: str) -> str:
        """One birdc command's output; TransientDriverError if bird does not answer."""
        try:
            done = subprocess.run(["birdc", "-s", str(self.ctl), *command.split()],
                                  capture_output=True, text=True, timeout=BIRDC_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise TransientDriverError(
                f"bird did not answer {command!r} within {BIRDC_TIMEOUT_S} s") from exc
        if done.returncode != 0:
            raise TransientDriverError(
                f"birdc {command!r}: {(done.stderr or done.stdout).strip()}")
        return done.stdout
