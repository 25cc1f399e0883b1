"""Hosts (hypervisors): registration, admin conditions, and liveness from heartbeats."""

import msgspec

from orchestrator.deciders.base import Ctx, Decision, Event, accept, follow_ups, reject
from schemas import commands as c
from schemas.commands import SCHEDULER_ID
from schemas.jobs import Job
from schemas.specs import HostCondition, HostSpec, Role


class Host(msgspec.Struct, kw_only=True):
    vcpus: int
    memory_mib: int
    role: Role = "hypervisor"
    condition: HostCondition = "up"
    boot_id: str = ""
    underlay: str | None = None  # the VTEP address its agent reports
    networks: list[str] = []  # networks with a port here: told when the VTEP changes
    evacuated_at: int = 0  # its instances were rebuilt elsewhere since it went down
    generation: int = 0  # of its own job: bumped by each evacuation
    registered_at: int = 0
    updated_at: int = 0


class Registered(Event):
    vcpus: int
    memory_mib: int
    at: int
    role: Role = "hypervisor"


class ConditionSet(Event):
    condition: HostCondition
    boot_id: str
    at: int


class UnderlaySet(Event):
    underlay: str
    at: int


class Evacuated(Event):
    at: int


class NetworkSpanned(Event):
    network: str


class NetworkUnspanned(Event):
    network: str


def _vtep_to(ctx: Ctx, host_id: str, underlay: str | None, networks: list[str],
             start: int = 0) -> list[c.Command]:
    """Tell networks where this host's ports are reached; nothing until it is known."""
    if underlay is None:
        return []
    return follow_ups(ctx, *[(c.HostVtep, dict(id=n, host=host_id, vtep=underlay))
                             for n in networks], start=start)


def _capacity(ctx: Ctx, host_id: str, host: Host, start: int = 0) -> list[c.Command]:
    """Tell the scheduler what this host can take now: instances, or balancers."""
    if host.role == "lb":
        return follow_ups(ctx, (c.LbNode, dict(id=SCHEDULER_ID, host=host_id,
                                               condition=host.condition)), start=start)
    return follow_ups(ctx, (c.HostCapacity, dict(
        id=SCHEDULER_ID, host=host_id, vcpus=host.vcpus, memory_mib=host.memory_mib,
        condition=host.condition, underlay=host.underlay,
    )), start=start)


def decide(state: Host | None, cmd: c.Command, ctx: Ctx) -> Decision:
    if isinstance(cmd, c.RegisterHost):
        if state is not None and state.role != cmd.role:
            return reject(f"host {cmd.id} is registered as {state.role}: a role does not"
                          " change (register the machine under another name)")
        if state is not None and (state.vcpus, state.memory_mib) == (cmd.vcpus, cmd.memory_mib):
            return accept()
        after = Host(vcpus=cmd.vcpus, memory_mib=cmd.memory_mib, role=cmd.role,
                     condition=state.condition if state else "up")
        return accept(Registered(vcpus=cmd.vcpus, memory_mib=cmd.memory_mib, at=ctx.at,
                                 role=cmd.role),
                      commands=_capacity(ctx, cmd.id, after))
    if state is None:
        return reject(f"no host {cmd.id}")
    match cmd:
        case c.SpanNetwork():
            spanned = [] if cmd.network in state.networks else [NetworkSpanned(cmd.network)]
            return accept(*spanned, commands=_vtep_to(ctx, cmd.id, state.underlay,
                                                      [cmd.network]))
        case c.UnspanNetwork():
            if cmd.network not in state.networks:
                return accept()
            return accept(NetworkUnspanned(cmd.network))
        case c.EvacuateHost():
            if state.role == "lb":
                return reject(f"host {cmd.id} is an LB node: its balancers move by themselves")
            if state.condition != "down":
                return reject(f"host {cmd.id} is {state.condition}: only a host that is down"
                              " is evacuated (drain one that is up)")
            if state.evacuated_at:
                return accept()  # evacuated already since it went down
            return accept(Evacuated(at=ctx.at), commands=follow_ups(
                ctx, (c.Evacuate, dict(id=SCHEDULER_ID, host=cmd.id))))
        case c.HostUp() if cmd.underlay is not None and cmd.underlay != state.underlay:
            moved = UnderlaySet(underlay=cmd.underlay, at=ctx.at)
            rest = decide_condition(state, cmd, ctx, underlay=cmd.underlay)
            commands = [*rest.commands, *_vtep_to(ctx, cmd.id, cmd.underlay, state.networks,
                                                  start=len(rest.commands))]
            if not any(isinstance(x, c.HostCapacity) for x in commands) and \
                    state.role == "hypervisor":  # the scheduler hears where it is reached
                after = msgspec.structs.replace(state, underlay=cmd.underlay)
                commands += _capacity(ctx, cmd.id, after, start=len(commands))
            return accept(moved, *rest.events, commands=commands)
    return decide_condition(state, cmd, ctx)


def decide_condition(state: Host, cmd: c.Command, ctx: Ctx,
                     underlay: str | None = None) -> Decision:
    """Admin conditions and liveness; the scheduler hears of every change."""
    match cmd:
        case c.SetHostCondition():
            condition: HostCondition = cmd.condition
            boot_id = state.boot_id
        case c.HostDown():
            if state.condition != "up":
                return accept()  # a drained or maintained host going silent changes nothing
            condition, boot_id = "down", state.boot_id
        case c.HostUp():
            if state.condition != "down" and cmd.boot_id == state.boot_id:
                return accept()
            condition = "up" if state.condition == "down" else state.condition
            boot_id = cmd.boot_id
        case _:
            return reject(f"{type(cmd).__name__} does not apply to a host")
    if (condition, boot_id) == (state.condition, state.boot_id):
        return accept()
    after = Host(vcpus=state.vcpus, memory_mib=state.memory_mib, role=state.role,
                 condition=condition, underlay=underlay or state.underlay)
    return accept(ConditionSet(condition=condition, boot_id=boot_id, at=ctx.at),
                  commands=_capacity(ctx, cmd.id, after))


def evolve(state: Host | None, event: Event) -> Host:
    match event:
        case Registered():
            if state is None:
                return Host(vcpus=event.vcpus, memory_mib=event.memory_mib, role=event.role,
                            registered_at=event.at, updated_at=event.at)
            state.vcpus, state.memory_mib = event.vcpus, event.memory_mib
        case ConditionSet():
            assert state is not None
            state.condition, state.boot_id = event.condition, event.boot_id
            if event.condition != "down":
                state.evacuated_at = 0
        case Evacuated():
            assert state is not None
            state.evacuated_at = event.at
            state.generation += 1
        case UnderlaySet():
            assert state is not None
            state.underlay = event.underlay
        case NetworkSpanned():
            assert state is not None
            state.networks.append(event.network)
            return state
        case NetworkUnspanned():
            assert state is not None
            state.networks.remove(event.network)
            return state
    assert state is not None
    state.updated_at = event.at  # type: ignore[attr-defined]
    return state


def jobs(kind: str, id: str, before_generation: int, state: Host,
         events: list[Event]) -> list[Job]:
    """The host's own job, to its agent, when it is evacuated."""
    if state.generation == before_generation:
        return []
    return [Job(kind=kind, id=id, host=id, generation=state.generation,
                spec=HostSpec(evacuated_at=state.evacuated_at))]
