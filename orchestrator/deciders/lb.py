"""Load balancers: a VIP and services in front of a pool, served by two LB nodes at once.

A balancer asks three owners for what it needs, and folds their answers:

- its pool (``AttachBalancer``) for the members that should get traffic, with their
  addresses (``PoolBackends``, again whenever that set changes);
- the scheduler (``PlaceBalancer``) for two LB nodes (``BalancerPlaced``, again when a node
  is lost and replaced);
- the pool's network (``AttachPort``, one per node slot) for each node's own port on it
  (``LbPortAddressed``).

Each node gets the full balancer in its job, and both get the same backends, health and
seed, so that both pick the same backend for a flow.

Health is decided here, from the nodes' reports (``BackendHealth``, each a rise or fall
the node saw). The rule: a backend is healthy on a service when every node serving the
balancer that has reported on it last said healthy, and at least one has. A new backend
is therefore out until a node has seen it rise, and one node seeing it fall is enough to
take it out for both (a node that cannot reach it would black-hole the flows it hashes
there; the two nodes must keep one backend set).

A member that leaves (stopped, deleted, scaled away) is drained first: it leaves the
backends; once every node has applied a job without it, no new flow reaches it, and after
``drain_ms`` more (its established flows' time to finish; the reconciler's ``DrainTick``
says when) the pool hears ``BalancerDrained`` and lets the instance go.
"""

import hashlib
import ipaddress
from typing import Literal

import msgspec

from orchestrator.deciders.base import Ctx, Decision, Event, accept, follow_ups, reject
from schemas import commands as c
from schemas.commands import SCHEDULER_ID
from schemas.ids import mac_address
from schemas.jobs import Job
from schemas.specs import Backend, LbSpec, NicSpec, Service, Strategy

Status = Literal["pending", "active", "failed", "deleted"]
SLOTS = 2
# What each protocol's dataplane offers (nftables DNAT). least_conn needs connection
# counts per backend, which nftables cannot read at DNAT time.
OFFERED: dict[str, tuple[Strategy, ...]] = {
    "tcp": ("maglev", "round_robin", "source_hash"),
    "udp": ("maglev", "source_hash", "round_robin"),
}


class Slot(msgspec.Struct, kw_only=True):
    """One of the balancer's two LB nodes, and its port on the backends' network."""

    node: str | None = None
    port: NicSpec | None = None
    observed_generation: int = 0
    error: str | None = None


class BackendState(msgspec.Struct, kw_only=True):
    ip: str
    since: int  # the generation it joined at: reports from an earlier stint are stale
    # service port -> node -> healthy, as each node last reported it
    seen: dict[int, dict[str, bool]] = {}


def _slots() -> list[Slot]:
    return [Slot() for _ in range(SLOTS)]


class LoadBalancer(msgspec.Struct, kw_only=True):
    vip: str
    pool: str
    services: tuple[Service, ...]  # strategies decided
    seed: int
    status: Status = "pending"
    reason: str | None = None  # why it waits for nodes, or failed
    network: str | None = None
    backends: dict[str, BackendState] = {}
    leaving: dict[str, int] = {}  # instance -> the generation that dropped it
    draining: dict[str, int] = {}  # instance -> when no node sent it new flows any more
    drain_ms: int = 1000
    slots: list[Slot] = msgspec.field(default_factory=_slots)
    generation: int = 0
    attempts: int = 0  # re-issues of the current generation's jobs
    issued_at: int = 0  # when they were last issued: the reconciler's clock
    stalled: str | None = None  # a node ran out of re-issues: an alert until it applies
    created_at: int = 0
    updated_at: int = 0


class Created(Event):
    vip: str
    pool: str
    services: tuple[Service, ...]
    seed: int
    at: int
    drain_ms: int = 1000


class NetworkChosen(Event):
    network: str


class BackendsSet(Event):
    added: tuple[c.Member, ...]
    removed: tuple[str, ...]
    at: int


class NodesSet(Event):
    nodes: tuple[str | None, ...]  # per slot
    dropped: tuple[str, ...]  # nodes that serve it no more: they get a removal job
    reason: str
    at: int


