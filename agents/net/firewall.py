"""Guest ports' firewalls in nftables: anti-spoofing out of a port, its rules into it.

This kernel has no conntrack in the bridge family, so the work is split in two tables.
Their chains are fixed and shared by every port; a port is only elements of sets and maps
(layout "orch:v2"), so that writing one costs the same with 1 port or 1,000 (libnftables
loads every chain and set before a transaction that adds a rule: per-port chains, as in
"orch:v1", made N ports cost N^2).

``table bridge orch_ports`` (stateless, every frame of a bridge):
- sets ``ports`` (every guest port), ``port_macs`` (port . its MAC), ``port_ips``
  (port . its IP, the element's comment naming the port's segment bridge), map
  ``to_mark`` (port : its mark, one per port, allocated here);
- ``prerouting`` (priority -200, before the bridge learns the source MAC and before
  br_netfilter hands IPv4 to the inet table): ``iifname @ports jump guard``; ``guard``:
  ether saddr must be the port's MAC; ARP must carry its MAC and IP; IPv4 its IP; any
  other ethertype (IPv6, VLAN tags, ...) is dropped. Checking before learning means a
  spoofed frame cannot even move a MAC to the guest's port.
- ``forward``: ``meta mark set oifname map @to_mark``: a frame leaving through a port
  carries that port's mark, for the inet table.

``table inet orch_guests`` (stateful; sees bridged IPv4 through br_netfilter):
- ``prerouting`` (priority raw): ``iifname vmap @zone_of`` jumps to ``zone_<n>``, which
  sets the conntrack zone of the segment (the bridge is the input device there), so that
  two networks with the same addresses on one host never share a connection entry;
- ``forward``: a mark of ours (``MARK_BASE``/16) jumps to ``guest``: established/related
  accepted, invalid dropped, ICMP echo requests accepted (the rules speak only of TCP and
  UDP; ping is always allowed), then ``meta mark . meta l4proto . th dport . ip saddr
  @allow accept`` (the set holds each port's rules under its mark), then drop.

Reads go through `NftReader` (nfnetlink, in microseconds), into a `_View` of both tables
kept between converges and trusted only at the ruleset generation it was read at (any
writer moves it): a converge then reads one number, and rereads the tables only if someone
else wrote. Writes go through libnftables, only what differs, and ports converging at the
same time share one transaction (see `Firewall.converge`). A port whose MAC or IP changed
has its stale elements replaced; a table flushed or deleted by hand is repaired by the next
converge; tables of another layout (an older agent's "orch:v1": chains ``in_<port>`` and
``to_<port>``, sets ``allow_<port>``, maps ``from_port`` and ``to_port``) are replaced, with
every port they held carried over, in one transaction.

A rule that is removed also cuts what it allowed: conntrack entries to the guest matched
by the removed (protocol, port, source range) and by no remaining one are deleted; a port
removed forgets every connection of its address.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import ipaddress
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from agents.net import names
from agents.net.errors import (
    NetError,
    NetlinkError,
    PermanentNetError,
    TransientNetError,
    classify,
)
from agents.net.host import HostNet
from agents.net.nfnl import NFPROTO_BRIDGE, NFPROTO_INET, Element, Flow, NftReader
from agents.net.rtnl import mac_str
from schemas.specs import SecurityRule

LAYOUT = "orch:v2"  # in every comment we check: a new layout rewrites every chain
OLD_LAYOUT = "orch:v1"  # per-port chains and sets, carried over (see `_View.older`)
MARK_BASE = 0x4F520000  # "OR": marks of guest ports are MARK_BASE + 1 .. MARK_BASE + 65535
MARK_SPAN = 0xFFFF
MARK_MASK = 0xFFFF0000  # a mark is ours if it is MARK_BASE under this mask
BRIDGE_PRIORITY = -200  # bridge "filter": before br_netfilter (0) and before learning
RAW_PRIORITY = -300  # inet "raw": before conntrack picks its zone
PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
_PROTO_NAMES = {v: k for k, v in PROTOCOLS.items()}
_U32 = struct.Struct("=I")  # a mark as a map's data: host order
_ZONE = re.compile(r"^zone_(\d+)$")

B = {"family": "bridge", "table": names.PORTS_TABLE}
I = {"family": "inet", "table": names.GUESTS_TABLE}  # noqa: E741
BASE_COMMENT = f"{LAYOUT} base"

Json = dict[str, object]


@dataclass(frozen=True)
class PortPolicy:
    """What a port's firewall must say: whose it is and what it lets in."""

    port: str
    bridge: str  # its segment's bridge
    mac: str
    ip: str
    rules: tuple[SecurityRule, ...]


