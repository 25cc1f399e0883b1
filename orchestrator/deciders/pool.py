"""Instance pools: a template and a size; scaling creates or deletes member instances."""

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


def _scale(pool_id: str, state: Pool, size: int, ctx: Ctx) -> Decision:
    grow = max(0, size - len(state.members))
    added = tuple(f"{pool_id}-{state.next_index + i}" for i in range(grow))
    if added and not is_valid_id(added[-1]):
        return reject(f"pool id {pool_id!r} is too long to name its members")
    removed = tuple(state.members[size:][::-1]) if size < len(state.members) else ()
    members = [m for m in state.members if m not in removed] + list(added)
    commands = follow_ups(
        ctx,
        *[(c.CreateInstance, dict(id=m, template=state.template, pool=pool_id)) for m in added],
        *[(c.DeleteInstance, dict(id=m)) for m in removed],
        *[(c.PoolMembers, dict(id=lb, members=tuple(members))) for lb in state.balancers
          if added or removed],
    )
    return accept(Scaled(size=size, added=added, removed=removed), commands=commands)


def decide(state: Pool | None, cmd: c.Command, ctx: Ctx) -> Decision:
    if isinstance(cmd, c.CreatePool):
        if state is not None:
            return reject(f"pool {cmd.id} already exists")
        empty = Pool(template=cmd.template, size=0)
        scaled = _scale(cmd.id, empty, cmd.size, ctx)
        if not scaled.accepted:
            return scaled
        return accept(Created(template=cmd.template), *scaled.events, commands=scaled.commands)
    if state is None or state.deleted:
        return reject(f"no pool {cmd.id}")
    match cmd:
        case c.ScalePool():
            return accept() if cmd.size == state.size else _scale(cmd.id, state, cmd.size, ctx)
        case c.DeletePool():
            removed = tuple(state.members)
            return accept(Deleted(removed=removed), commands=follow_ups(
                ctx,
                *[(c.DeleteInstance, dict(id=m)) for m in removed],
                *[(c.PoolMembers, dict(id=lb, members=())) for lb in state.balancers],
            ))
        case c.AttachBalancer():
            if cmd.lb in state.balancers:
                return accept()
            return accept(BalancerAttached(cmd.lb), commands=follow_ups(
                ctx, (c.PoolMembers, dict(id=cmd.lb, members=tuple(state.members)))))
        case c.DetachBalancer():
            return accept(BalancerDetached(cmd.lb)) if cmd.lb in state.balancers else accept()
    return reject(f"{type(cmd).__name__} does not apply to a pool")


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
    return state
