"""Placement: one entity owns every host's free capacity, so placements never race.

Instances ask it with ``Place`` and it answers with ``Placed``, or with ``PlacementFailed``
while it keeps the request waiting: capacity arriving later (a host registered or back up,
an instance released) places waiting requests first come, first served. The choice is
deterministic: most free memory, then most free vCPUs, then the host's name.

It also owns the LB nodes: each balancer is placed on two (`_replace_balancers`).
"""

import msgspec

from orchestrator.deciders.base import Ctx, Decision, Event, accept, follow_ups, reject
from schemas import commands as c
from schemas.commands import SCHEDULER_ID
from schemas.specs import HostCondition


class Slot(msgspec.Struct, kw_only=True):
    vcpus: int
    memory_mib: int
    condition: HostCondition
    used_vcpus: int = 0
    used_memory_mib: int = 0


class Allocation(msgspec.Struct, array_like=True):
    host: str
    vcpus: int
    memory_mib: int


class Request(msgspec.Struct, array_like=True):
    instance: str
    vcpus: int
    memory_mib: int


class Scheduler(msgspec.Struct, kw_only=True):
    hosts: dict[str, Slot] = {}
    allocations: dict[str, Allocation] = {}
    waiting: list[Request] = []
    # LB nodes: their condition, and the nodes of each balancer (two, or fewer while it
    # waits for a node; the waiting ones in the order they asked).
    lb_nodes: dict[str, HostCondition] = {}
    balancers: dict[str, list[str]] = {}


class CapacitySet(Event):
    host: str
    vcpus: int
    memory_mib: int
    condition: HostCondition


class Allocated(Event):
    instance: str
    host: str
    vcpus: int
    memory_mib: int


class Queued(Event):
    request: Request


class Freed(Event):
    instance: str


class LbNodeSet(Event):
    host: str
    condition: HostCondition


class BalancerNodes(Event):
    """The nodes of a balancer, as they are now (empty: it is no longer placed)."""

    lb: str
    nodes: tuple[str, ...]
    reason: str = ""


class BalancerReleased(Event):
    lb: str


Free = dict[str, list[int]]  # host -> [free memory, free vCPUs], schedulable hosts only


def _free(hosts: dict[str, Slot]) -> Free:
    return {name: [s.memory_mib - s.used_memory_mib, s.vcpus - s.used_vcpus]
            for name, s in hosts.items() if s.condition == "up"}


def _choose(free: Free, req: Request) -> str | None:
    fits = [(-mem, -cpu, name) for name, (mem, cpu) in free.items()
            if mem >= req.memory_mib and cpu >= req.vcpus]
    return min(fits)[2] if fits else None


def _place(free: Free, requests: list[Request]) -> list[Allocated]:
    """Place what fits, in order, updating ``free`` as it goes."""
    placed = []
    for req in requests:
        host = _choose(free, req)
        if host is not None:
            free[host][0] -= req.memory_mib
            free[host][1] -= req.vcpus
            placed.append(Allocated(instance=req.instance, host=host, vcpus=req.vcpus,
                                    memory_mib=req.memory_mib))
    return placed


def _answer(ctx: Ctx, *events: Event, refused: tuple[Request, str] | None = None) -> Decision:
    placed = [(c.Placed, dict(id=e.instance, host=e.host))
              for e in events if isinstance(e, Allocated)]
    failed = [(c.PlacementFailed, dict(id=refused[0].instance, reason=refused[1]))] \
        if refused else []
    return accept(*events, commands=follow_ups(ctx, *placed, *failed))


# ---- LB nodes: each balancer on two, spread by load -------------------------------------

NODES_PER_BALANCER = 2


def _waiting_reason(lb_nodes: dict[str, HostCondition], have: int) -> str:
    if have >= NODES_PER_BALANCER:
        return ""
    up = sum(1 for condition in lb_nodes.values() if condition == "up")
    return (f"on {have} of {NODES_PER_BALANCER} LB nodes: waiting for another"
            f" ({up} LB node{'s' if up != 1 else ''} up)")


def _replace_balancers(lb_nodes: dict[str, HostCondition], balancers: dict[str, list[str]],
                       asking: str | None = None) -> list[BalancerNodes]:
    """Every balancer whose nodes change: a node that is not up is dropped, and a balancer
    short of nodes takes the least loaded up nodes it does not have (then by name), in the
    order the balancers asked. A first placement takes two nodes or waits for them; a
    balancer that lost one keeps serving on the other meanwhile. Deterministic."""
    up = {n for n, condition in lb_nodes.items() if condition == "up"}
    now = {lb: [n for n in nodes if n in up] for lb, nodes in balancers.items()}
    load = {n: 0 for n in up}
    for nodes in now.values():
        for n in nodes:
            load[n] += 1
    changed: list[BalancerNodes] = []
    for lb, nodes in now.items():
        free = sorted((load[n], n) for n in up if n not in nodes)
        need = NODES_PER_BALANCER - len(nodes)
        if nodes or len(free) >= need:  # a first placement needs both at once
            for _, n in free[:need]:
                nodes.append(n)
                load[n] += 1
        if nodes != balancers[lb] or lb == asking:
            changed.append(BalancerNodes(lb=lb, nodes=tuple(nodes),
                                         reason=_waiting_reason(lb_nodes, len(nodes))))
    return changed