class PortSet(Event):
    index: int
    port: NicSpec
    at: int


class HealthSeen(Event):
    node: str
    instance: str
    port: int
    healthy: bool
    detail: str
    at: int


class SlotApplied(Event):
    index: int
    generation: int


class SlotFailed(Event):
    index: int
    generation: int
    error: str


class Drained(Event):
    instances: tuple[str, ...]


class NoNewFlows(Event):
    """Every node applied a job without these: their established flows drain now."""

    instances: tuple[str, ...]
    at: int


class Reissued(Event):
    attempt: int
    at: int


class Stalled(Event):
    reason: str
    at: int


class Failed(Event):
    reason: str
    at: int


class Deleted(Event):
    at: int


# ---- checks ------------------------------------------------------------------------------


def check_vip(vip: str) -> str | None:
    try:
        address = ipaddress.IPv4Address(vip)
    except ValueError:
        return f"VIP {vip!r} is not an IPv4 address"
    if (address.is_unspecified or address.is_loopback or address.is_multicast
            or address.is_link_local or address == ipaddress.IPv4Address("255.255.255.255")):
        return f"VIP {vip} is not a unicast address a router can carry"
    return None


def resolve_services(services: tuple[Service, ...]) -> tuple[tuple[Service, ...], str | None]:
    """The services with their strategies decided, or the reason they are refused."""
    seen: set[tuple[int, str]] = set()
    out = []
    for s in services:
        where = f"service {s.port}/{s.protocol}"
        if (s.port, s.protocol) in seen:
            return (), f"two services on {s.port}/{s.protocol}"
        seen.add((s.port, s.protocol))
        h = s.health
        if h.timeout_ms >= h.interval_ms:
            return (), (f"{where}: health check timeout {h.timeout_ms} ms must be shorter"
                        f" than its interval {h.interval_ms} ms")
        if h.http_path is not None and s.protocol != "tcp":
            return (), f"{where}: an HTTP health check needs tcp"
        strategy = s.strategy or "maglev"
        if strategy not in OFFERED[s.protocol]:
            return (), (f"{where}: strategy {strategy} is not offered for {s.protocol}"
                        f" (offered: {', '.join(OFFERED[s.protocol])})")
        out.append(msgspec.structs.replace(s, strategy=strategy))
    return tuple(out), None


def seed_of(lb_id: str) -> int:
    """The consistent table's seed: the same on both nodes, and on every replay."""
    return int.from_bytes(hashlib.sha256(f"lb/{lb_id}".encode()).digest()[:4], "big")


def port_mac(lb_id: str, slot: int) -> str:
    return mac_address(f"lb/{lb_id}", slot)  # no instance id holds a "/"


# ---- health ------------------------------------------------------------------------------


def _nodes(state: LoadBalancer) -> list[str]:
    return [s.node for s in state.slots if s.node is not None]


def healthy_ports(state: LoadBalancer, backend: BackendState) -> tuple[int, ...]:
    """The service ports on which the fold counts the backend healthy (the module's rule)."""
    nodes = _nodes(state)
    out = []
    for service in state.services:
        views = [v for n, v in backend.seen.get(service.port, {}).items() if n in nodes]
        if views and all(views):
            out.append(service.port)
    return tuple(out)


def without_healthy_backend(state: LoadBalancer) -> list[int]:
    """The service ports that no backend would answer: an alert."""
    up = {p for b in state.backends.values() for p in healthy_ports(state, b)}
    return [s.port for s in state.services if s.port not in up]


# ---- decide ------------------------------------------------------------------------------


