"""LB driver: converges the load balancers an LB node serves to the jobs it is given.

A job (`LbSpec`) is one balancer as this node must serve it, in full: VIP, services,
backends (with the service ports the fold counts each healthy on), hash seed, and this
node's own port on the backends' network. Applying it:

1. the port: a veth pair in the node's namespace, one end (``names.port_name("lb.<id>",
   0)``) plugged into the network's segment bridge by `agents.net.ports.PortPlumbing`
   (segment, port firewall, master, up), the other (``ol<hash>``) carrying the fold's MAC
   and address: the node reaches the backends over VXLAN like any guest;
2. ``net.ipv4.ip_forward=1``, and the VIP as a /32 on ``lo`` (what the BGP speaker
   announces);
3. the nftables of the balancer (`agents.lb.nftplan`): DNAT VIP:port -> backend per
   strategy, SNAT (masquerade) out of the node's ports, in ONE transaction of only what
   differs from what the node holds; the UDP conntrack entries of backends that left a
   UDP service are deleted (a TCP flow stays on its backend until it ends);
4. the generation, last, in the alias of the port's node end
   (``orch:lb:<id>:<generation>:<vip>``), which is how a restarted agent adopts it;
5. the health prober (`agents.lb.health`) probes every listed backend on every service
   from the node itself, and each threshold crossing is published as `BackendHealth`
   through the reporter the agent gives (`set_reporter`);
6. with BGP configured, the node's `Speaker` announces the VIPs it serves (all of them,
   every time: the set is level-triggered too).

A removal (spec None) undoes all of it: probes, table, UDP entries to the VIP, port,
VIP address, announcement.

The driver remembers the table it last wrote per balancer with a tag that the dispatch
rule's comment carries; while the kernel shows that tag, the next job is planned against
that memory (reading 65,537 map elements back would cost more than the whole update).
A restarted agent, or a table changed behind its back, gets the balancer's table replaced
whole, once, in one transaction (established flows live in conntrack and survive it).

The agent runs its calls in a thread, one call per balancer at a time. Failures are
TransientDriverError (retry) or PermanentDriverError (the spec cannot be served).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import re
import secrets
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nftables
import structlog
from pyroute2 import IPRoute, NetlinkError

from agents.drivers.errors import PermanentDriverError, TransientDriverError
from agents.lb import nftplan
from agents.lb.health import Check, Prober, Target, Transition
from agents.net import names
from agents.net.errors import NetError
from agents.net.host import DEFAULT_TIMEOUT, HostNet
from agents.net.iproute import iproute_in
from agents.net.nfnl import NftReader
from agents.net.ports import PortPlumbing
from schemas import commands as c
from schemas.codec import printable
from schemas.specs import LbSpec, NicSpec

log = structlog.get_logger()
RUN_DIR = Path("/run/orch-lb")
NFPROTO_IPV4 = 2
IFF_UP = 0x1
NODE_END_PREFIX = "ol"
_ALIAS = re.compile(r"^orch:lb:([a-z0-9][a-z0-9_-]{0,62}):(\d+):(\d{1,3}(?:\.\d{1,3}){3})$")
_PERMANENT_ERRNOS = frozenset({errno.EINVAL, errno.ERANGE, errno.EOPNOTSUPP, errno.EPERM})

Reporter = Callable[[c.Command], None]


@dataclass(frozen=True)
class BgpConfig:
    """The node's BGP session to its upstream router."""

    peer_ip: str
    peer_asn: int
    local_asn: int
    router_id: str


@dataclass(frozen=True)
class Held:
    """What the kernel says of one balancer here (the alias of its port's node end)."""

    lb: str
    generation: int
    vip: str


def port_names(lb_id: str) -> tuple[str, str]:
    """(bridge end, node end) of the balancer's port: ids carry no dot, so ``lb.<id>``
    never names an instance's NIC."""
    digest = hashlib.sha256(f"lb.{lb_id}".encode()).hexdigest()
    return names.port_name(f"lb.{lb_id}", 0), f"{NODE_END_PREFIX}{digest[:10]}"


def alias(lb_id: str, generation: int, vip: str) -> str:
    return f"orch:lb:{lb_id}:{generation}:{vip}"


def health_cmd_id(host: str, t: Transition, token: str) -> str:
    """The idempotency key of a report: what it is about, and which crossing of which
    prober run (``token`` differs per driver start, so a restart never reuses a key)."""
    target = t.target
    key = (f"health-{host}-{target.lb}-{target.instance}-{target.port}-{target.generation}"
           f"-{token}{t.seq}").replace("_", ".")
    if len(key) <= 128:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return f"health-{digest}-{target.generation}-{token}{t.seq}"