def _balancers_answer(ctx: Ctx, *events: Event) -> Decision:
    return accept(*events, commands=follow_ups(ctx, *[
        (c.BalancerPlaced, dict(id=e.lb, nodes=e.nodes, reason=e.reason))
        for e in events if isinstance(e, BalancerNodes)]))


def decide(state: Scheduler | None, cmd: c.Command, ctx: Ctx) -> Decision:
    if cmd.id != SCHEDULER_ID:
        return reject(f"the scheduler is {SCHEDULER_ID!r}, not {cmd.id!r}")
    state = state or Scheduler()
    match cmd:
        case c.HostCapacity():
            hosts = dict(state.hosts)
            old = hosts.get(cmd.host)
            hosts[cmd.host] = Slot(vcpus=cmd.vcpus, memory_mib=cmd.memory_mib,
                                   condition=cmd.condition,
                                   used_vcpus=old.used_vcpus if old else 0,
                                   used_memory_mib=old.used_memory_mib if old else 0)
            changed = CapacitySet(host=cmd.host, vcpus=cmd.vcpus, memory_mib=cmd.memory_mib,
                                  condition=cmd.condition)
            return _answer(ctx, changed, *_place(_free(hosts), state.waiting))
        case c.Place():
            held = state.allocations.get(cmd.instance)
            if held is not None:  # asked twice: answer the same
                return accept(commands=follow_ups(ctx, (c.Placed, dict(
                    id=cmd.instance, host=held.host))))
            if any(w.instance == cmd.instance for w in state.waiting):
                return accept()
            req = Request(cmd.instance, cmd.vcpus, cmd.memory_mib)
            placed = _place(_free(state.hosts), [req])
            if placed:
                return _answer(ctx, *placed)
            reason = f"no host has {cmd.vcpus} vCPUs and {cmd.memory_mib} MiB free (waiting)"
            return _answer(ctx, Queued(req), refused=(req, reason))
        case c.LbNode():
            if state.lb_nodes.get(cmd.host) == cmd.condition:
                return accept()
            nodes = {**state.lb_nodes, cmd.host: cmd.condition}
            return _balancers_answer(ctx, LbNodeSet(host=cmd.host, condition=cmd.condition),
                                     *_replace_balancers(nodes, state.balancers))
        case c.PlaceBalancer():
            if cmd.lb in state.balancers:  # asked twice: answer the same
                nodes = state.balancers[cmd.lb]
                return accept(commands=follow_ups(ctx, (c.BalancerPlaced, dict(
                    id=cmd.lb, nodes=tuple(nodes), reason=_waiting_reason(
                        state.lb_nodes, len(nodes))))))
            return _balancers_answer(ctx, *_replace_balancers(
                state.lb_nodes, {**state.balancers, cmd.lb: []}, asking=cmd.lb))
        case c.ReleaseBalancer():
            if cmd.lb not in state.balancers:
                return accept()
            rest = {lb: nodes for lb, nodes in state.balancers.items() if lb != cmd.lb}
            return _balancers_answer(ctx, BalancerReleased(cmd.lb),
                                     *_replace_balancers(state.lb_nodes, rest))
        case c.Release():
            alloc = state.allocations.get(cmd.instance)
            if alloc is None:
                waiting = any(w.instance == cmd.instance for w in state.waiting)
                return accept(Freed(cmd.instance)) if waiting else accept()
            free = _free(state.hosts)
            if alloc.host in free:
                free[alloc.host][0] += alloc.memory_mib
                free[alloc.host][1] += alloc.vcpus
            return _answer(ctx, Freed(cmd.instance), *_place(free, state.waiting))
    return reject(f"{type(cmd).__name__} does not apply to the scheduler")


def evolve(state: Scheduler | None, event: Event) -> Scheduler:
    state = state or Scheduler()
    match event:
        case CapacitySet():
            slot = state.hosts.get(event.host)
            if slot is None:
                state.hosts[event.host] = Slot(vcpus=event.vcpus, memory_mib=event.memory_mib,
                                               condition=event.condition)
            else:
                slot.vcpus, slot.memory_mib = event.vcpus, event.memory_mib
                slot.condition = event.condition
        case Allocated():
            slot = state.hosts[event.host]
            slot.used_vcpus += event.vcpus
            slot.used_memory_mib += event.memory_mib
            state.allocations[event.instance] = Allocation(event.host, event.vcpus,
                                                           event.memory_mib)
            state.waiting = [w for w in state.waiting if w.instance != event.instance]
        case Queued():
            state.waiting.append(event.request)
        case LbNodeSet():
            state.lb_nodes[event.host] = event.condition
        case BalancerNodes():
            state.balancers[event.lb] = list(event.nodes)
        case BalancerReleased():
            del state.balancers[event.lb]
        case Freed():
            alloc = state.allocations.pop(event.instance, None)
            if alloc is None:
                state.waiting = [w for w in state.waiting if w.instance != event.instance]
            else:
                slot = state.hosts[alloc.host]
                slot.used_vcpus -= alloc.vcpus
                slot.used_memory_mib -= alloc.memory_mib
    return state
