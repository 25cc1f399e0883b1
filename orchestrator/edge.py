"""The edge of a fabric: an upstream router speaking BGP with the LB nodes, and a client
behind it. The test and demo topology of load balancers (PLATFORM-FACTS, "BGP from LB
nodes to a router").

`Edge(fabric, lb_hosts=["lb1", "lb2"])` makes, and always removes again:

- a router namespace `<prefix>-rtr` with IP forwarding and
  `fib_multipath_hash_policy=1` (ECMP hashes on the 5-tuple: policy 0 sent every
  connection to one node), running bird2: one passive eBGP session per LB node (AS
  `ROUTER_ASN` to AS `NODE_ASN`, hold 3 s, BFD, no graceful restart), and a kernel
  protocol with `merge paths on` that installs one route per VIP with a nexthop per node
  announcing it;
- a client namespace `<prefix>-cli` (`eth0`, default route via the router);
- per LB node an uplink: `up0` in the node's host namespace veth'd to `u<i>` in the
  router's, a /30 each, and in the node a route to the client's network via the router
  (replies to clients leave through the uplink).

Its addresses come from one random 10.x.y.0/24 that overlaps nothing on the machine, the
fabric's underlay, or `avoid` (the pools' private networks): uplinks are the /30s from
.0 (router .4i+1, node .4i+2), the client's /30 is .128 (router .129, client .130), and
the VIPs are offered from .192/26 (`vip(i)`), a block that no link holds.

What the LB nodes' speakers are told: `uplink(host)` (their address, the router's) and
`node_asn` / `router_asn`. What tests read: `router_routes(vip)` (the nexthops in the
router's kernel), `wait_routes`, `sessions()`, and real connections from the client
(`connect`, or `Prober` at a fixed rate while a node dies). `serve` stands in for a node's
dataplane where a test has none (the VIP on `lo`, a process answering the node's name).

Its namespaces are named `<prefix>-...`, so the fabric's teardown also removes them and
kills their processes if the edge's own teardown did not run; the router's files live in
`/run/orch-edge/<router netns>/`. The standard library and the `ip` and `birdc` commands.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import json
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator.fabric import Fabric, _used_networks, in_netns

ROUTER_ASN = 65000
NODE_ASN = 65001  # every LB node: equal AS paths, so the router merges their routes
HOLD_S = 3
BFD_INTERVAL_MS = 100
BFD_MULTIPLIER = 3
EDGE_RUN_DIR = Path("/run/orch-edge")
MAX_NODES = 32  # the /30s of .0/25
START_TIMEOUT_S = 5.0


# Serves one name per connection, sequentially: a hung (SIGSTOPped) one leaves its
# clients unanswered once the kernel's accept queue has them.
_STAND_IN_SERVER = """
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen(64)
answer = sys.argv[3].encode() + b"\\n"
while True:
    conn, _ = server.accept()
    try:
        conn.sendall(answer)
    except OSError:
        pass
    conn.close()
"""


@dataclass(frozen=True)
class Attempt:
    """One probe connection: when it started and ended (monotonic), and its answer."""

    started: float
    ended: float
    answer: str | None


class Prober:
    """New connections from the client to vip:port at a fixed rate while the block runs,
    each in a thread of its own pool (one that hangs does not delay the next), so that
    failures are seen at a resolution of 1/rate_hz:
    `with Prober(edge, vip, 80) as probe: ...; probe.attempts`."""

    def __init__(self, edge: Edge, vip: str, port: int, *, rate_hz: float = 100.0,
                 timeout_s: float = 0.5) -> None:
        self.edge, self.vip, self.port = edge, vip, port
        self.interval_s, self.timeout_s = 1.0 / rate_hz, timeout_s
        self.attempts: list[Attempt] = []
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=int(rate_hz * timeout_s * 2) + 8)
        self._launcher = threading.Thread(target=self._launch, daemon=True)

    def _attempt(self) -> None:
        started = time.monotonic()
        answer = self.edge.connect(self.vip, self.port, self.timeout_s)
        self.attempts.append(Attempt(started, time.monotonic(), answer))

    def _launch(self) -> None:
        tick = time.monotonic()
        while not self._stop.is_set():
            self._pool.submit(self._attempt)
            tick += self.interval_s
            self._stop.wait(max(0.0, tick - time.monotonic()))

    def __enter__(self) -> Prober:
        self._launcher.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._launcher.join()
        self._pool.shutdown(wait=True)

    def last_failure(self) -> Attempt | None:
        """The failed attempt that started last: every later one was answered."""
        failed = [a for a in self.attempts if a.answer is None]
        return max(failed, key=lambda a: a.started) if failed else None


@dataclass(frozen=True)
class Uplink:
    """One LB node's link to the router and what its BGP speaker must be told."""

    host: str
    netns: str  # the node's host namespace, holding `up0`
    router_dev: str  # `u<i>` in the router's namespace
    local_ip: str  # the node's address: its speaker's router id
    router_ip: str  # the speaker's peer
    local_asn: int = NODE_ASN
    router_asn: int = ROUTER_ASN
    protocol: str = ""  # the router's bgp protocol for this node


