"""Instance pools: a template and a size; scaling creates or deletes member instances.

A pool also stands between its members and its balancers: members tell it whether they
should get traffic (``MemberState``), and it sends each balancer the whole serving set
with addresses (``PoolBackends``) whenever that changes. A member that leaves (stopped or
deleted) is let go (``MemberDrained``) only once every balancer has drained it
(``BalancerDrained``), so that no new flow reaches an instance being torn down.
"""

import msgspec

from orchestrator.deciders.base import Ctx, Decision, Event, accept, follow_ups, reject
from schemas import commands as c
from schemas.ids import is_valid_id
from schemas.specs import InstanceTemplate


class Pool(msgspec.Struct, kw_only=True):
    template: InstanceTemplate
    size: int
    members: list[str] = []
    next_index: int = 0  # member ids are never reused
    balancers: list[str] = []
    deleted: bool = False
    backends: dict[str, str] = {}  # serving member -> its address on the pool's network
    draining: dict[str, list[str]] = {}  # leaving member -> balancers yet to let it go


class Created(Event):
    template: InstanceTemplate


class Scaled(Event):
    size: int
    added: tuple[str, ...]
    removed: tuple[str, ...]


class BalancerAttached(Event):
    lb: str


class BalancerDetached(Event):
    lb: str


class Deleted(Event):
    removed: tuple[str, ...]


class Serving(Event):
    instance: str
    ip: str


class Idle(Event):
    instance: str


class DrainStarted(Event):
    instance: str
    balancers: tuple[str, ...]


class DrainProgressed(Event):
    instance: str
    lb: str


class DrainEnded(Event):
    """Every balancer let the member go, or it came back before they did."""

    instance: str


def network_of(template: InstanceTemplate) -> str | None:
    """Balancers reach members on their first NIC's network."""
    return template.nics[0].network if template.nics else None


def _scale(pool_id: str, state: Pool, size: int, ctx: Ctx) -> Decision:
    grow = max(0, size - len(state.members))
    added = tuple(f"{pool_id}-{state.next_index + i}" for i in range(grow))
    if added and not is_valid_id(added[-1]):
        return reject(f"pool id {pool_id!r} is too long to name its members")
    removed = tuple(state.members[size:][::-1]) if size < len(state.members) else ()
    commands = follow_ups(
        ctx,
        *[(c.CreateInstance, dict(id=m, template=state.template, pool=pool_id)) for m in added],
        *[(c.DeleteInstance, dict(id=m)) for m in removed],
    )
    return accept(Scaled(size=size, added=added, removed=removed), commands=commands)


def _backends_to(ctx: Ctx, state: Pool, backends: dict[str, str], balancers: list[str],
                 start: int = 0) -> list[c.Command]:
    members = tuple(c.Member(instance=i, ip=ip) for i, ip in sorted(backends.items()))
    return follow_ups(ctx, *[(c.PoolBackends, dict(
        id=lb, network=network_of(state.template), backends=members)) for lb in balancers],
        start=start)