def decide(state: LoadBalancer | None, cmd: c.Command, ctx: Ctx) -> Decision:
    if isinstance(cmd, c.CreateLoadBalancer):
        return _create(state, cmd, ctx)
    if state is None:
        return reject(f"no load balancer {cmd.id}")
    if state.status == "deleted":
        return accept() if isinstance(cmd, c.DeleteLoadBalancer | c.LbApplied) else reject(
            f"load balancer {cmd.id} is deleted")
    match cmd:
        case c.DeleteLoadBalancer():
            return _end(state, cmd.id, ctx, Deleted(at=ctx.at), detach=True)
        case c.LbApplied() | c.LbFailed():
            return _report(state, cmd, ctx)
        case c.ReconcileLb():
            return _reconcile(state, cmd, ctx)
        case c.DrainTick():
            due = drains_due(state, ctx.at)
            return _release(state, cmd.id, ctx, due) if due else accept()
    if state.status == "failed":
        return reject(f"load balancer {cmd.id} failed: {state.reason}")
    match cmd:
        case c.PoolRefused():
            return _end(state, cmd.id, ctx, Failed(reason=cmd.reason, at=ctx.at))
        case c.PoolBackends():
            return _backends(state, cmd, ctx)
        case c.BalancerPlaced():
            return _placed(state, cmd, ctx)
        case c.LbPortAddressed():
            return _addressed(state, cmd, ctx)
        case c.LbPortRefused():
            return _end(state, cmd.id, ctx, Failed(
                reason=f"node port {cmd.index} on network {cmd.network}: {cmd.reason}",
                at=ctx.at), detach=True)
        case c.BackendHealth():
            return _health(state, cmd, ctx)
        case c.PoolMembers():
            return reject("PoolMembers is retired: pools send PoolBackends")
    return reject(f"{type(cmd).__name__} does not apply to a load balancer")


def _create(state: LoadBalancer | None, cmd: c.CreateLoadBalancer, ctx: Ctx) -> Decision:
    if state is not None and state.status not in ("failed", "deleted"):
        return reject(f"load balancer {cmd.id} already exists ({state.status})")
    reason = check_vip(cmd.vip)
    services, refused = resolve_services(cmd.services)
    reason = reason or refused
    if reason is not None:
        return reject(reason)
    return accept(
        Created(vip=cmd.vip, pool=cmd.pool, services=services, seed=seed_of(cmd.id),
                at=ctx.at, drain_ms=cmd.drain_ms),
        commands=follow_ups(ctx, (c.AttachBalancer, dict(id=cmd.pool, lb=cmd.id)),
                            (c.PlaceBalancer, dict(id=SCHEDULER_ID, lb=cmd.id))))


def _end(state: LoadBalancer, lb_id: str, ctx: Ctx, event: Deleted | Failed, *,
         detach: bool = False) -> Decision:
    """Deleted or failed: its nodes get removal jobs; the pool, the scheduler and the
    network let go of it; whoever waits for a drain is let go too."""
    make: list[tuple[type, dict]] = []
    if detach:
        make.append((c.DetachBalancer, dict(id=state.pool, lb=lb_id)))
    make.append((c.ReleaseBalancer, dict(id=SCHEDULER_ID, lb=lb_id)))
    if state.network is not None:
        make.append((c.DetachPort, dict(id=state.network, instance=lb_id, owner="lb")))
    waiting = sorted(state.leaving.keys() | state.draining.keys())
    make += [(c.BalancerDrained, dict(id=state.pool, lb=lb_id, instance=i)) for i in waiting]
    drained = [Drained(tuple(waiting))] if waiting else []
    return accept(event, *drained, note=getattr(event, "reason", None),
                  commands=follow_ups(ctx, *make))


def _backends(state: LoadBalancer, cmd: c.PoolBackends, ctx: Ctx) -> Decision:
    events: list[Event] = []
    make: list[tuple[type, dict]] = []
    if state.network is None:
        if cmd.network is None:
            return _end(state, cmd.id, ctx, Failed(
                reason=f"pool {state.pool}'s template has no NIC: its members cannot be"
                       " reached", at=ctx.at), detach=True)
        events.append(NetworkChosen(cmd.network))
        make += [(c.AttachPort, dict(id=cmd.network, instance=cmd.id, index=i,
                                     mac=port_mac(cmd.id, i), owner="lb"))
                 for i in range(SLOTS)]
    wanted = {m.instance: m for m in cmd.backends}
    added = tuple(m for i, m in sorted(wanted.items())
                  if i not in state.backends or state.backends[i].ip != m.ip)
    removed = tuple(sorted(i for i, b in state.backends.items()
                           if i not in wanted or wanted[i].ip != b.ip))
    if added or removed:
        events.append(BackendsSet(added=added, removed=removed, at=ctx.at))
        # Nobody serves yet: nothing to wait for.
        if removed and not _serving_slots(state):
            make += [(c.BalancerDrained, dict(id=state.pool, lb=cmd.id, instance=i))
                     for i in removed]
            events.append(Drained(removed))
    return accept(*events, commands=follow_ups(ctx, *make))