def free_edge_network(avoid: Iterable[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 overlapping no address or route of the machine, nor `avoid`."""
    used = [*_used_networks(), *avoid]
    for _ in range(1000):
        net = ipaddress.IPv4Network(
            f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.x.y.0/24 for an edge")


def router_config(router_id: str, uplinks: Sequence[Uplink], log: Path, bfd: bool) -> str:
    """The router's bird.conf: passive sessions to every node, ECMP into the kernel."""
    # Static BFD sessions, as on the nodes (agents.lb.bgp.render says why).
    neighbors = "".join(f"    neighbor {u.local_ip};\n" for u in uplinks)
    bfd_protocol = (f"protocol bfd {{\n    interface \"*\" {{ min rx interval {BFD_INTERVAL_MS} ms;"
                    f" min tx interval {BFD_INTERVAL_MS} ms; multiplier {BFD_MULTIPLIER}; }};\n"
                    f"{neighbors}}}\n"
                    if bfd else "")
    sessions = "".join(
        f"protocol bgp {u.protocol} {{\n"
        f"    description \"{u.host}\";\n"
        f"    local {u.router_ip} as {u.router_asn};\n"
        f"    neighbor {u.local_ip} as {u.local_asn};\n"
        "    passive on;\n"
        f"    hold time {HOLD_S}; keepalive time 1;\n"
        "    connect delay time 1; connect retry time 1; error wait time 1, 5;\n"
        "    graceful restart off;\n"
        f"    bfd {'on' if bfd else 'off'};\n"
        "    ipv4 { import where net.len = 32; export none; };\n"
        "}\n"
        for u in uplinks)
    return (
        f"router id {router_id};\n"
        f"log \"{log}\" {{ info, warning, error, auth, fatal, bug }};\n"
        "timeformat log iso long ms;\n"
        "protocol device { scan time 10; }\n"
        f"{bfd_protocol}"
        "protocol kernel {\n"
        "    ipv4 { import none; export where source = RTS_BGP; };\n"
        "    merge paths on;\n"
        "}\n"
        f"{sessions}"
    )


def seconds_apart(a: float, b: float) -> float:
    """The distance between two times of day (`Edge.since`), across midnight too."""
    return abs((a - b + 43200) % 86400 - 43200)


def nexthops(routes: list[dict]) -> list[str]:
    """The gateways of `ip -j route` entries: one per nexthop of a multipath route."""
    found: list[str] = []
    for route in routes:
        if "nexthops" in route:
            found += [hop["gateway"] for hop in route["nexthops"] if "gateway" in hop]
        elif "gateway" in route:
            found.append(route["gateway"])
    return sorted(found, key=ipaddress.IPv4Address)


class Edge:
    """A router with BGP to the LB nodes and a client behind it; a context manager, used
    inside its fabric's: `with Fabric([...]) as fabric, Edge(fabric, ["lb1", "lb2"]) as edge:`.
    """

    def __init__(self, fabric: Fabric, lb_hosts: Sequence[str], *,
                 network: ipaddress.IPv4Network | None = None,
                 avoid: Iterable[ipaddress.IPv4Network] = (), bfd: bool = True) -> None:
        if not lb_hosts or len(set(lb_hosts)) != len(lb_hosts) or len(lb_hosts) > MAX_NODES:
            raise ValueError(f"1 to {MAX_NODES} distinct LB hosts, not {list(lb_hosts)}")
        self.fabric = fabric
        self.router = f"{fabric.prefix}-rtr"
        self.client = f"{fabric.prefix}-cli"
        self.bfd = bfd
        self.network = network or free_edge_network([fabric.underlay, *avoid])
        base = self.network.network_address
        self.uplinks = {
            host: Uplink(host, fabric.host(host).netns, f"u{i + 1}",
                         local_ip=str(base + 4 * i + 2), router_ip=str(base + 4 * i + 1),
                         protocol=f"node{i + 1}")
            for i, host in enumerate(lb_hosts)
        }
        self.client_network = ipaddress.IPv4Network(f"{base + 128}/30")
        self.gateway = str(base + 129)  # the router, for the client
        self.client_ip = str(base + 130)
        self.vips = ipaddress.IPv4Network(f"{base + 192}/26")
        self.router_asn = ROUTER_ASN
        self.node_asn = NODE_ASN
        self.run_dir = EDGE_RUN_DIR / self.router
        self.ctl = self.run_dir / "bird.ctl"

    # -- what the LB nodes and tests are told ---------------------------------------------

    def uplink(self, host: str) -> tuple[str, str]:
        """(the node's uplink address, its router's address)."""
        u = self.uplinks[host]
        return u.local_ip, u.router_ip

    def vip(self, i: int = 0) -> str:
        """The i-th address of the edge's VIP block (routed only by what BGP announces)."""
        return str(self.vips[i])

    def router_routes(self, vip: str) -> list[str]:
        """The nexthops of the router's kernel route to vip/32 (empty: no route)."""
        out = self._run(["ip", "-j", "-n", self.router, "route", "show", "exact",
                         f"{vip}/32"]).stdout
        return nexthops(json.loads(out or "[]"))

    def wait_routes(self, vip: str, hosts: Iterable[str], within_s: float = 30.0) -> float:
        """Seconds until the router's route to vip has exactly the nexthops of `hosts`
        (none: no route); TimeoutError with what it had otherwise."""
        want = sorted((self.uplinks[h].local_ip for h in hosts), key=ipaddress.IPv4Address)
        started = time.monotonic()
        while (have := self.router_routes(vip)) != want:
            if time.monotonic() - started > within_s:
                raise TimeoutError(f"route to {vip}: nexthops {have}, not {want}, "
                                   f"after {within_s} s; sessions {self.sessions()}")
            time.sleep(0.02)  # each look is an ip process: 50 a second at most
        return time.monotonic() - started

    def since(self, host: str) -> float:
        """When the router's session with `host` last changed state, in seconds of the day
        as bird shows it: bird converts its monotonic clock at each display, so two reads
        may differ by a millisecond; a flap moves it by a second or more (connect delay)."""
        hours, minutes, seconds = self.session_info(host).get("Since", "0:0:0").split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)

    def wait_established(self, within_s: float = 30.0, steady_s: float = 0.2) -> float:
        """Seconds until every node's session is Established and stays so for steady_s
        (no state change meanwhile); TimeoutError with the sessions otherwise."""
        started = time.monotonic()
        while True:
            if all(state == "Established" for state in self.sessions().values()):
                before = {h: self.since(h) for h in self.uplinks}
                time.sleep(steady_s)
                if all(state == "Established" for state in self.sessions().values()) and all(
                        seconds_apart(self.since(h), t) < 0.1 for h, t in before.items()):
                    return time.monotonic() - started
            if time.monotonic() - started > within_s:
                raise TimeoutError(f"sessions after {within_s} s: {self.sessions()}")
            time.sleep(0.05)

    def sessions(self) -> dict[str, str]:
        """Each LB node's BGP session as the router sees it ("Established", "Active", ...)."""
        return {host: self.session_info(host).get("BGP state", "") for host in self.uplinks}

    def session_info(self, host: str) -> dict[str, str]:
        """The router's `show protocols all` of one node's session, as key: value pairs
        ("BGP state", "Last error", "Neighbor address", ...), and "Since": when the
        protocol last changed state (a session that flapped has a new one)."""
        protocol = self.uplinks[host].protocol
        out = self._birdc("show", "protocols", "all", protocol)
        info: dict[str, str] = {}
        for line in out.splitlines():
            words = line.split()
            if words and words[0] == protocol:  # name, proto, table, state, since, info
                info["Since"] = words[4] if len(words) > 4 else ""
                continue
            key, colon, value = line.strip().partition(":")
            if colon and key and key not in info:
                info[key] = value.strip()
        return info

    def connect(self, vip: str, port: int, timeout_s: float = 1.0) -> str | None:
        """One TCP connection from the client: what the server said (stripped), or None
        (refused, reset, or no answer within timeout_s)."""
        try:
            return self.fabric.tcp(self.client, vip, port, timeout_s=timeout_s).strip() or None
        except OSError:
            return None

    def serve(self, host: str, vip: str, port: int) -> subprocess.Popen[bytes]:
        """A stand-in for an LB node's dataplane: `vip` on the node's `lo` (this kernel has
        no dummy module) and a process in its namespace answering every connection to
        vip:port with the host's name, one line. Signal it to kill or hang the node; the
        fabric's teardown kills it anyway."""
        netns = self.uplinks[host].netns
        self._run(["ip", "-n", netns, "addr", "replace", f"{vip}/32", "dev", "lo"])
        server = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-S", "-c", _STAND_IN_SERVER,
             vip, str(port), host], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with contextlib.suppress(OSError):
                if self.fabric.tcp(netns, vip, port, timeout_s=1.0).strip() == host:
                    return server
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"the stand-in server of {host} on {vip}:{port} "
                                   f"does not answer (exit {server.poll()})")
            time.sleep(0.01)

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Edge:
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.teardown()

    def setup(self) -> None:
        if shutil.which("bird") is None:
            raise RuntimeError("bird2 is not installed (.ci/setup-libvirt.sh installs it)")
        batch = [f"netns add {self.router}", f"netns add {self.client}",
                 f"link add name eth0 netns {self.client} type veth "
                 f"peer name cli0 netns {self.router}"]
        batch += [f"link add name up0 netns {u.netns} type veth "
                  f"peer name {u.router_dev} netns {self.router}"
                  for u in self.uplinks.values()]
        self._batch(None, batch)
        sysctls = {self.router: {"ipv6/conf/all/disable_ipv6": "1",
                                 "ipv6/conf/default/disable_ipv6": "1",
                                 "ipv4/ip_forward": "1",
                                 "ipv4/fib_multipath_hash_policy": "1"},
                   self.client: {"ipv6/conf/all/disable_ipv6": "1",
                                 "ipv6/conf/default/disable_ipv6": "1"}}
        for u in self.uplinks.values():
            sysctls.setdefault(u.netns, {})["ipv6/conf/up0/disable_ipv6"] = "1"
        for netns, values in sysctls.items():
            with in_netns(netns):
                for key, value in values.items():
                    Path("/proc/sys/net", key).write_text(value)
        prefix = "/30"
        self._batch(self.router, [
            "link set lo up", f"addr add {self.gateway}{prefix} dev cli0", "link set cli0 up",
            *(cmd for u in self.uplinks.values()
              for cmd in (f"addr add {u.router_ip}{prefix} dev {u.router_dev}",
                          f"link set {u.router_dev} up")),
        ])
        self._batch(self.client, [
            "link set lo up", f"addr add {self.client_ip}{prefix} dev eth0", "link set eth0 up",
            f"route add default via {self.gateway}",
        ])
        for u in self.uplinks.values():
            self._batch(u.netns, [
                f"addr add {u.local_ip}{prefix} dev up0", "link set up0 up",
                f"route add {self.client_network} via {u.router_ip} dev up0",
            ])
        self._start_router()

    def _start_router(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        conf = self.run_dir / "bird.conf"
        conf.write_text(router_config(self.gateway, list(self.uplinks.values()),
                                      self.run_dir / "bird.log", self.bfd))
        self._run(["ip", "netns", "exec", self.router, "bird", "-c", str(conf),
                   "-s", str(self.ctl), "-P", str(self.run_dir / "bird.pid")])
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Daemon is up" not in self._birdc("show", "status", check=False):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router's bird does not answer on {self.ctl}")
            time.sleep(0.02)

    def teardown(self) -> None:
        mine = [n for n in (self.router, self.client) if n in self.fabric.namespaces()]
        self.fabric.kill_processes(mine)
        for name in mine:  # the uplinks' veths go with the router's namespace
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    # -- helpers --------------------------------------------------------------------------

    def _birdc(self, *argv: str, check: bool = True) -> str:
        done = self._run(["birdc", "-s", str(self.ctl), *argv], check=check)
        return done.stdout

    @staticmethod
    def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: "
                               f"{(done.stderr or done.stdout).strip()}")
        return done

    @staticmethod
    def _batch(netns: str | None, commands: Sequence[str]) -> None:
        argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
        done = subprocess.run(argv, input="\n".join(commands) + "\n", capture_output=True,
                              text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"ip {netns or ''} -batch failed: {done.stderr.strip()}")