def decide(state: Pool | None, cmd: c.Command, ctx: Ctx) -> Decision:
    if isinstance(cmd, c.CreatePool):
        if state is not None:
            return reject(f"pool {cmd.id} already exists")
        empty = Pool(template=cmd.template, size=0)
        scaled = _scale(cmd.id, empty, cmd.size, ctx)
        if not scaled.accepted:
            return scaled
        return accept(Created(template=cmd.template), *scaled.events, commands=scaled.commands)
    if isinstance(cmd, c.AttachBalancer) and (state is None or state.deleted):
        reason = f"no pool {cmd.id}" + (" (deleted)" if state is not None else "")
        return reject(reason, commands=follow_ups(ctx, (c.PoolRefused, dict(
            id=cmd.lb, reason=reason))))
    if state is None:
        return reject(f"no pool {cmd.id}")
    # A deleted pool still drains its members and lets its balancers go.
    match cmd:
        case c.MemberState():
            return _member(state, cmd, ctx)
        case c.BalancerDrained():
            if cmd.lb not in state.draining.get(cmd.instance, []):
                return accept()
            return _progress(state, cmd.instance, cmd.lb, ctx)
        case c.DetachBalancer():
            if cmd.lb not in state.balancers:
                return accept()
            events: list[Event] = [BalancerDetached(cmd.lb)]
            commands: list[c.Command] = []
            for instance, waiting in sorted(state.draining.items()):
                if cmd.lb in waiting:
                    progress = _progress(state, instance, cmd.lb, ctx, start=len(commands))
                    events += progress.events
                    commands += progress.commands
            return accept(*events, commands=commands)
    if state.deleted:
        return reject(f"no pool {cmd.id} (deleted)")
    match cmd:
        case c.ScalePool():
            return accept() if cmd.size == state.size else _scale(cmd.id, state, cmd.size, ctx)
        case c.DeletePool():
            removed = tuple(state.members)
            return accept(Deleted(removed=removed), commands=follow_ups(
                ctx, *[(c.DeleteInstance, dict(id=m)) for m in removed]))
        case c.AttachBalancer():
            if cmd.lb in state.balancers:
                return accept()
            return accept(BalancerAttached(cmd.lb),
                          commands=_backends_to(ctx, state, state.backends, [cmd.lb]))
    return reject(f"{type(cmd).__name__} does not apply to a pool")


def _member(state: Pool, cmd: c.MemberState, ctx: Ctx) -> Decision:
    known = (cmd.instance in state.members or cmd.instance in state.backends
             or cmd.instance in state.draining)
    if not known:
        return accept(note=f"{cmd.instance} is not a member of {cmd.id}: ignored")
    events: list[Event] = []
    backends = dict(state.backends)
    if cmd.serving and cmd.ip is not None:
        if backends.get(cmd.instance) != cmd.ip:
            events.append(Serving(instance=cmd.instance, ip=cmd.ip))
            backends[cmd.instance] = cmd.ip
    elif cmd.instance in backends:
        events.append(Idle(cmd.instance))
        del backends[cmd.instance]
    commands = _backends_to(ctx, state, backends, state.balancers) if events else []
    if cmd.leaving and cmd.instance not in state.draining:
        if state.balancers:
            events.append(DrainStarted(instance=cmd.instance,
                                       balancers=tuple(state.balancers)))
        else:
            commands += follow_ups(ctx, (c.MemberDrained, dict(id=cmd.instance)),
                                   start=len(commands))
    elif not cmd.leaving and cmd.instance in state.draining:
        events.append(DrainEnded(cmd.instance))  # it stays after all
    return accept(*events, commands=commands)


def _progress(state: Pool, instance: str, lb: str, ctx: Ctx, start: int = 0) -> Decision:
    if state.draining[instance] != [lb]:
        return accept(DrainProgressed(instance=instance, lb=lb))
    return accept(DrainProgressed(instance=instance, lb=lb), DrainEnded(instance),
                  commands=follow_ups(ctx, (c.MemberDrained, dict(id=instance)), start=start))


def evolve(state: Pool | None, event: Event) -> Pool:
    if isinstance(event, Created):
        return Pool(template=event.template, size=0)
    assert state is not None
    match event:
        case Scaled():
            state.members = [m for m in state.members if m not in event.removed]
            state.members.extend(event.added)
            state.size = event.size
            state.next_index += len(event.added)
        case BalancerAttached():
            state.balancers.append(event.lb)
        case BalancerDetached():
            state.balancers.remove(event.lb)
        case Deleted():
            state.members, state.size, state.deleted = [], 0, True
        case Serving():
            state.backends[event.instance] = event.ip
        case Idle():
            del state.backends[event.instance]
        case DrainStarted():
            state.draining[event.instance] = list(event.balancers)
        case DrainProgressed():
            state.draining[event.instance].remove(event.lb)
        case DrainEnded():
            state.draining.pop(event.instance, None)
    return state
