"""The nftables of one balancer on an LB node, as a plan: pure, no kernel.

`desired(spec, egress)` is what the node must hold (the consistent tables computed here);
`plan(lb, held, wanted, tag)` is the libnftables JSON that takes the node from what it
holds to that, as ONE transaction: only the map elements that differ are deleted and
added, a service's rule is rewritten only when its strategy, size, seed or target port
changed, and a service that came or went adds or drops its own chain and map. Nothing is
flushed wholesale, so established flows (conntrack) and the other services are untouched.

One table per balancer, ``ip orch_lb_<id>``:

- ``prerouting`` (nat, dstnat): ``ip daddr VIP meta l4proto . th dport vmap @services``,
  whose comment is the tag of the last write (the driver trusts its memory of the table
  only while the kernel still shows that tag);
- ``services``: (protocol, port) -> ``jump svc_<proto>_<port>``;
- ``svc_<proto>_<port>``: ``counter meta mark set <hash> dnat to meta mark map @bk_<...> :
  target_port``, the hash being the strategy's:
  - ``maglev`` (the consistent table): ``jhash ip saddr . <proto> sport mod M seed S``,
    M buckets from `agents.lb.maglev`;
  - ``source_hash``: ``jhash ip saddr mod N seed S``;
  - ``round_robin``: ``numgen inc mod N``;
  with no healthy backend, ``counter drop``;
- ``bk_<proto>_<port>``: ``type mark : ipv4_addr``, bucket -> backend address;
- ``postrouting`` (nat, srcnat): ``oifname <egress> ct status dnat meta mark set 0
  masquerade``: replies come back through this node (direct server return would need
  IPIP, which this kernel setup does not offer). ``egress`` names the node ends of every
  balancer's port (a wildcard): two balancers on one network give the node two ports on
  one subnet, the kernel routes both balancers' flows through one of them, and the flow
  must then leave with that port's address (its firewall admits no other).

Why the mark: libnftables 1.0.6 cannot create a ``typeof`` map from JSON, and a map typed
``mark`` refuses a hash or numgen key ("datatype mismatch"); the hash is put in the
packet's mark (first packet of a flow only: nat chains see nothing else), looked up from
there, and the mark is cleared before the packet leaves the node.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from itertools import compress
from operator import ne

from agents.lb import maglev
from schemas.specs import LbSpec, Service

LAYOUT = "orch-lb:v1"
TABLE_PREFIX = "orch_lb_"
FAMILY = "ip"
DSTNAT, SRCNAT = -100, 100
STRATEGIES = ("maglev", "source_hash", "round_robin")

Json = dict[str, object]


class PlanError(ValueError):
    """The spec cannot be served as asked (a permanent failure)."""


@dataclass(frozen=True)
class ServiceTable:
    """One service as the kernel holds it: its rule's parameters and its buckets."""

    protocol: str
    port: int
    target_port: int
    strategy: str
    seed: int
    buckets: tuple[str, ...]  # bucket -> backend address; () for no backend

    @property
    def name(self) -> str:
        return f"{self.protocol}_{self.port}"

    def rule_key(self) -> tuple[object, ...]:
        return (self.protocol, self.target_port, self.strategy, self.seed, len(self.buckets))


@dataclass(frozen=True)
class LbTables:
    """One balancer's table, as held or wanted."""

    vip: str
    egress: str  # the node ends of the balancers' ports (an nft wildcard name)
    services: tuple[ServiceTable, ...]  # sorted by (protocol, port)

    def by_name(self) -> dict[str, ServiceTable]:
        return {s.name: s for s in self.services}


def table_name(lb_id: str) -> str:
    return f"{TABLE_PREFIX}{lb_id}"


def lb_of_table(name: str) -> str | None:
    return name[len(TABLE_PREFIX):] if name.startswith(TABLE_PREFIX) else None


