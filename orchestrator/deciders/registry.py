"""The VNI registry: one entity owns every network's VNI, so two networks never share one.

Networks ask it with ``ReserveVni`` and it answers ``VniGranted`` or ``VniRefused``; a
deleted network gives its VNI back with ``ReleaseVni``. Like placement, uniqueness needs
one owner deciding in log order.
"""

import msgspec

from orchestrator.deciders.base import Ctx, Decision, Event, accept, follow_ups, reject
from schemas import commands as c
from schemas.commands import REGISTRY_ID


class Registry(msgspec.Struct, kw_only=True):
    vnis: dict[int, str] = {}  # VNI -> the network holding it


class Reserved(Event):
    vni: int
    network: str


class Released(Event):
    vni: int


def decide(state: Registry | None, cmd: c.Command, ctx: Ctx) -> Decision:
    if cmd.id != REGISTRY_ID:
        return reject(f"the VNI registry is {REGISTRY_ID!r}, not {cmd.id!r}")
    state = state or Registry()
    match cmd:
        case c.ReserveVni():
            holder = state.vnis.get(cmd.vni)
            if holder == cmd.network:  # asked twice: answer the same
                return accept(commands=follow_ups(ctx, (c.VniGranted, dict(id=cmd.network))))
            if holder is not None:
                reason = f"VNI {cmd.vni} is in use by network {holder}"
                return reject(reason, commands=follow_ups(
                    ctx, (c.VniRefused, dict(id=cmd.network, reason=reason))))
            return accept(Reserved(vni=cmd.vni, network=cmd.network),
                          commands=follow_ups(ctx, (c.VniGranted, dict(id=cmd.network))))
        case c.ReleaseVni():
            if state.vnis.get(cmd.vni) != cmd.network:
                return accept()  # released already, or never held: nothing to give back
            return accept(Released(vni=cmd.vni))
    return reject(f"{type(cmd).__name__} does not apply to the VNI registry")


def evolve(state: Registry | None, event: Event) -> Registry:
    state = state or Registry()
    match event:
        case Reserved():
            state.vnis[event.vni] = event.network
        case Released():
            del state.vnis[event.vni]
    return state