def _serving_slots(state: LoadBalancer) -> list[Slot]:
    """The slots whose node has been sent jobs: those a drain waits for."""
    return [s for s in state.slots if s.node is not None and s.port is not None]


def _placed(state: LoadBalancer, cmd: c.BalancerPlaced, ctx: Ctx) -> Decision:
    nodes: list[str | None] = [s.node if s.node in cmd.nodes else None for s in state.slots]
    for node in cmd.nodes:
        if node not in nodes:
            nodes[nodes.index(None)] = node
    dropped = tuple(sorted(s.node for s in state.slots
                           if s.node is not None and s.node not in cmd.nodes))
    if tuple(nodes) == tuple(s.node for s in state.slots) and cmd.reason == (state.reason or ""):
        return accept()
    binds = [(c.BindPort, dict(id=state.network, instance=cmd.id, host=node, owner="lb",
                               index=i))
             for i, (node, slot) in enumerate(zip(nodes, state.slots, strict=True))
             if node is not None and node != slot.node and slot.port is not None
             and state.network is not None]
    event = NodesSet(nodes=tuple(nodes), dropped=dropped, reason=cmd.reason, at=ctx.at)
    drained = _drained_after(state, {i: None for i, n in enumerate(nodes) if n is None
                                     or n != state.slots[i].node})
    done = _no_new_flows(state, cmd.id, ctx, drained, start=len(binds))
    return accept(event, *done.events, note=cmd.reason or None,
                  commands=follow_ups(ctx, *binds) + done.commands)


def _drained_after(state: LoadBalancer, observed: dict[int, int | None]) -> tuple[str, ...]:
    """The leaving backends no node serves any more once slots take the ``observed``
    generations (None: the slot no longer counts, its node is gone or new)."""
    out = []
    for instance, generation in sorted(state.leaving.items()):
        waits = [observed.get(i, s.observed_generation) for i, s in enumerate(state.slots)
                 if s.node is not None and s.port is not None]
        if all(g is None or g >= generation for g in waits):
            out.append(instance)
    return tuple(out)


def _addressed(state: LoadBalancer, cmd: c.LbPortAddressed, ctx: Ctx) -> Decision:
    if not 0 <= cmd.index < SLOTS or state.slots[cmd.index].port is not None:
        return accept()  # answered twice
    port = NicSpec(network=cmd.network, vni=cmd.vni, mac=cmd.mac, ip=cmd.ip,
                   prefix=cmd.prefix, mtu=cmd.mtu)
    cidr = ipaddress.IPv4Network(f"{port.ip}/{port.prefix}", strict=False)
    if ipaddress.IPv4Address(state.vip) in cidr:
        return _end(state, cmd.id, ctx, Failed(
            reason=f"VIP {state.vip} lies inside {cidr}, the CIDR of network {port.network}"
                   " behind it: replies would never come back through a node", at=ctx.at),
            detach=True)
    node = state.slots[cmd.index].node
    binds = [] if node is None else [(c.BindPort, dict(
        id=port.network, instance=cmd.id, host=node, owner="lb", index=cmd.index))]
    return accept(PortSet(index=cmd.index, port=port, at=ctx.at),
                  commands=follow_ups(ctx, *binds))