def _ipv4(value: str, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError as exc:
        raise PlanError(f"{what} {value!r} is not an IPv4 address") from exc


def check(spec: LbSpec) -> None:
    """What makes a spec unservable, in one clear sentence (PlanError)."""
    vip = ipaddress.IPv4Address(_ipv4(spec.vip, "VIP"))
    if vip.is_unspecified or vip.is_multicast or vip.is_loopback:
        raise PlanError(f"VIP {spec.vip} is not a unicast address")
    port_net = ipaddress.IPv4Network(f"{_ipv4(spec.port.ip, 'port address')}/"
                                     f"{spec.port.prefix}", strict=False)
    if vip in port_net:
        raise PlanError(f"VIP {spec.vip} lies inside the backends' network {port_net}")
    seen: set[tuple[str, int]] = set()
    for service in spec.services:
        key = (service.protocol, service.port)
        if key in seen:
            raise PlanError(f"two services on {service.protocol} port {service.port}")
        seen.add(key)
        if strategy_of(service) not in STRATEGIES:
            raise PlanError(f"strategy {service.strategy} is not offered (this dataplane "
                            f"offers {', '.join(STRATEGIES)})")
        if service.health.timeout_ms >= service.health.interval_ms:
            raise PlanError(f"{service.protocol}/{service.port}: health-check timeout "
                            f"{service.health.timeout_ms} ms >= interval "
                            f"{service.health.interval_ms} ms")
    names = [b.instance for b in spec.backends]
    if len(set(names)) != len(names):
        raise PlanError("a backend is listed twice")
    for backend in spec.backends:
        ip = ipaddress.IPv4Address(_ipv4(backend.ip, f"backend {backend.instance}"))
        if backend.network != spec.port.network:
            raise PlanError(f"backend {backend.instance} is on network {backend.network}, "
                            f"not on this node's port network {spec.port.network}")
        if ip not in port_net:
            raise PlanError(f"backend {backend.instance} {backend.ip} is outside {port_net}")


def strategy_of(service: Service) -> str:
    """A service's strategy; none named is the consistent table."""
    return service.strategy or "maglev"


def service_table(service: Service, spec: LbSpec) -> ServiceTable:
    """A service's buckets over the backends the fold counts healthy on its port."""
    healthy = sorted((b for b in spec.backends if service.port in b.healthy),
                     key=lambda b: b.instance)
    ips = [b.ip for b in healthy]
    strategy = strategy_of(service)
    if strategy == "maglev" and healthy:
        table = maglev.build([b.instance for b in healthy], spec.seed)
        buckets = tuple(map(ips.__getitem__, table))
    else:
        buckets = tuple(ips)
    return ServiceTable(service.protocol, service.port, service.target_port, strategy,
                        spec.seed, buckets)


def desired(spec: LbSpec, egress: str) -> LbTables:
    check(spec)
    services = sorted((service_table(s, spec) for s in spec.services),
                      key=lambda s: (s.protocol, s.port))
    return LbTables(spec.vip, egress, tuple(services))


# -- JSON ----------------------------------------------------------------------------------


def _t(lb_id: str) -> Json:
    return {"family": FAMILY, "table": table_name(lb_id)}


def _payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


def _match(left: Json, right: object, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


MARK: Json = {"meta": {"key": "mark"}}


def _hash(s: ServiceTable) -> Json:
    n = len(s.buckets)
    if s.strategy == "round_robin":
        return {"numgen": {"mode": "inc", "mod": n}}
    key: Json = _payload("ip", "saddr")
    if s.strategy == "maglev":
        key = {"concat": [key, _payload(s.protocol, "sport")]}
    return {"jhash": {"mod": n, "seed": s.seed, "expr": key}}


def _service_rule(lb_id: str, s: ServiceTable) -> list[Json]:
    chain = {**_t(lb_id), "name": f"svc_{s.name}"}
    if not s.buckets:
        expr: list[Json] = [{"counter": None}, {"drop": None}]
    else:
        # (dnat to a port needs the protocol matched in the same rule)
        expr = [_match({"meta": {"key": "l4proto"}}, s.protocol), {"counter": None},
                {"mangle": {"key": MARK, "value": _hash(s)}},
                {"dnat": {"addr": {"map": {"key": MARK, "data": f"@bk_{s.name}"}},
                          "port": s.target_port}}]
    return [{"flush": {"chain": chain}},
            {"add": {"rule": {**_t(lb_id), "chain": chain["name"], "expr": expr}}}]


def _element_changes(lb_id: str, name: str, have: tuple[str, ...],
                     want: tuple[str, ...]) -> list[Json]:
    base = {**_t(lb_id), "name": f"bk_{name}"}
    # C-speed comparisons: a maglev table has 65,537 buckets or more.
    common = min(len(have), len(want))
    changed = list(compress(range(common), map(ne, have, want)))
    gone = changed + list(range(common, len(have)))
    new = [[i, want[i]] for i in changed] + [[i, want[i]] for i in range(common, len(want))]
    out: list[Json] = []
    if gone:
        out.append({"delete": {"element": {**base, "elem": gone}}})
    if new:
        out.append({"add": {"element": {**base, "elem": new}}})
    return out


def _service_key(s: ServiceTable) -> Json:
    return {"concat": [s.protocol, s.port]}


def _add_service(lb_id: str, s: ServiceTable) -> list[Json]:
    t = _t(lb_id)
    return [{"add": {"map": {**t, "name": f"bk_{s.name}", "type": "mark",
                             "map": "ipv4_addr"}}},
            {"add": {"chain": {**t, "name": f"svc_{s.name}"}}},
            *_element_changes(lb_id, s.name, (), s.buckets),
            *_service_rule(lb_id, s),
            {"add": {"element": {**t, "name": "services", "elem": [
                [_service_key(s), {"jump": {"target": f"svc_{s.name}"}}]]}}}]


def _drop_service(lb_id: str, s: ServiceTable) -> list[Json]:
    t = _t(lb_id)
    return [{"delete": {"element": {**t, "name": "services", "elem": [_service_key(s)]}}},
            {"flush": {"chain": {**t, "name": f"svc_{s.name}"}}},
            {"delete": {"chain": {**t, "name": f"svc_{s.name}"}}},
            {"delete": {"map": {**t, "name": f"bk_{s.name}"}}}]


def _base_rules(lb_id: str, wanted: LbTables, tag: str) -> list[Json]:
    t = _t(lb_id)
    dispatch = [_match(_payload("ip", "daddr"), wanted.vip),
                {"vmap": {"key": {"concat": [{"meta": {"key": "l4proto"}},
                                             _payload("th", "dport")]},
                          "data": "@services"}}]
    snat = [_match({"meta": {"key": "oifname"}}, wanted.egress),
            _match({"ct": {"key": "status"}}, "dnat", "in"),
            {"mangle": {"key": MARK, "value": 0}},
            {"masquerade": None}]
    return [{"flush": {"chain": {**t, "name": "prerouting"}}},
            {"add": {"rule": {**t, "chain": "prerouting", "expr": dispatch,
                              "comment": tag}}},
            {"flush": {"chain": {**t, "name": "postrouting"}}},
            {"add": {"rule": {**t, "chain": "postrouting", "expr": snat}}}]


def _skeleton(lb_id: str) -> list[Json]:
    t = _t(lb_id)
    return [{"add": {"table": {"family": FAMILY, "name": table_name(lb_id)}}},
            {"add": {"map": {**t, "name": "services", "type": ["inet_proto", "inet_service"],
                             "map": "verdict"}}},
            {"add": {"chain": {**t, "name": "prerouting", "type": "nat", "hook": "prerouting",
                               "prio": DSTNAT, "policy": "accept"}}},
            {"add": {"chain": {**t, "name": "postrouting", "type": "nat",
                               "hook": "postrouting", "prio": SRCNAT, "policy": "accept"}}}]


def plan(lb_id: str, held: LbTables | None, wanted: LbTables, tag: str) -> list[Json]:
    """The one transaction from ``held`` (None: unknown, whatever the kernel has of this
    balancer is replaced whole) to ``wanted``; ``tag`` goes in the dispatch rule."""
    out: list[Json] = []
    if held is None:
        # add-then-delete: deleting a table that is not there would fail the transaction.
        out += [{"add": {"table": {"family": FAMILY, "name": table_name(lb_id)}}},
                {"delete": {"table": {"family": FAMILY, "name": table_name(lb_id)}}}]
        out += _skeleton(lb_id)
        have: dict[str, ServiceTable] = {}
    else:
        have = held.by_name()
    want = wanted.by_name()
    for name in sorted(have.keys() - want.keys()):
        out += _drop_service(lb_id, have[name])
    for name, s in sorted(want.items()):
        old = have.get(name)
        if old is None:
            out += _add_service(lb_id, s)
            continue
        out += _element_changes(lb_id, name, old.buckets, s.buckets)
        if old.rule_key() != s.rule_key():
            out += _service_rule(lb_id, s)
    out += _base_rules(lb_id, wanted, tag)
    return out


def removal(lb_id: str) -> list[Json]:
    """Remove the balancer's table (a no-op transaction when there is none)."""
    name = {"family": FAMILY, "name": table_name(lb_id)}
    return [{"add": {"table": name}}, {"delete": {"table": name}}]


def removed_backends(held: LbTables | None, wanted: LbTables | None,
                     protocol: str) -> list[tuple[int, str]]:
    """(service port, backend address) pairs of ``protocol`` that ``held`` sent flows to
    and ``wanted`` does not: their conntrack entries are to be deleted."""
    if held is None:
        return []
    want = wanted.by_name() if wanted is not None else {}
    out = []
    for s in held.services:
        if s.protocol != protocol:
            continue
        keep = set(want[s.name].buckets) if s.name in want else set()
        out += [(s.port, ip) for ip in sorted(set(s.buckets) - keep)]
    return out
