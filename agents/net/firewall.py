"""A guest port's firewall in nftables: anti-spoofing out of it, its rules into it.

This kernel has no conntrack in the bridge family, so the work is split in two tables:

``table bridge orch_ports`` (stateless, every frame of a bridge):
- ``prerouting`` (priority -200, before the bridge learns the source MAC and before
  br_netfilter hands IPv4 to the inet table): ``iifname vmap @from_port`` jumps to the
  port's ``in_<port>``: ether saddr must be the guest's MAC; ARP must carry its MAC and
  IP; IPv4 its IP; any other ethertype (IPv6, VLAN tags, ...) is dropped. Checking before
  learning means a spoofed frame cannot even move a MAC to the guest's port.
- ``forward``: ``meta mark set oifname map @to_mark``: a frame leaving through a port
  carries that port's mark (one per port, allocated here), for the inet table.

``table inet orch_guests`` (stateful; sees bridged IPv4 through br_netfilter):
- ``prerouting`` (priority raw): ``iifname vmap @zone_of`` sets the conntrack zone of
  the segment (the bridge is the input device there), so that two networks with the same
  addresses on one host never share a connection entry.
- ``forward``: ``meta mark vmap @to_port`` jumps to the port's ``to_<port>``:
  established/related accepted, invalid dropped, ICMP echo requests accepted (the rules
  speak only of TCP and UDP; ping is always allowed), then
  ``meta l4proto . th dport . ip saddr @allow_<port> accept``, then drop.

Each port owns its chains, its set and its map elements: a change to one port touches
only those, in one transaction (kube-proxy's layout). Reads go through `NftReader`
(object by object, in microseconds); writes through libnftables, whose transactions cost
grows with the ruleset (it loads all of it first), so only what differs is written, and
ports converging at the same time share one transaction (see `Firewall.converge`).

A rule that is removed also cuts what it allowed: conntrack entries to the guest matched
by the removed (protocol, port, source range) and by no remaining one are deleted.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import re
import socket
import struct
import threading
from collections.abc import Iterable
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
from agents.net.nfnl import NFPROTO_BRIDGE, NFPROTO_INET, Element, Flow, NftReader, ifname_key
from schemas.specs import SecurityRule

LAYOUT = "orch:v1"  # in every comment we check: a new layout rewrites every chain
MARK_BASE = 0x4F520000  # "OR": marks of guest ports are MARK_BASE + 1 .. MARK_BASE + 65535
MARK_SPAN = 0xFFFF
BRIDGE_PRIORITY = -200  # bridge "filter": before br_netfilter (0) and before learning
RAW_PRIORITY = -300  # inet "raw": before conntrack picks its zone
PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
_PROTO_NAMES = {v: k for k, v in PROTOCOLS.items()}
_U32 = struct.Struct("=I")
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


def _allow_of(element: Element) -> Allow | None:
    key, end = element.key, element.key_end or element.key
    if len(key) != 12 or len(end) != 12:
        return None
    return (key[0], int.from_bytes(key[4:6], "big"), int.from_bytes(key[8:12], "big"),
            int.from_bytes(end[8:12], "big"))


def _allow_json(allow: Allow) -> Json:
    proto, port, first, last = allow
    start, end = ipaddress.IPv4Address(first), ipaddress.IPv4Address(last)
    nets = list(ipaddress.summarize_address_range(start, end))
    addr: object
    if first == last:
        addr = str(start)
    elif len(nets) == 1:
        addr = {"prefix": {"addr": str(start), "len": nets[0].prefixlen}}
    else:
        addr = {"range": [str(start), str(end)]}
    return {"concat": [_PROTO_NAMES.get(proto, proto), port, addr]}


def _match(op: str, left: Json, right: object) -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


DROP: Json = {"drop": None}
ACCEPT: Json = {"accept": None}


def _rule(base: Json, chain: str, expr: list[Json], comment: str | None = None) -> Json:
    rule: Json = {**base, "chain": chain, "expr": expr}
    if comment is not None:
        rule["comment"] = comment
    return {"add": {"rule": rule}}


def _chain_rules(base: Json, chain: str, rules: list[list[Json]], comment: str) -> list[Json]:
    """(Re)write a chain: created if absent, flushed, its rules added; the last one carries
    the comment that says the chain is complete."""
    out: list[Json] = [{"add": {"chain": {**base, "name": chain}}},
                       {"flush": {"chain": {**base, "name": chain}}}]
    for i, expr in enumerate(rules):
        out.append(_rule(base, chain, expr, comment if i == len(rules) - 1 else None))
    return out


def _in_rules(mac: str, ip: str) -> list[list[Json]]:
    return [
        [_match("!=", _payload("ether", "saddr"), mac), DROP],
        [_match("!=", _payload("arp", "saddr ether"), mac), DROP],
        [_match("!=", _payload("arp", "saddr ip"), ip), DROP],
        [_match("==", _payload("ether", "type"), "arp"), ACCEPT],
        [_match("!=", _payload("ip", "saddr"), ip), DROP],
        [_match("==", _payload("ether", "type"), "ip"), ACCEPT],
        [DROP],
    ]


def _to_rules(port: str) -> list[list[Json]]:
    key = {"concat": [_meta("l4proto"), _payload("th", "dport"), _payload("ip", "saddr")]}
    return [
        [_match("in", {"ct": {"key": "state"}}, ["established", "related"]), ACCEPT],
        [_match("in", {"ct": {"key": "state"}}, "invalid"), DROP],
        [_match("==", _payload("icmp", "type"), "echo-request"), ACCEPT],
        [_match("==", key, f"@{names.allow_set(port)}"), ACCEPT],
        [DROP],
    ]


def _in_comment(policy: PortPolicy) -> str:
    return f"{LAYOUT} {policy.mac} {policy.ip}"


def _to_comment(policy: PortPolicy) -> str:
    return f"{LAYOUT} {policy.ip} {policy.bridge}"


def _base(bridge_ok: bool, inet_ok: bool) -> list[Json]:
    """The tables, maps and hooked chains (``add`` is a no-op for what exists), and the
    hooked chains' rules when they are not as written (a flushed table, say)."""
    out: list[Json] = [
        {"add": {"table": {"family": "bridge", "name": names.PORTS_TABLE}}},
        {"add": {"map": {**B, "name": "from_port", "type": "ifname", "map": "verdict"}}},
        {"add": {"map": {**B, "name": "to_mark", "type": "ifname", "map": "mark"}}},
        {"add": {"table": {"family": "inet", "name": names.GUESTS_TABLE}}},
        {"add": {"map": {**I, "name": "zone_of", "type": "ifname", "map": "verdict"}}},
        {"add": {"map": {**I, "name": "to_port", "type": "mark", "map": "verdict"}}},
    ]
    hooks = [(B, "prerouting", BRIDGE_PRIORITY, {"vmap": {"key": _meta("iifname"),
                                                          "data": "@from_port"}}),
             (B, "forward", BRIDGE_PRIORITY, {"mangle": {"key": _meta("mark"), "value": {
                 "map": {"key": _meta("oifname"), "data": "@to_mark"}}}}),
             (I, "prerouting", RAW_PRIORITY, {"vmap": {"key": _meta("iifname"),
                                                       "data": "@zone_of"}}),
             (I, "forward", 0, {"vmap": {"key": _meta("mark"), "data": "@to_port"}})]
    for base, hook, prio, expr in hooks:
        out.append({"add": {"chain": {**base, "name": hook, "type": "filter", "hook": hook,
                                      "prio": prio, "policy": "accept"}}})
        if not (bridge_ok if base is B else inet_ok):
            out += [{"flush": {"chain": {**base, "name": hook}}},
                    _rule(base, hook, [expr], BASE_COMMENT)]
    return out