def _health(state: LoadBalancer, cmd: c.BackendHealth, ctx: Ctx) -> Decision:
    if ctx.source not in _nodes(state):
        return accept(note=f"{ctx.source} does not serve {cmd.id} (any more): ignored")
    backend = state.backends.get(cmd.instance)
    if backend is None or cmd.generation < backend.since:
        return accept(note=f"{cmd.instance} is not a backend of {cmd.id} (any more): ignored")
    if all(s.port != cmd.port for s in state.services):
        return reject(f"{cmd.id} has no service on port {cmd.port}")
    if backend.seen.get(cmd.port, {}).get(ctx.source) == cmd.healthy:
        return accept()
    word = "healthy" if cmd.healthy else "unhealthy"
    return accept(HealthSeen(node=ctx.source, instance=cmd.instance, port=cmd.port,
                             healthy=cmd.healthy, detail=cmd.detail, at=ctx.at),
                  note=f"{cmd.instance}:{cmd.port} {word} as {ctx.source} sees it"
                       + (f" ({cmd.detail})" if cmd.detail else ""))


def _report(state: LoadBalancer, cmd: c.LbApplied | c.LbFailed, ctx: Ctx) -> Decision:
    index = next((i for i, s in enumerate(state.slots) if s.node == ctx.source), None)
    if index is None:
        return accept()  # a node it left: its removal job's report
    slot = state.slots[index]
    if cmd.generation > state.generation:
        return reject(f"report for generation {cmd.generation} > {state.generation}")
    if cmd.generation < slot.observed_generation:
        return accept()
    if isinstance(cmd, c.LbFailed):
        return accept(SlotFailed(index=index, generation=cmd.generation, error=cmd.error),
                      note=cmd.error)
    drained = _drained_after(state, {index: cmd.generation})
    done = _no_new_flows(state, cmd.id, ctx, drained)
    return accept(SlotApplied(index=index, generation=cmd.generation), *done.events,
                  commands=done.commands)


def _no_new_flows(state: LoadBalancer, lb_id: str, ctx: Ctx, instances: tuple[str, ...],
                  start: int = 0) -> Decision:
    """No node sends ``instances`` new flows: they drain, or go at once with no drain."""
    if not instances:
        return accept()
    if state.drain_ms == 0:
        return _release(state, lb_id, ctx, instances, start)
    return accept(NoNewFlows(instances, ctx.at))


def drains_due(state: LoadBalancer, now_ms: int) -> tuple[str, ...]:
    """The draining members whose established flows have had their time."""
    return tuple(sorted(i for i, since in state.draining.items()
                        if since + state.drain_ms <= now_ms))


def _release(state: LoadBalancer, lb_id: str, ctx: Ctx, instances: tuple[str, ...],
             start: int = 0) -> Decision:
    return accept(Drained(instances), commands=follow_ups(ctx, *[(c.BalancerDrained, dict(
        id=state.pool, lb=lb_id, instance=i)) for i in instances], start=start))


def lagging(state: LoadBalancer) -> list[int]:
    """The slots whose node has not applied the current generation."""
    return [i for i, s in enumerate(state.slots)
            if _sent_jobs(state, s) and s.observed_generation < state.generation]


def _sent_jobs(state: LoadBalancer, slot: Slot) -> bool:
    """A node is sent the balancer once its port is known, and its removal in any case."""
    return slot.node is not None and (slot.port is not None
                                      or state.status in ("deleted", "failed"))


def _reconcile(state: LoadBalancer, cmd: c.ReconcileLb, ctx: Ctx) -> Decision:
    late = lagging(state)
    if cmd.generation != state.generation or not late or state.stalled:
        return accept()  # applied meanwhile, a newer generation is on its way, or alerted
    if state.attempts >= cmd.max_attempts:
        nodes = [state.slots[i].node or "" for i in late]
        errors = sorted({e for i in late if (e := state.slots[i].error)})
        reason = (f"nodes {', '.join(nodes)} did not apply generation {state.generation}"
                  + (f": {'; '.join(errors)}" if errors else ""))
        return accept(Stalled(reason=reason, at=ctx.at), note=reason)
    return accept(Reissued(attempt=state.attempts + 1, at=ctx.at))


# ---- evolve ------------------------------------------------------------------------------


