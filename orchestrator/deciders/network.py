"""Private networks: a VXLAN segment and the instances attached to it."""

import msgspec

from orchestrator.deciders.base import Ctx, Decision, Event, accept, reject
from schemas import commands as c


class Network(msgspec.Struct, kw_only=True):
    vni: int
    cidr: str
    members: list[str] = []
    deleted: bool = False


class Created(Event):
    vni: int
    cidr: str


class Joined(Event):
    instance: str


class Left(Event):
    instance: str


class Deleted(Event):
    pass


def decide(state: Network | None, cmd: c.Command, ctx: Ctx) -> Decision:
    if isinstance(cmd, c.CreateNetwork):
        if state is None:
            return accept(Created(vni=cmd.vni, cidr=cmd.cidr))
        if not state.deleted and (state.vni, state.cidr) == (cmd.vni, cmd.cidr):
            return accept()
        return reject(f"network {cmd.id} already exists" + (" (deleted)" if state.deleted else ""))
    if state is None or (state.deleted and not isinstance(cmd, c.LeaveNetwork)):
        return reject(f"no network {cmd.id}")
    match cmd:
        case c.DeleteNetwork():
            if state.members:
                shown = ", ".join(state.members[:5]) + (", ..." if len(state.members) > 5 else "")
                return reject(f"network {cmd.id} has {len(state.members)} members: {shown}")
            return accept(Deleted())
        case c.JoinNetwork():
            return accept() if cmd.instance in state.members else accept(Joined(cmd.instance))
        case c.LeaveNetwork():
            return accept(Left(cmd.instance)) if cmd.instance in state.members else accept()
    return reject(f"{type(cmd).__name__} does not apply to a network")


def evolve(state: Network | None, event: Event) -> Network:
    if isinstance(event, Created):
        return Network(vni=event.vni, cidr=event.cidr)
    assert state is not None
    match event:
        case Joined():
            state.members.append(event.instance)
            state.members.sort()
        case Left():
            state.members.remove(event.instance)
        case Deleted():
            state.deleted = True
    return state