# A range of the allow set: (protocol number, port, first address, last address).
Allow = tuple[int, int, int, int]


def allowed(rules: Iterable[SecurityRule]) -> set[Allow]:
    """The allow set's elements: per (protocol, port), the rules' sources collapsed, so no
    two elements overlap (a concatenated interval set refuses overlapping elements)."""
    sources: dict[tuple[int, int], list[ipaddress.IPv4Network]] = {}
    for rule in rules:
        try:
            net = ipaddress.IPv4Network(rule.source, strict=True)
        except ValueError as exc:
            raise PermanentNetError(f"rule {rule.protocol}/{rule.port}: source "
                                    f"{rule.source} is not a network address") from exc
        sources.setdefault((PROTOCOLS[rule.protocol], rule.port), []).append(net)
    out: set[Allow] = set()
    for (proto, port), nets in sources.items():
        for net in ipaddress.collapse_addresses(nets):
            out.add((proto, port, int(net.network_address), int(net.broadcast_address)))
    return out


# -- elements as the kernel keys them (each part of a concatenation padded to 4 bytes) ------

def _ifname(key: bytes) -> str:
    return key[:names.IFNAMSIZ].split(b"\0", 1)[0].decode(errors="replace")


def _range(element: Element, offset: int) -> Allow | None:
    """The (protocol, port, source range) of an allow element whose key has it at
    ``offset`` (v2: after the mark; v1's per-port sets: first), in network order."""
    key, end = element.key, element.key_end or element.key
    if len(key) != offset + 12 or len(end) != offset + 12:
        return None
    return (key[offset], int.from_bytes(key[offset + 4:offset + 6], "big"),
            int.from_bytes(key[offset + 8:offset + 12], "big"),
            int.from_bytes(end[offset + 8:offset + 12], "big"))


def _allow_json(mark: int, allow: Allow) -> Json:
    proto, port, first, last = allow
    start, end = ipaddress.IPv4Address(first), ipaddress.IPv4Address(last)
    nets = list(ipaddress.summarize_address_range(start, end))
    # A single address as a /32: nft 1.0.6 cannot delete "mark . ... . 10.0.0.1" from a
    # concatenated interval set (ENOENT), though it adds it; the /32 form it can.
    addr: object = {"prefix": {"addr": str(start), "len": nets[0].prefixlen}} \
        if len(nets) == 1 else {"range": [str(start), str(end)]}
    return {"concat": [mark, _PROTO_NAMES.get(proto, proto), port, addr]}


def _ip_json(port: str, ip: str, bridge: str) -> Json:
    """A port_ips element; its comment names the port's bridge, whose conntrack zone holds
    the connections to forget when the port goes."""
    return {"elem": {"val": {"concat": [port, ip]}, "comment": bridge}}


# -- rules ----------------------------------------------------------------------------------

def _match(op: str, left: Json, right: object) -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _of_port(value: Json) -> Json:
    return {"concat": [_meta("iifname"), value]}


def _jump(target: str) -> Json:
    return {"jump": {"target": target}}


DROP: Json = {"drop": None}
ACCEPT: Json = {"accept": None}
_CT_STATE: Json = {"ct": {"key": "state"}}


@dataclass(frozen=True)
class _Table:
    """One of our tables as this layout writes it: sets and maps, chains and their rules
    (the last rule of each carries BASE_COMMENT, which says the chain is complete)."""

    family: int
    base: Json
    sets: tuple[Json, ...]  # the objects of their ``add`` commands
    chains: dict[str, tuple[Json, list[list[Json]]]]  # name -> (hook, or {}; rules)

    @property
    def name(self) -> str:
        return str(self.base["table"])

    @property
    def set_names(self) -> set[str]:
        return {str(next(iter(s.values()))["name"]) for s in self.sets}  # type: ignore[index]


def _hook(hook: str, prio: int) -> Json:
    return {"type": "filter", "hook": hook, "prio": prio, "policy": "accept"}


