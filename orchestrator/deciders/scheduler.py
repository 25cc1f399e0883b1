"""Placement: one entity owns every host's free capacity, so placements never race.

Instances ask it with ``Place`` and it answers with ``Placed``, or with ``PlacementFailed``
while it keeps the request waiting: capacity arriving later (a host registered or back up,
an instance released) places waiting requests first come, first served. The choice is
deterministic: most free memory, then most free vCPUs, then the host's name.
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
        case Freed():
            alloc = state.allocations.pop(event.instance, None)
            if alloc is None:
                state.waiting = [w for w in state.waiting if w.instance != event.instance]
            else:
                slot = state.hosts[alloc.host]
                slot.used_vcpus -= alloc.vcpus
                slot.used_memory_mib -= alloc.memory_mib
    return state
