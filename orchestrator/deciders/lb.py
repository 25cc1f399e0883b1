"""Load balancers: a VIP and services in front of a pool, whose members it follows."""

import msgspec

from orchestrator.deciders.base import Ctx, Decision, Event, accept, follow_ups, reject
from schemas import commands as c
from schemas.specs import Service


class LoadBalancer(msgspec.Struct, kw_only=True):
    vip: str
    pool: str
    services: tuple[Service, ...]
    members: tuple[str, ...] = ()
    generation: int = 0
    deleted: bool = False


class Created(Event):
    vip: str
    pool: str
    services: tuple[Service, ...]


class MembersSet(Event):
    members: tuple[str, ...]


class Deleted(Event):
    pass


def decide(state: LoadBalancer | None, cmd: c.Command, ctx: Ctx) -> Decision:
    if isinstance(cmd, c.CreateLoadBalancer):
        if state is not None:
            return reject(f"load balancer {cmd.id} already exists")
        return accept(
            Created(vip=cmd.vip, pool=cmd.pool, services=cmd.services),
            commands=follow_ups(ctx, (c.AttachBalancer, dict(id=cmd.pool, lb=cmd.id))),
        )
    if state is None or state.deleted:
        return reject(f"no load balancer {cmd.id}")
    match cmd:
        case c.PoolMembers():
            members = tuple(sorted(cmd.members))
            return accept() if members == state.members else accept(MembersSet(members))
        case c.DeleteLoadBalancer():
            return accept(Deleted(), commands=follow_ups(
                ctx, (c.DetachBalancer, dict(id=state.pool, lb=cmd.id))))
    return reject(f"{type(cmd).__name__} does not apply to a load balancer")


def evolve(state: LoadBalancer | None, event: Event) -> LoadBalancer:
    if isinstance(event, Created):
        return LoadBalancer(vip=event.vip, pool=event.pool, services=event.services)
    assert state is not None
    match event:
        case MembersSet():
            state.members = event.members
            state.generation += 1
        case Deleted():
            state.deleted = True
            state.generation += 1
    return state