BRIDGE = _Table(NFPROTO_BRIDGE, B, (
    {"set": {**B, "name": "ports", "type": "ifname"}},
    {"set": {**B, "name": "port_macs", "type": ["ifname", "ether_addr"]}},
    {"set": {**B, "name": "port_ips", "type": ["ifname", "ipv4_addr"]}},
    {"map": {**B, "name": "to_mark", "type": "ifname", "map": "mark"}},
), {
    "guard": ({}, [
        [_match("!=", _of_port(_payload("ether", "saddr")), "@port_macs"), DROP],
        [_match("!=", _of_port(_payload("arp", "saddr ether")), "@port_macs"), DROP],
        [_match("!=", _of_port(_payload("arp", "saddr ip")), "@port_ips"), DROP],
        [_match("==", _payload("ether", "type"), "arp"), ACCEPT],
        [_match("!=", _of_port(_payload("ip", "saddr")), "@port_ips"), DROP],
        [_match("==", _payload("ether", "type"), "ip"), ACCEPT],
        [DROP],
    ]),
    "prerouting": (_hook("prerouting", BRIDGE_PRIORITY), [
        [_match("==", _meta("iifname"), "@ports"), _jump("guard")]]),
    "forward": (_hook("forward", BRIDGE_PRIORITY), [
        [{"mangle": {"key": _meta("mark"), "value": {"map": {"key": _meta("oifname"),
                                                             "data": "@to_mark"}}}}]]),
})
INET = _Table(NFPROTO_INET, I, (
    {"map": {**I, "name": "zone_of", "type": "ifname", "map": "verdict"}},
    {"set": {**I, "name": "allow", "type": ["mark", "inet_proto", "inet_service", "ipv4_addr"],
             "flags": ["interval"]}},
), {
    "guest": ({}, [
        [_match("in", _CT_STATE, ["established", "related"]), ACCEPT],
        [_match("in", _CT_STATE, "invalid"), DROP],
        [_match("==", _payload("icmp", "type"), "echo-request"), ACCEPT],
        [_match("==", {"concat": [_meta("mark"), _meta("l4proto"), _payload("th", "dport"),
                                  _payload("ip", "saddr")]}, "@allow"), ACCEPT],
        [DROP],
    ]),
    "prerouting": (_hook("prerouting", RAW_PRIORITY), [
        [{"vmap": {"key": _meta("iifname"), "data": "@zone_of"}}]]),
    "forward": (_hook("forward", 0), [
        [_match("==", {"&": [_meta("mark"), MARK_MASK]}, MARK_BASE), _jump("guest")]]),
})
TABLES = (BRIDGE, INET)


def _rules(base: Json, chain: str, rules: list[list[Json]], comment: str) -> list[Json]:
    """Rewrite a chain's rules: flushed, then added; the last one carries the comment."""
    out: list[Json] = [{"flush": {"chain": {**base, "name": chain}}}]
    for i, expr in enumerate(rules):
        rule: Json = {**base, "chain": chain, "expr": expr}
        if i == len(rules) - 1:
            rule["comment"] = comment
        out.append({"add": {"rule": rule}})
    return out


def _base(table: _Table, broken: Iterable[str]) -> list[Json]:
    """The table, its sets and chains (``add`` is a no-op for what exists), and the rules
    of the ``broken`` chains (missing, flushed, of another layout)."""
    out: list[Json] = [{"add": {"table": {"family": table.base["family"],
                                          "name": table.base["table"]}}}]
    out += [{"add": obj} for obj in table.sets]
    out += [{"add": {"chain": {**table.base, "name": name, **hook}}}
            for name, (hook, _rules) in table.chains.items()]
    for name in broken:
        out += _rules(table.base, name, table.chains[name][1], BASE_COMMENT)
    return out


def _zone_chain(zone: int) -> list[Json]:
    set_zone = {"mangle": {"key": {"ct": {"key": "zone"}}, "value": zone}}
    return [{"add": {"chain": {**I, "name": names.zone_chain(zone)}}},
            *_rules(I, names.zone_chain(zone), [[set_zone]], _zone_comment(zone))]


def _zone_comment(zone: int) -> str:
    return f"{LAYOUT} zone {zone}"


def _element(base: Json, name: str, *elems: object) -> Json:
    return {"element": {**base, "name": name, "elem": list(elems)}}


# -- what the kernel holds ------------------------------------------------------------------

@dataclass
class _Port:
    """The elements of one port name (another writer's too: a name is not checked here)."""

    listed: bool = False  # in ``ports``
    macs: set[str] = field(default_factory=set)  # in ``port_macs``
    ips: dict[str, str] = field(default_factory=dict)  # ``port_ips``: address -> bridge
    mark: int | None = None  # in ``to_mark``