def evolve(state: LoadBalancer | None, event: Event) -> LoadBalancer:
    if isinstance(event, Created):
        generation = state.generation if state is not None else 0
        return LoadBalancer(vip=event.vip, pool=event.pool, services=event.services,
                            seed=event.seed, drain_ms=event.drain_ms, generation=generation,
                            created_at=event.at, updated_at=event.at)
    assert state is not None
    match event:
        case NetworkChosen():
            state.network = event.network
        case BackendsSet():
            _new_generation(state, event.at)
            for instance in event.removed:
                del state.backends[instance]
                state.leaving[instance] = state.generation
            for m in event.added:
                state.backends[m.instance] = BackendState(ip=m.ip, since=state.generation)
                state.leaving.pop(m.instance, None)
                state.draining.pop(m.instance, None)
        case NodesSet():
            for slot, node in zip(state.slots, event.nodes, strict=True):
                if slot.node != node:
                    slot.node, slot.observed_generation, slot.error = node, 0, None
            state.reason = event.reason or None
            _new_generation(state, event.at)
            _status(state)
        case PortSet():
            state.slots[event.index].port = event.port
            _new_generation(state, event.at)
            _status(state)
        case HealthSeen():
            backend = state.backends[event.instance]
            before = healthy_ports(state, backend)
            backend.seen.setdefault(event.port, {})[event.node] = event.healthy
            if healthy_ports(state, backend) != before:
                _new_generation(state, event.at)
        case SlotApplied():
            slot = state.slots[event.index]
            slot.observed_generation, slot.error = event.generation, None
            if not lagging(state):  # late, but applied: the alert is over
                state.stalled = None
        case SlotFailed():
            state.slots[event.index].error = event.error
        case NoNewFlows():
            for instance in event.instances:
                del state.leaving[instance]
                state.draining[instance] = event.at
        case Drained():
            for instance in event.instances:
                state.leaving.pop(instance, None)
                state.draining.pop(instance, None)
        case Reissued():
            state.attempts, state.issued_at = event.attempt, event.at
        case Stalled():
            state.stalled = event.reason
        case Failed():
            state.status, state.reason = "failed", event.reason
            _new_generation(state, event.at)
        case Deleted():
            state.status = "deleted"
            _new_generation(state, event.at)
    state.updated_at = getattr(event, "at", state.updated_at)
    return state


def _new_generation(state: LoadBalancer, at: int) -> None:
    state.generation += 1
    state.attempts, state.issued_at, state.stalled = 0, at, None


def _status(state: LoadBalancer) -> None:
    ready = all(s.node is not None and s.port is not None for s in state.slots)
    state.status = "active" if ready else "pending"


# ---- jobs --------------------------------------------------------------------------------


def node_spec(state: LoadBalancer, slot: Slot) -> LbSpec:
    assert slot.port is not None and state.network is not None
    backends = tuple(Backend(instance=i, ip=b.ip, network=state.network,
                             healthy=healthy_ports(state, b))
                     for i, b in sorted(state.backends.items()))
    return LbSpec(vip=state.vip, services=state.services, backends=backends, seed=state.seed,
                  port=slot.port)


def jobs(kind: str, id: str, before_generation: int, state: LoadBalancer,
         events: list[Event]) -> list[Job]:
    """Both nodes' full balancer whenever it changed; a removal job to a node it left, and
    to both when it is deleted or failed; re-issued, to the nodes still late."""
    reissued = any(isinstance(e, Reissued) for e in events)
    if state.generation == before_generation and not reissued:
        return []
    late = lagging(state) if state.generation == before_generation else None
    gone = state.status in ("deleted", "failed")
    out: list[Job] = [
        Job(kind=kind, id=id, host=slot.node, generation=state.generation,
            attempt=state.attempts, spec=None if gone else node_spec(state, slot))
        for i, slot in enumerate(state.slots)
        if slot.node is not None and _sent_jobs(state, slot) and (late is None or i in late)]
    out.extend(Job(kind=kind, id=id, host=node, generation=state.generation, spec=None)
               for e in events if isinstance(e, NodesSet) for node in e.dropped)
    return out