def _link(ipr: IPRoute, name: str) -> Any | None:
    found = ipr.link_lookup(ifname=name)
    return ipr.link("get", index=found[0])[0] if found else None


class LbDriver:
    blocking = True

    def __init__(self, host: str, underlay_ip: str, netns: str | None = None, *,
                 bgp: BgpConfig | None = None, run_dir: Path = RUN_DIR,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        """``host``: the node's name (the source of its reports); ``underlay_ip``: its VTEP
        address; ``netns``: its network namespace (None: the agent's own); ``bgp``: its
        router (None: no announcement, e.g. routes set by hand)."""
        self.host = host
        self.underlay_ip = underlay_ip
        self.netns = netns
        self._token = secrets.token_hex(3)
        self._writes = 0
        self.transactions = 0  # nft transactions written for balancers (tests count them)
        self._held: dict[str, tuple[str, nftplan.LbTables]] = {}  # lb -> (tag, tables)
        self._lock = threading.Lock()
        self._reporter: Reporter | None = None
        self._nft: nftables.Nftables | None = None  # reads only, in the namespace thread
        with self._errors(f"network namespace {netns or '(own)'}"):
            self.net = HostNet.open(netns, timeout)
            self.ports = PortPlumbing(netns, timeout=timeout)
        self.prober = Prober(netns, self._on_transition)
        self.speaker = None
        if bgp is not None:
            from agents.lb.bgp import Speaker  # only nodes with a router run bird

            self.speaker = Speaker(netns, run_dir / (netns or host), bgp.router_id,
                                   bgp.local_asn, bgp.peer_ip, bgp.peer_asn)

    def set_reporter(self, reporter: Reporter) -> None:
        """Where health transitions go (the agent's publisher, from any thread)."""
        self._reporter = reporter

    def close(self) -> None:
        self.prober.close()
        if self.speaker is not None:
            self.speaker.close()  # the router withdraws every VIP of this node
        self.ports.close()
        self.net.close()

    def __enter__(self) -> LbDriver:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except nftplan.PlanError as exc:
            raise PermanentDriverError(f"{what}: {exc}") from exc
        except NetError as exc:
            kind = TransientDriverError if exc.transient else PermanentDriverError
            raise kind(f"{what}: {exc}") from exc
        except NetlinkError as exc:
            kind = (PermanentDriverError if exc.code in _PERMANENT_ERRNOS
                    else TransientDriverError)
            raise kind(f"{what}: {exc}") from exc
        except (OSError, subprocess.SubprocessError) as exc:
            raise TransientDriverError(f"{what}: {exc}") from exc

    # -- reading ----------------------------------------------------------------------------

    def _aliases(self) -> dict[str, Held]:
        with contextlib.closing(iproute_in(self.netns)) as ipr:
            out = {}
            for link in ipr.get_links():
                match = _ALIAS.match(link.get("IFLA_IFALIAS") or "")
                if match and link.get("IFLA_IFNAME", "").startswith(NODE_END_PREFIX):
                    out[match[1]] = Held(match[1], int(match[2]), match[3])
            return out

    def _tables(self) -> set[str]:
        """Balancers with a table here (read over netlink: libnftables would load the
        whole ruleset, every balancer's map elements, at every resync)."""
        names = NftReader(self.net.nfnl).tables(NFPROTO_IPV4)
        return {lb for name in names if (lb := nftplan.lb_of_table(name)) is not None}

    def observe(self) -> dict[str, str]:
        """Every balancer with anything here: "serving", or "partial" (a table without its
        port's generation, left by an apply or removal cut short)."""
        with self._errors("observe balancers"):
            held = self._aliases()
            return {lb: "serving" if lb in held else "partial"
                    for lb in held.keys() | self._tables()}

    def generations(self) -> dict[str, int]:
        with self._errors("observe balancers"):
            return {lb: h.generation for lb, h in self._aliases().items()}

    def held_tables(self, lb_id: str) -> nftplan.LbTables | None:
        """The table this driver last wrote, if the kernel still shows its tag."""
        remembered = self._held.get(lb_id)
        if remembered is None:
            return None
        tag, tables = remembered
        rules = NftReader(self.net.nfnl).rules(NFPROTO_IPV4, nftplan.table_name(lb_id),
                                               "prerouting")
        return tables if len(rules) == 1 and rules[0].comment == tag else None

    def counters(self, lb_id: str) -> dict[str, int]:
        """New flows DNATed here per service ("tcp_80": packets its rule counted)."""
        table = nftplan.table_name(lb_id)

        def listing(chain: str) -> Callable[[], tuple[int, str, str]]:
            def run() -> tuple[int, str, str]:
                if self._nft is None:
                    self._nft = nftables.Nftables()
                    self._nft.set_json_output(True)
                return self._nft.cmd(f"list chain {nftplan.FAMILY} {table} {chain}")
            return run

        out: dict[str, int] = {}
        with self._errors(f"counters of {lb_id}"):
            for chain in NftReader(self.net.nfnl).chains(NFPROTO_IPV4, table):
                if not chain.startswith("svc_"):
                    continue
                listed = json.loads(self.net.inside(listing(chain), "list chain")[1])
                for item in listed["nftables"]:
                    for expr in item.get("rule", {}).get("expr", []):
                        if "counter" in expr:
                            out[chain[4:]] = expr["counter"]["packets"]
        return out

    # -- converging -------------------------------------------------------------------------

    def apply(self, lb_id: str, spec: LbSpec | None, generation: int) -> str:
        """Converge one balancer to ``spec`` (None: absent here); returns "serving" or
        "absent". A job older than the generation held changes nothing."""
        with self._errors(f"load balancer {lb_id}"):
            held = self._aliases().get(lb_id)
            if held is not None and held.generation > generation:
                return "serving"
            if spec is None:
                self._remove(lb_id, held)
                return "absent"
            return self._apply(lb_id, spec, generation, held)

    def _apply(self, lb_id: str, spec: LbSpec, generation: int, held: Held | None) -> str:
        bridge_end, node_end = port_names(lb_id)
        wanted = nftplan.desired(spec, f"{NODE_END_PREFIX}*")  # checks the spec first
        if held is not None and held.vip != spec.vip:
            self._vip(held.vip, present=False, keep=lb_id)
        self._port(bridge_end, node_end, spec.port)
        self.net.sysctl("net.ipv4.ip_forward", "1")
        self._vip(spec.vip, present=True)
        before = self.held_tables(lb_id)
        if before != wanted:  # the same job again (a resync) writes nothing
            with self._lock:
                self._writes += 1
                tag = f"{nftplan.LAYOUT} {self._token}:{self._writes}"
            self._held.pop(lb_id, None)  # until the transaction is known to be in
            self.net.nft(nftplan.plan(lb_id, before, wanted, tag), f"load balancer {lb_id}")
            self._held[lb_id] = (tag, wanted)
            self.transactions += 1
            self._forget(spec.vip, nftplan.removed_backends(before, wanted, "udp"))
        self._set_alias(node_end, alias(lb_id, generation, spec.vip))
        self.prober.update(lb_id, self._targets(lb_id, spec, generation))
        self._announce()
        return "serving"

    def _remove(self, lb_id: str, held: Held | None) -> None:
        self.prober.update(lb_id, [])
        self._held.pop(lb_id, None)
        self.net.nft(nftplan.removal(lb_id), f"remove load balancer {lb_id}")
        if held is not None:
            self._forget(held.vip, None)
        bridge_end, node_end = port_names(lb_id)
        self.ports.unplug(bridge_end)
        with contextlib.closing(iproute_in(self.netns)) as ipr:
            link = _link(ipr, node_end) or _link(ipr, bridge_end)
            if link is not None:
                ipr.link("del", index=link["index"])  # its peer goes with it
        if held is not None:
            self._vip(held.vip, present=False, keep=lb_id)
        self._announce()

    def remove(self, lb_id: str) -> bool:
        """Remove a balancer no job wants here; False if nothing of it was here."""
        if lb_id not in self.observe():
            return False
        self.apply(lb_id, None, 1 << 62)
        return True

    # -- the pieces -------------------------------------------------------------------------

    def _port(self, bridge_end: str, node_end: str, nic: NicSpec) -> None:
        with contextlib.closing(iproute_in(self.netns)) as ipr:
            outer, inner = _link(ipr, bridge_end), _link(ipr, node_end)
            paired = (outer is not None and inner is not None
                      and inner.get("IFLA_LINK") == outer["index"]
                      and outer.get("IFLA_LINK") == inner["index"])
            if not paired:
                for link in (outer, inner):
                    if link is not None and _link(ipr, link.get("IFLA_IFNAME")) is not None:
                        self.ports.unplug(link.get("IFLA_IFNAME"))
                        ipr.link("del", index=link["index"])
                ipr.link("add", ifname=bridge_end, kind="veth", mtu=nic.mtu,
                         peer={"ifname": node_end, "address": nic.mac, "mtu": nic.mtu})
                inner = _link(ipr, node_end)
            assert inner is not None
            for end in (bridge_end, node_end):  # an IPv4-only port: no IPv6 chatter
                self.net.sysctl(f"net.ipv6.conf.{end}.disable_ipv6", "1", optional=True)
            index = inner["index"]
            if inner.get("IFLA_ADDRESS") != nic.mac:
                ipr.link("set", index=index, state="down")
                ipr.link("set", index=index, address=nic.mac)
            if inner.get("IFLA_MTU") != nic.mtu:
                ipr.link("set", index=index, mtu=nic.mtu)
            have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                    for a in ipr.get_addr(family=socket.AF_INET, index=index)}
            want = (nic.ip, nic.prefix)
            for address, prefixlen in have - {want}:
                ipr.addr("del", index=index, address=address, prefixlen=prefixlen)
            if want not in have:
                ipr.addr("add", index=index, address=nic.ip, prefixlen=nic.prefix)
            if not _link(ipr, node_end)["flags"] & IFF_UP:
                ipr.link("set", index=index, state="up")
        # Behind its firewall (replies and probes' answers only), in the segment, up.
        self.ports.plug(bridge_end, nic, (), self.underlay_ip)

    def _vip(self, vip: str, *, present: bool, keep: str | None = None) -> None:
        """The VIP /32 on ``lo``; removed only if no other balancer here has it."""
        if not present and any(h.vip == vip and h.lb != keep
                               for h in self._aliases().values()):
            return
        with contextlib.closing(iproute_in(self.netns)) as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            have = any(a.get_attr("IFA_ADDRESS") == vip and a["prefixlen"] == 32
                       for a in ipr.get_addr(family=socket.AF_INET, index=lo))
            if not ipr.link("get", index=lo)[0]["flags"] & IFF_UP:
                ipr.link("set", index=lo, state="up")
            if present and not have:
                ipr.addr("add", index=lo, address=vip, prefixlen=32)
            elif not present and have:
                ipr.addr("del", index=lo, address=vip, prefixlen=32)

    def _set_alias(self, node_end: str, text: str) -> None:
        with contextlib.closing(iproute_in(self.netns)) as ipr:
            link = _link(ipr, node_end)
            if link is None:
                raise TransientDriverError(f"port {node_end} vanished")
            if link.get("IFLA_IFALIAS") != text:
                ipr.link("set", index=link["index"], ifalias=text)

    def _forget(self, vip: str, backends: list[tuple[int, str]] | None) -> None:
        """Delete UDP conntrack entries to the VIP: those DNATed to ``backends`` ((service
        port, address) pairs), or all of them (None)."""
        wanted = [["-D", "-p", "udp", "--orig-dst", vip]] if backends is None else [
            ["-D", "-p", "udp", "--orig-dst", vip, "--orig-port-dst", str(port),
             "--reply-src", ip] for port, ip in backends]
        for args in wanted:
            argv = ["conntrack", *args]
            if self.netns:
                argv = ["ip", "netns", "exec", self.netns, *argv]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            # Exit 1 with "0 flow entries" is nothing to delete; anything else is an error.
            if done.returncode != 0 and "0 flow entries" not in done.stderr:
                raise TransientDriverError(f"conntrack {' '.join(args)}: "
                                           f"{done.stderr.strip()[:300]}")

    def _targets(self, lb_id: str, spec: LbSpec, generation: int) -> list[Target]:
        out = []
        for service in spec.services:
            h = service.health
            check = Check(h.interval_ms / 1000, h.timeout_ms / 1000, h.rise, h.fall,
                          protocol=service.protocol,
                          http_path=h.http_path)
            out += [Target(lb_id, b.instance, service.port, b.ip, service.target_port, check,
                           generation, fold_healthy=service.port in b.healthy)
                    for b in spec.backends]
        return out

    def _on_transition(self, t: Transition) -> None:
        """A backend crossed a threshold: tell the fold (prober thread)."""
        target = t.target
        cmd = c.BackendHealth(
            cmd_id=health_cmd_id(self.host, t, self._token), id=target.lb,
            instance=target.instance, port=target.port, healthy=t.healthy,
            generation=target.generation, detail=printable(t.detail))
        log.info("backend_health", lb=target.lb, instance=target.instance, port=target.port,
                 healthy=t.healthy, detail=t.detail)
        if self._reporter is None:
            log.warning("backend_health_unreported", lb=target.lb, instance=target.instance)
            return
        self._reporter(cmd)

    def _announce(self) -> None:
        if self.speaker is None:
            return
        with self._lock:
            self.speaker.announce({h.vip for h in self._aliases().values()})


__all__ = ["BgpConfig", "LbDriver", "alias", "health_cmd_id", "port_names"]