@dataclass
class _View:
    """Our two tables as they stood at a ruleset generation. Reading them for every
    converge made plugging N ports cost N^2; the generation says whether anyone else wrote
    since, which keeps the view right without trusting it."""

    generation: int
    ports: dict[str, _Port] = field(default_factory=dict)
    allow: dict[int, set[Allow]] = field(default_factory=dict)  # mark -> its ranges
    zones: dict[str, int | None] = field(default_factory=dict)  # zone_of: bridge -> zone
    zone_chains: set[int] = field(default_factory=set)  # zone chains that are complete
    broken: dict[int, set[str]] = field(default_factory=dict)  # family -> chains to rewrite
    present: set[int] = field(default_factory=set)  # families whose table exists
    older: bool = False  # tables of another layout, translated here: replace them

    def port(self, name: str) -> _Port:
        return self.ports.setdefault(name, _Port())

    def held_marks(self) -> set[int]:
        return {p.mark for p in self.ports.values() if p.mark is not None}


@dataclass
class _Batch:
    """What the ports of one transaction take and leave, applied to the view once it is
    written."""

    marks: set[int] = field(default_factory=set)  # held by the batch's ports
    used: set[int] | None = None  # every mark held or in the allow set, read once
    zones: dict[str, int] = field(default_factory=dict)  # bridge -> zone
    dropped: set[str] = field(default_factory=set)  # bridges whose stale zone goes
    after: dict[str, tuple[_Port, set[Allow]]] = field(default_factory=dict)
    orphans: set[int] = field(default_factory=set)  # marks of allow elements nobody holds
    zone_chains: set[int] = field(default_factory=set)  # written