def _jump(target: str) -> Json:
    return {"jump": {"target": target}}


def _element(base: Json, name: str, *elems: object) -> Json:
    return {"element": {**base, "name": name, "elem": list(elems)}}


@dataclass
class _Batch:
    """What the ports of one transaction have taken so far (the kernel shows it only once
    the transaction is written): marks, and each segment's zone."""

    marks: set[int] = field(default_factory=set)
    zones: dict[str, int] = field(default_factory=dict)  # bridge -> zone
    dropped: set[str] = field(default_factory=set)  # bridges whose stale zone goes
    generation: int = 0  # of the ruleset, read before planning
    fresh: dict[str, int] = field(default_factory=dict)  # chain -> mark taken for a new port
    moved: bool = False  # a mark was taken from a chain: the cached maps are not kept


@dataclass
class _Marks:
    """The two marks maps as they stood at a ruleset generation. Reading them for every new
    port made plugging N ports cost N^2; the generation says whether anyone else wrote
    since, which keeps the cache right without trusting it."""

    generation: int
    used: set[int]  # every mark either map holds
    by_chain: dict[str, list[int]]  # chain -> the marks the inet map sends to it


class Firewall:
    """The port firewalls of one host namespace. Every method runs in its namespace thread
    (so two ports never allocate the same mark) and writes one transaction at most."""

    def __init__(self, host: HostNet) -> None:
        self.host = host
        self.reader = NftReader(host.nfnl)
        self._pending: list[tuple[PortPolicy, concurrent.futures.Future[int]]] = []
        self._pending_lock = threading.Lock()
        self._marks: _Marks | None = None
        self.transactions = 0  # nft transactions written
        self.commands = 0  # nft commands in them
        self.forgotten = 0  # conntrack entries deleted

    def _nft(self, commands: list[Json], what: str) -> None:
        self.host.nft(commands, what)
        self.transactions += 1
        self.commands += len(commands)

    def _complete(self, family: int, table: str, chain: str, count: int, comment: str) -> bool:
        rules = self.reader.rules(family, table, chain)
        return len(rules) == count and rules[-1].comment == comment

    # -- converge ---------------------------------------------------------------------------

    def converge(self, policy: PortPolicy) -> int:
        """Make the port's firewall say exactly ``policy``; the nft commands written for it.

        Converges that wait for the namespace thread together are written together, as
        one transaction (group commit): libnftables loads the whole ruleset before every
        transaction, so ten ports in one cost little more than one. Should the kernel
        refuse it, each port is tried on its own, and fails alone.
        """
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        with self._pending_lock:
            self._pending.append((policy, future))
        if self.host.thread.is_current():
            self._drain()
        else:
            self.host.thread.submit(self._drain)
        return self.host.thread.wait(future, f"firewall of {policy.port}")

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
            try:
                batch = _Batch(generation=self._generation())
                bridge_ok, inet_ok = self._base_ok()
            except NetError as exc:
                return {p.port: exc for p in policies}
            for policy in policies:
                try:
                    plans[policy.port] = self._plan(policy, batch)
                except NetError as exc:
                    results[policy.port] = exc
            body = [command for commands, _removed in plans.values() for command in commands]
            if not body and bridge_ok and inet_ok:
                break
            try:
                self._nft(_base(bridge_ok, inet_ok) + body,
                          f"firewall of {', '.join(sorted(plans)) or 'the host'}")
                self._wrote(batch)
                break
            except TransientNetError as exc:
                self._marks = None
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

    def _base_ok(self) -> tuple[bool, bool]:
        """Whether the hooked chains of each table (bridge, inet) are as written."""
        try:
            return (all(self._complete(NFPROTO_BRIDGE, names.PORTS_TABLE, hook, 1, BASE_COMMENT)
                        for hook in ("prerouting", "forward")),
                    all(self._complete(NFPROTO_INET, names.GUESTS_TABLE, hook, 1, BASE_COMMENT)
                        for hook in ("prerouting", "forward")))
        except NetlinkError as exc:
            raise classify(exc) from exc

    def _plan(self, policy: PortPolicy, batch: _Batch) -> tuple[list[Json], set[Allow]]:
        """The commands that bring the port's objects to ``policy`` (the tables and hooked
        chains aside), and the allow ranges removed (whose connections are to be cut)."""
        r, port = self.reader, policy.port
        in_chain, to_chain, allow = (names.chain_in(port), names.chain_to(port),
                                     names.allow_set(port))
        try:
            body = self._zone(policy.bridge, batch)
            key = ifname_key(port)
            mark_elem = r.element(NFPROTO_BRIDGE, names.PORTS_TABLE, "to_mark", key)
            mark = _U32.unpack(mark_elem.value)[0] if mark_elem and mark_elem.value else None
            if mark is None:  # a new port, or its bridge table was lost
                mark = self._mark_of(to_chain, batch) or self._free_mark(batch)
                batch.fresh[to_chain] = mark
            batch.marks.add(mark)
            if not self._complete(NFPROTO_BRIDGE, names.PORTS_TABLE, in_chain,
                                  len(_in_rules(policy.mac, policy.ip)), _in_comment(policy)):
                body += _chain_rules(B, in_chain, _in_rules(policy.mac, policy.ip),
                                     _in_comment(policy))
            wanted = allowed(policy.rules)
            elements = r.elements(NFPROTO_INET, names.GUESTS_TABLE, allow)
            have = {a for e in elements or [] if (a := _allow_of(e)) is not None}
            if elements is None:
                body.append({"add": {"set": {**I, "name": allow, "type": [
                    "inet_proto", "inet_service", "ipv4_addr"], "flags": ["interval"]}}})
            removed = have - wanted
            if removed:
                body.append({"delete": _element(I, allow, *map(_allow_json, sorted(removed)))})
            if wanted - have:
                body.append({"add": _element(I, allow, *map(_allow_json,
                                                            sorted(wanted - have)))})
            if not self._complete(NFPROTO_INET, names.GUESTS_TABLE, to_chain,
                                  len(_to_rules(port)), _to_comment(policy)):
                body += _chain_rules(I, to_chain, _to_rules(port), _to_comment(policy))
            body += self._map_elements(port, mark, mark_elem is not None, batch)
        except NetlinkError as exc:
            raise classify(exc) from exc
        return body, removed

    def _map_elements(self, port: str, mark: int, mark_known: bool,
                      batch: _Batch) -> list[Json]:
        r, out = self.reader, []
        jump_in = r.element(NFPROTO_BRIDGE, names.PORTS_TABLE, "from_port", ifname_key(port))
        if jump_in is None or jump_in.jump != names.chain_in(port):
            if jump_in is not None:
                out.append({"delete": _element(B, "from_port", port)})
            out.append({"add": _element(B, "from_port", [port, _jump(names.chain_in(port))])})
        if not mark_known:
            out.append({"add": _element(B, "to_mark", [port, mark])})
        jump_to = r.element(NFPROTO_INET, names.GUESTS_TABLE, "to_port", _U32.pack(mark))
        if jump_to is None or jump_to.jump != names.chain_to(port):
            if jump_to is not None:
                out.append({"delete": _element(I, "to_port", mark)})
                batch.moved = True
            out.append({"add": _element(I, "to_port", [mark, _jump(names.chain_to(port))])})
        return out

    def _generation(self) -> int:
        try:
            return self.reader.generation()
        except NetlinkError as exc:
            raise classify(exc) from exc

    def _marks_at(self, batch: _Batch) -> _Marks:
        """The marks maps at the batch's generation: the cache, or read again."""
        if self._marks is None or self._marks.generation != batch.generation:
            used: set[int] = set()
            by_chain: dict[str, list[int]] = {}
            for e in self.reader.elements(NFPROTO_BRIDGE, names.PORTS_TABLE, "to_mark") or []:
                if e.value and len(e.value) == 4:
                    used.add(_U32.unpack(e.value)[0])
            for e in self.reader.elements(NFPROTO_INET, names.GUESTS_TABLE, "to_port") or []:
                if len(e.key) == 4:
                    used.add(mark := _U32.unpack(e.key)[0])
                    if e.jump:
                        by_chain.setdefault(e.jump, []).append(mark)
            self._marks = _Marks(batch.generation, used, by_chain)
        return self._marks

    def _wrote(self, batch: _Batch) -> None:
        """Keep the cached maps in step with the transaction just written, if it was the
        only one since they were read (any other writer moves the generation further)."""
        marks = self._marks
        if marks is None or batch.moved or marks.generation != batch.generation:
            self._marks = None
            return
        generation = self._generation()
        if generation != batch.generation + 1:
            self._marks = None
            return
        for chain, mark in batch.fresh.items():
            marks.used.add(mark)
            if mark not in marks.by_chain.get(chain, []):
                marks.by_chain.setdefault(chain, []).append(mark)
        marks.generation = generation

    def _marks_to(self, chain: str) -> list[int]:
        """The marks that the inet table sends to a port's chain."""
        return [_U32.unpack(e.key)[0]
                for e in self.reader.elements(NFPROTO_INET, names.GUESTS_TABLE, "to_port") or []
                if e.jump == chain and len(e.key) == 4]

    def _mark_of(self, chain: str, batch: _Batch) -> int | None:
        marks = self._marks_at(batch).by_chain.get(chain)
        return min(marks) if marks else None

    def _free_mark(self, batch: _Batch) -> int:
        used = self._marks_at(batch).used
        for mark in range(MARK_BASE + 1, MARK_BASE + MARK_SPAN + 1):
            if mark not in used and mark not in batch.marks:
                return mark
        raise PermanentNetError(f"no free mark for a guest port ({MARK_SPAN} in use)")

    def _zone(self, bridge: str, batch: _Batch) -> list[Json]:
        """The commands that give a segment its conntrack zone (allocated on its first
        port). A zone whose bridge is gone is free again; its chain (``ct zone set N``)
        stays for the next segment that takes the number."""
        if bridge in batch.zones:
            return []  # another port of the batch on the same segment saw to it
        r = self.reader
        elem = r.element(NFPROTO_INET, names.GUESTS_TABLE, "zone_of", ifname_key(bridge))
        zone = None
        if elem is not None and elem.jump and (m := _ZONE.match(elem.jump)):
            zone = int(m[1])
        out: list[Json] = []
        new_element: list[Json] = []
        if zone is None:
            used = {z: name for name, z in batch.zones.items()}
            for e in r.elements(NFPROTO_INET, names.GUESTS_TABLE, "zone_of") or []:
                name = e.key.rstrip(b"\0").decode(errors="replace")
                if not (e.jump and (m := _ZONE.match(e.jump))) or name == bridge:
                    continue
                if name in batch.dropped:
                    continue
                if self.host.rtnl.link(name) is None:
                    out.append({"delete": _element(I, "zone_of", name)})
                    batch.dropped.add(name)
                else:
                    used[int(m[1])] = name
            if elem is not None:
                out.append({"delete": _element(I, "zone_of", bridge)})
            zone = next(z for z in range(1, len(used) + 2) if z not in used)
            new_element = [{"add": _element(I, "zone_of",
                                            [bridge, _jump(names.zone_chain(zone))])}]
        batch.zones[bridge] = zone
        comment = f"{LAYOUT} zone {zone}"
        if not self._complete(NFPROTO_INET, names.GUESTS_TABLE, names.zone_chain(zone), 1,
                              comment):
            set_zone = {"mangle": {"key": {"ct": {"key": "zone"}}, "value": zone}}
            out += _chain_rules(I, names.zone_chain(zone), [[set_zone]], comment)
        return out + new_element

    # -- connections ------------------------------------------------------------------------

    def _zone_of(self, bridge: str) -> int | None:
        elem = self.reader.element(NFPROTO_INET, names.GUESTS_TABLE, "zone_of",
                                   ifname_key(bridge))
        if elem is not None and elem.jump and (m := _ZONE.match(elem.jump)):
            return int(m[1])
        return None

    def _cut(self, policy: PortPolicy, removed: set[Allow]) -> None:
        """Delete the connections to the guest that only the removed ranges allowed."""
        zone = self._zone_of(policy.bridge)
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
        """Remove the port's chains, set and map elements, and forget its connections;
        False if it had none."""
        return self.host.inside(lambda: self._remove(port), f"remove firewall of {port}")

    def _remove(self, port: str) -> bool:
        r = self.reader
        in_chain, to_chain, allow = (names.chain_in(port), names.chain_to(port),
                                     names.allow_set(port))
        try:
            commands: list[Json] = []
            key = ifname_key(port)
            if r.element(NFPROTO_BRIDGE, names.PORTS_TABLE, "from_port", key) is not None:
                commands.append({"delete": _element(B, "from_port", port)})
            mark_elem = r.element(NFPROTO_BRIDGE, names.PORTS_TABLE, "to_mark", key)
            if mark_elem is not None:
                commands.append({"delete": _element(B, "to_mark", port)})
            commands += [{"delete": _element(I, "to_port", mark)}
                         for mark in self._marks_to(to_chain)]
            to_rules = r.rules(NFPROTO_INET, names.GUESTS_TABLE, to_chain)
            identity = (to_rules[-1].comment or "").split() if to_rules else []
            chains = set(r.chains(NFPROTO_BRIDGE, names.PORTS_TABLE)) | set(
                r.chains(NFPROTO_INET, names.GUESTS_TABLE))
            if in_chain in chains:
                commands += [{"flush": {"chain": {**B, "name": in_chain}}},
                             {"delete": {"chain": {**B, "name": in_chain}}}]
            if to_chain in chains:
                commands.append({"flush": {"chain": {**I, "name": to_chain}}})
            if r.elements(NFPROTO_INET, names.GUESTS_TABLE, allow) is not None:
                commands.append({"delete": {"set": {**I, "name": allow}}})
            if to_chain in chains:
                commands.append({"delete": {"chain": {**I, "name": to_chain}}})
            if commands:
                self._marks = None  # its marks are free again
                self._nft(commands, f"remove firewall of {port}")
            if len(identity) == 3 and identity[0] == LAYOUT:
                self._forget_guest(ip=identity[1], bridge=identity[2])
        except NetlinkError as exc:
            raise classify(exc) from exc
        return bool(commands)

    def _forget_guest(self, ip: str, bridge: str) -> None:
        """Every TCP/UDP connection of a guest that left: its address may be given to
        another guest, which must not inherit them."""
        zone = self._zone_of(bridge)
        if zone is None:
            return
        doomed = [f for f in self.reader.flows(zone)
                  if (f.src == ip or f.dst == ip) and f.proto in _PROTO_NAMES]
        if doomed:
            self.forgotten += self.reader.forget(doomed)

    def ports(self) -> set[str]:
        """Every port that has firewall objects here (chains or map elements)."""
        return self.host.inside(self._ports, "list guest ports")

    def _ports(self) -> set[str]:
        r, found = self.reader, set()
        try:
            for family, table in ((NFPROTO_BRIDGE, names.PORTS_TABLE),
                                  (NFPROTO_INET, names.GUESTS_TABLE)):
                for chain in r.chains(family, table):
                    for prefix in ("in_", "to_"):
                        if chain.startswith(prefix) and names.is_port_name(chain[3:]):
                            found.add(chain[3:])
            for name in ("from_port", "to_mark"):
                for e in r.elements(NFPROTO_BRIDGE, names.PORTS_TABLE, name) or []:
                    port = e.key.rstrip(b"\0").decode(errors="replace")
                    if names.is_port_name(port):
                        found.add(port)
        except NetlinkError as exc:
            raise classify(exc) from exc
        return found