class Firewall:
    """The port firewalls of one host namespace. Every change runs in its namespace thread
    (so two ports never allocate the same mark) and writes one transaction at most (and
    one before it that replaces an older layout's tables, once); a converge that finds
    the port as wanted answers in the caller's thread."""

    def __init__(self, host: HostNet) -> None:
        self.host = host
        self.reader = NftReader(host.nfnl)
        self._pending: list[tuple[PortPolicy, concurrent.futures.Future[int]]] = []
        self._pending_lock = threading.Lock()
        self._view: _View | None = None
        self.transactions = 0  # nft transactions written
        self.commands = 0  # nft commands in them
        self.forgotten = 0  # conntrack entries deleted

    def _nft(self, commands: list[Json], what: str) -> None:
        self.host.nft(commands, what)
        self.transactions += 1
        self.commands += len(commands)

    # -- converge ---------------------------------------------------------------------------

    def converge(self, policy: PortPolicy) -> int:
        """Make the port's firewall say exactly ``policy``; the nft commands written for it.

        Converges that wait for the namespace thread together are written together, as
        one transaction (group commit): ten ports in one cost little more than one.
        Should the kernel refuse it, each port is tried on its own, and fails alone.
        """
        if self._as_wanted(policy):
            return 0
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        with self._pending_lock:
            self._pending.append((policy, future))
        if self.host.thread.is_current():
            self._drain()
        else:
            self.host.thread.submit(self._drain)
        return self.host.thread.wait(future, f"firewall of {policy.port}")

    def _as_wanted(self, policy: PortPolicy) -> bool:
        """Whether the port's elements already say exactly ``policy``, by the view kept, at
        the ruleset's generation now: answered in the caller's thread, without the hop to
        the namespace thread (a resync plugs every port again, nearly all as they were, and
        the hop was a third of such a plug). Anything else goes the way of a change."""
        view = self._view  # never changed once kept: `_kept` replaces it
        if view is None or view.older or view.broken:
            return False
        have = view.ports.get(policy.port)
        if have is None or have.mark is None:  # a new port: no need to ask the kernel
            return False
        try:
            self._br_netfilter()
            if self._generation() != view.generation:
                return False
            batch = _Batch()
            commands, _removed = self._plan(policy, view, batch)
            return not (commands or self._repairs(view, batch) or self._orphans(view, batch))
        except NetError:
            return False  # the namespace thread's converge says why

    def _drain(self) -> None:
        with self._pending_lock:
            items, self._pending = self._pending, []
        if not items:
            return  # an earlier drain took them
        last: dict[str, PortPolicy] = {}
        for policy, _future in items:  # level-triggered: a port's newest policy wins
            last[policy.port] = policy
        try:
            results = self._converge_all(list(last.values()))
        except BaseException as exc:
            results = {port: exc for port in last}
        for policy, future in items:
            result = results[policy.port]
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    def _converge_all(self, policies: list[PortPolicy]) -> dict[str, int | BaseException]:
        """Converge several ports in one transaction; each port's count or error."""
        results: dict[str, int | BaseException] = {}
        try:
            self._br_netfilter()
        except NetError as exc:
            return {p.port: exc for p in policies}
        plans: dict[str, tuple[list[Json], set[Allow]]] = {}
        for attempt in range(2):
            plans.clear()
            batch = _Batch()
            try:
                view = self._writable()
            except NetError as exc:
                return {p.port: exc for p in policies}
            for policy in policies:
                try:
                    plans[policy.port] = self._plan(policy, view, batch)
                except NetError as exc:
                    results[policy.port] = exc
            body = [command for commands, _removed in plans.values() for command in commands]
            commands = self._repairs(view, batch) + body + self._orphans(view, batch)
            if not commands:
                break
            try:
                self._nft(commands, f"firewall of {', '.join(sorted(plans)) or 'the host'}")
                self._kept(view, lambda v, b=batch: self._apply(v, b))
                break
            except TransientNetError as exc:
                self._view = None
                if len(plans) > 1:  # whichever port's commands were refused fails alone
                    for policy in policies:
                        if policy.port in plans:
                            results.update(self._converge_all([policy]))
                    return results
                if attempt:  # changed under us between the read and the write: once more
                    results.update({port: exc for port in plans})
                    return results
        for policy in policies:
            if policy.port not in plans:
                continue
            commands, removed = plans[policy.port]
            try:
                if removed:
                    self._cut(policy, removed)
                results[policy.port] = len(commands)
            except NetError as exc:
                results[policy.port] = exc
        return results

    def _br_netfilter(self) -> None:
        """Bridged IPv4 must traverse the inet hooks (the segment bridges also ask for it
        on their own); without br_netfilter there is nothing to set."""
        try:
            self.host.sysctl("net.bridge.bridge-nf-call-iptables", "1")
        except PermanentNetError as exc:
            raise PermanentNetError(f"{exc}: br_netfilter is not loaded (modprobe "
                                    "br_netfilter); guest rules cannot be enforced") from exc

    def _plan(self, policy: PortPolicy, view: _View,
              batch: _Batch) -> tuple[list[Json], set[Allow]]:
        """The commands that bring the port's elements (and its segment's zone) to
        ``policy``, and the allow ranges removed (whose connections are to be cut)."""
        port, mac, ip = policy.port, policy.mac.lower(), policy.ip
        # What can refuse the port comes first: one refused leaves the batch as it was.
        wanted = allowed(policy.rules)
        have = view.ports.get(port) or _Port()
        mark = self._free_mark(view, batch) if have.mark is None else have.mark
        out = self._zone(policy.bridge, view, batch)
        if not have.listed:
            out.append({"add": _element(B, "ports", port)})
        if have.macs - {mac}:
            out.append({"delete": _element(B, "port_macs", *(
                {"concat": [port, old]} for old in sorted(have.macs - {mac})))})
        if mac not in have.macs:
            out.append({"add": _element(B, "port_macs", {"concat": [port, mac]})})
        stale = sorted(old for old, bridge in have.ips.items()
                       if (old, bridge) != (ip, policy.bridge))
        if stale:  # another address, or the same on another bridge (the comment)
            out.append({"delete": _element(B, "port_ips", *(
                {"concat": [port, old]} for old in stale))})
        if have.ips.get(ip) != policy.bridge:
            out.append({"add": _element(B, "port_ips", _ip_json(port, ip, policy.bridge))})
        if have.mark is None:  # a new port, or its bridge table was lost
            out.append({"add": _element(B, "to_mark", [port, mark])})
        batch.marks.add(mark)
        ranges = view.allow.get(mark, set())
        removed = ranges - wanted
        if removed:
            out.append({"delete": _element(I, "allow", *(
                _allow_json(mark, a) for a in sorted(removed)))})
        if wanted - ranges:
            out.append({"add": _element(I, "allow", *(
                _allow_json(mark, a) for a in sorted(wanted - ranges)))})
        batch.after[port] = (_Port(True, {mac}, {ip: policy.bridge}, mark), wanted)
        return out, removed

    def _free_mark(self, view: _View, batch: _Batch) -> int:
        if batch.used is None:
            batch.used = view.held_marks() | set(view.allow)
        for mark in range(MARK_BASE + 1, MARK_BASE + MARK_SPAN + 1):
            if mark not in batch.used and mark not in batch.marks:
                return mark
        raise PermanentNetError(f"no free mark for a guest port ({MARK_SPAN} in use)")

    def _zone(self, bridge: str, view: _View, batch: _Batch) -> list[Json]:
        """The commands that give a segment its conntrack zone (allocated on its first
        port; its chain is written by `_repairs`). A zone whose bridge is gone is free
        again; its chain (``ct zone set N``) stays for the next segment that takes it."""
        if bridge in batch.zones:
            return []  # another port of the batch on the same segment saw to it
        zone = view.zones.get(bridge)
        out: list[Json] = []
        if zone is None:
            used = {z: name for name, z in batch.zones.items()}
            gone: list[str] = []
            for name, z in view.zones.items():
                if z is None or name == bridge or name in batch.dropped:
                    continue
                try:
                    if self.host.rtnl.link(name) is None:
                        gone.append(name)
                    else:
                        used[z] = name
                except NetlinkError as exc:
                    raise classify(exc) from exc
            batch.dropped.update(gone)  # only now: the port can no longer be refused
            out += [{"delete": _element(I, "zone_of", name)} for name in gone]
            if bridge in view.zones:  # an element that jumps elsewhere
                out.append({"delete": _element(I, "zone_of", bridge)})
            zone = next(z for z in range(1, len(used) + 2) if z not in used)
            out.append({"add": _element(I, "zone_of", [bridge, _jump(names.zone_chain(zone))])})
        batch.zones[bridge] = zone
        return out

    def _repairs(self, view: _View, batch: _Batch) -> list[Json]:
        """What the tables themselves need: their base where it is not as written, and the
        zone chains that the segments (or the batch's new ones) jump to."""
        out: list[Json] = []
        for table in TABLES:
            if table.family in view.broken:
                out += _base(table, sorted(view.broken[table.family]))
        zones = {z for bridge, z in view.zones.items()
                 if z is not None and bridge not in batch.dropped} | set(batch.zones.values())
        batch.zone_chains = zones - view.zone_chains
        for zone in sorted(batch.zone_chains):
            out += _zone_chain(zone)
        return out

    def _orphans(self, view: _View, batch: _Batch) -> list[Json]:
        """Allow elements under a mark no port holds (its to_mark element was lost: the port
        has a new mark) go."""
        batch.orphans = set(view.allow) - view.held_marks() - batch.marks
        return [{"delete": _element(I, "allow", *(_allow_json(mark, a)
                                                  for a in sorted(view.allow[mark])))}
                for mark in sorted(batch.orphans)]

    @staticmethod
    def _apply(view: _View, batch: _Batch) -> None:
        """The view after the batch's transaction."""
        for port, (state, ranges) in batch.after.items():
            old = view.ports.get(port)
            if old is not None and old.mark is not None and old.mark != state.mark:
                view.allow.pop(old.mark, None)
            view.ports[port] = state
            if ranges:
                view.allow[state.mark] = ranges  # type: ignore[index]
            else:
                view.allow.pop(state.mark, None)  # type: ignore[arg-type]
        for mark in batch.orphans:
            view.allow.pop(mark, None)
        for bridge in batch.dropped:
            view.zones.pop(bridge, None)
        view.zones.update(batch.zones)
        view.zone_chains |= batch.zone_chains
        view.present |= {t.family for t in TABLES if t.family in view.broken}
        view.broken.clear()

    # -- the view ---------------------------------------------------------------------------

    def _kept(self, view: _View, change: Callable[[_View], None]) -> None:
        """After our transaction: the view is kept, changed as written, if it was the only
        one since it was read (any other writer moves the generation further)."""
        generation = self._generation()
        if self._view is view and generation == view.generation + 1:
            # Changed in a copy: a caller's thread may be reading the kept one.
            kept = dataclasses.replace(
                view, generation=generation, ports=dict(view.ports), allow=dict(view.allow),
                zones=dict(view.zones), zone_chains=set(view.zone_chains),
                broken=dict(view.broken), present=set(view.present))
            change(kept)
            self._view = kept
        else:
            self._view = None

    def _generation(self) -> int:
        try:
            return self.reader.generation()
        except NetlinkError as exc:
            raise classify(exc) from exc

    def _current(self) -> _View:
        """Our tables as they are: the view kept, or read again if anyone wrote since."""
        generation = self._generation()
        if self._view is None or self._view.generation != generation:
            try:
                self._view = self._read()
            except NetlinkError as exc:
                raise classify(exc) from exc
        return self._view

    def _writable(self) -> _View:
        """The current view, once tables of another layout are replaced by ours."""
        view = self._current()
        if view.older:
            self._nft(self._replace(view), "firewall: tables of an older layout replaced")
            self._view = None
            view = self._current()
        return view

    def _read(self) -> _View:
        r = self.reader
        for _attempt in range(5):
            generation = r.generation()
            view = _View(generation)
            chains = {t.family: set(r.chains(t.family, t.name)) for t in TABLES}
            for table in TABLES:
                sets = set(r.sets(table.family, table.name))
                zones = {c for c in chains[table.family] if _ZONE.match(c)} \
                    if table is INET else set()
                if sets or chains[table.family]:
                    view.present.add(table.family)
                if chains[table.family] - set(table.chains) - zones \
                        or sets - table.set_names:
                    view.older = True
                broken = {c for c in table.chains
                          if not self._complete(table, c, len(table.chains[c][1]),
                                                BASE_COMMENT)}
                if broken or table.set_names - sets:
                    view.broken[table.family] = broken
                for chain in zones:
                    zone = int(chain[len("zone_"):])
                    if self._complete(INET, chain, 1, _zone_comment(zone)):
                        view.zone_chains.add(zone)
            self._read_elements(view)
            if view.older:
                self._read_older(view, chains)
            if r.generation() == generation:
                return view
        raise TransientNetError("the ruleset kept changing while the firewall read it")

    def _complete(self, table: _Table, chain: str, count: int, comment: str) -> bool:
        rules = self.reader.rules(table.family, table.name, chain)
        return len(rules) == count and rules[-1].comment == comment

    def _elements(self, table: _Table, name: str) -> list[Element]:
        return self.reader.elements(table.family, table.name, name) or []

    def _read_elements(self, view: _View) -> None:
        for e in self._elements(BRIDGE, "ports"):
            view.port(_ifname(e.key)).listed = True
        for e in self._elements(BRIDGE, "port_macs"):
            if len(e.key) == names.IFNAMSIZ + 8:
                view.port(_ifname(e.key)).macs.add(mac_str(e.key[16:22]))
        for e in self._elements(BRIDGE, "port_ips"):
            if len(e.key) == names.IFNAMSIZ + 4:
                view.port(_ifname(e.key)).ips[socket.inet_ntoa(e.key[16:20])] = e.comment or ""
        for e in self._elements(BRIDGE, "to_mark"):
            if e.value and len(e.value) == 4:
                view.port(_ifname(e.key)).mark = _U32.unpack(e.value)[0]
        for e in self._elements(INET, "zone_of"):
            m = _ZONE.match(e.jump or "")
            view.zones[_ifname(e.key)] = int(m[1]) if m else None
        for e in self._elements(INET, "allow"):
            if (allow := _range(e, 4)) is not None:
                view.allow.setdefault(int.from_bytes(e.key[:4], "big"), set()).add(allow)

    # -- an older layout --------------------------------------------------------------------

    def _read_older(self, view: _View, chains: dict[int, set[str]]) -> None:
        """Translate "orch:v1" (per-port chains ``in_<port>`` and ``to_<port>`` whose last
        rules' comments say the port's MAC, IP and bridge; per-port sets ``allow_<port>``;
        ``to_mark`` and ``zone_of`` as here) into the view; its ports are carried over."""
        r = self.reader
        for chain in sorted(chains[NFPROTO_BRIDGE]):
            port = chain[len("in_"):]
            rules = r.rules(NFPROTO_BRIDGE, names.PORTS_TABLE, chain) \
                if chain.startswith("in_") and names.is_port_name(port) else []
            words = (rules[-1].comment or "").split() if rules else []
            if len(words) == 3 and words[0] == OLD_LAYOUT:
                state = view.port(port)
                state.listed, state.macs, state.ips = True, {words[1].lower()}, {words[2]: ""}
        for chain in sorted(chains[NFPROTO_INET]):
            port = chain[len("to_"):]
            state = view.ports.get(port) if chain.startswith("to_") else None
            if state is None or not state.ips:
                continue
            rules = r.rules(NFPROTO_INET, names.GUESTS_TABLE, chain)
            words = (rules[-1].comment or "").split() if rules else []
            if len(words) == 3 and words[0] == OLD_LAYOUT and words[1] in state.ips:
                state.ips[words[1]] = words[2]
            if state.mark is not None:
                for e in self.reader.elements(NFPROTO_INET, names.GUESTS_TABLE,
                                              f"allow_{port}") or []:
                    if (allow := _range(e, 0)) is not None:
                        view.allow.setdefault(state.mark, set()).add(allow)

    @staticmethod
    def _replace(view: _View) -> list[Json]:
        """One transaction: our tables deleted and written again in this layout, with every
        element of the view (the older layout's, translated)."""
        out: list[Json] = [{"delete": {"table": {"family": t.base["family"],
                                                 "name": t.base["table"]}}}
                           for t in TABLES if t.family in view.present]
        for table in TABLES:
            out += _base(table, table.chains)
        zones = {z for z in view.zones.values() if z is not None}
        for zone in sorted(zones):
            out += _zone_chain(zone)
        out += [{"add": _element(I, "zone_of", [bridge, _jump(names.zone_chain(zone))])}
                for bridge, zone in sorted(view.zones.items()) if zone is not None]
        for port, state in sorted(view.ports.items()):
            if state.listed:
                out.append({"add": _element(B, "ports", port)})
            out += [{"add": _element(B, "port_macs", {"concat": [port, mac]})}
                    for mac in sorted(state.macs)]
            out += [{"add": _element(B, "port_ips", _ip_json(port, ip, bridge))}
                    for ip, bridge in sorted(state.ips.items())]
            if state.mark is not None:
                out.append({"add": _element(B, "to_mark", [port, state.mark])})
                ranges = view.allow.get(state.mark)
                if ranges:
                    out.append({"add": _element(I, "allow", *(
                        _allow_json(state.mark, a) for a in sorted(ranges)))})
        return out

    # -- connections ------------------------------------------------------------------------

    def _cut(self, policy: PortPolicy, removed: set[Allow]) -> None:
        """Delete the connections to the guest that only the removed ranges allowed."""
        zone = self._current().zones.get(policy.bridge)
        if zone is None:
            return
        remaining = allowed(policy.rules)
        ip = policy.ip

        def covered(f: Flow, ranges: Iterable[Allow]) -> bool:
            src = int(ipaddress.IPv4Address(f.src))
            return any(f.proto == p and f.dport == port and a <= src <= b
                       for p, port, a, b in ranges)

        try:
            doomed = [f for f in self.reader.flows(zone)
                      if f.dst == ip and covered(f, removed) and not covered(f, remaining)]
            if doomed:
                self.forgotten += self.reader.forget(doomed)
        except NetlinkError as exc:
            raise classify(exc) from exc

    # -- removal ----------------------------------------------------------------------------

    def remove(self, port: str) -> bool:
        """Remove the port's elements, and forget its connections; False if it had none."""
        return self.host.inside(lambda: self._remove(port), f"remove firewall of {port}")

    def _remove(self, port: str) -> bool:
        view = self._writable()
        state = view.ports.get(port)
        if state is None:
            return False
        commands: list[Json] = []
        if state.listed:
            commands.append({"delete": _element(B, "ports", port)})
        if state.macs:
            commands.append({"delete": _element(B, "port_macs", *(
                {"concat": [port, mac]} for mac in sorted(state.macs)))})
        if state.ips:
            commands.append({"delete": _element(B, "port_ips", *(
                {"concat": [port, ip]} for ip in sorted(state.ips)))})
        if state.mark is not None:
            commands.append({"delete": _element(B, "to_mark", port)})
            if view.allow.get(state.mark):
                commands.append({"delete": _element(I, "allow", *(
                    _allow_json(state.mark, a) for a in sorted(view.allow[state.mark])))})

        def removed(v: _View) -> None:
            v.ports.pop(port, None)
            if state.mark is not None:
                v.allow.pop(state.mark, None)

        self._nft(commands, f"remove firewall of {port}")
        self._kept(view, removed)
        try:
            for ip, bridge in state.ips.items():
                self._forget_guest(ip, bridge)
        except NetlinkError as exc:
            raise classify(exc) from exc
        return True

    def _forget_guest(self, ip: str, bridge: str) -> None:
        """Every TCP/UDP connection of a guest that left: its address may be given to
        another guest, which must not inherit them."""
        zone = self._current().zones.get(bridge)
        if zone is None:
            return
        doomed = [f for f in self.reader.flows(zone)
                  if (f.src == ip or f.dst == ip) and f.proto in _PROTO_NAMES]
        if doomed:
            self.forgotten += self.reader.forget(doomed)

    def ports(self) -> set[str]:
        """Every port that has firewall elements here."""
        return self.host.inside(self._ports, "list guest ports")

    def _ports(self) -> set[str]:
        return {name for name in self._current().ports if names.is_port_name(name)}
