"""Instances (virtual machines): lifecycle, placement, and agents' reports."""

from typing import Literal

import msgspec

from orchestrator.deciders import migration
from orchestrator.deciders.base import Ctx, Decision, Event, accept, follow_ups, reject
from orchestrator.deciders.migration import MOVING, Migration
from schemas import commands as c
from schemas.commands import SCHEDULER_ID
from schemas.ids import mac_address
from schemas.jobs import Job
from schemas.specs import InstanceSpec, InstanceTemplate, NicSpec, Outgoing, Power, SecurityRule

# pending: waiting for its NICs' addresses, then for a host; failed: a NIC was refused.
Status = Literal["pending", "placed", "unplaceable", "degraded", "failed", "deleted"]


class Instance(msgspec.Struct, kw_only=True):
    template: InstanceTemplate
    power: Power
    pool: str | None = None
    status: Status = "pending"
    host: str | None = None
    # NICs as their networks resolved them, in template order; None until addressed.
    nics: list[NicSpec | None] = []
    generation: int = 0  # bumped on every change of what the host must do
    observed_generation: int = 0
    observed: str | None = None  # power state the agent last reported
    error: str | None = None
    # A serving pool member asked to stop or go: held until its balancers let it go.
    leaving: Literal["stop", "delete"] | None = None
    migration: Migration | None = None  # a live migration under way (`migration`)
    # Hosts sent its removal (a migration's other side) that have not applied it yet.
    cleanup: dict[str, int] = {}
    attempts: int = 0  # re-issues of the current generation's job
    issued_at: int = 0  # when the current job was last issued: the reconciler's clock
    created_at: int = 0
    updated_at: int = 0


class Created(Event):
    template: InstanceTemplate
    power: Power
    pool: str | None
    at: int


class NicResolved(Event):
    index: int
    nic: NicSpec
    at: int


class NicFailed(Event):
    reason: str
    at: int


class PlacedOn(Event):
    host: str
    at: int


class Unplaceable(Event):
    reason: str
    at: int


class RulesSet(Event):
    rules: tuple[SecurityRule, ...]
    at: int


class PowerSet(Event):
    power: Power
    at: int


class Deleted(Event):
    at: int


class Leaving(Event):
    """Stop or delete, once the pool's balancers have drained it (MemberDrained)."""

    then: Literal["stop", "delete"]
    at: int


class Stays(Event):
    """Started again while it was leaving to stop: it serves on."""

    at: int


class Left(Event):
    at: int


class Observed(Event):
    generation: int
    observed: str
    at: int


class ApplyFailed(Event):
    generation: int
    error: str
    attempt: int
    at: int


class Reissued(Event):
    attempt: int
    at: int


class Degraded(Event):
    """Retries ran out: an alert. A new generation (any change asked of it) clears it."""

    attempts: int
    reason: str
    at: int


def _place(ctx: Ctx, instance_id: str, t: InstanceTemplate) -> list[c.Command]:
    return follow_ups(ctx, (c.Place, dict(id=SCHEDULER_ID, instance=instance_id,
                                          vcpus=t.vcpus, memory_mib=t.memory_mib)))


_networks = migration.networks


def decide(state: Instance | None, cmd: c.Command, ctx: Ctx) -> Decision:
    match cmd:
        case c.CreateInstance():
            if state is not None:
                return reject(f"instance {cmd.id} already exists ({state.status})")
            t = cmd.template
            created = Created(template=t, power=cmd.power, pool=cmd.pool, at=ctx.at)
            if not t.nics:
                return accept(created, commands=_place(ctx, cmd.id, t))
            # Addresses first: a host is asked for only once every network has said yes.
            return accept(created, commands=follow_ups(ctx, *[
                (c.AttachPort, dict(id=nic.network, instance=cmd.id, index=i,
                                    mac=mac_address(cmd.id, i), ip=nic.ip))
                for i, nic in enumerate(t.nics)]))
    if state is None:
        return reject(f"no instance {cmd.id}")
    if state.status == "deleted" and not isinstance(cmd, c.Applied | c.Failed | c.Reconcile):
        return accept() if isinstance(cmd, c.DeleteInstance) else reject(
            f"instance {cmd.id} is deleted"
        )
    match cmd:
        case c.NicAddressed():
            if state.status != "pending" or not 0 <= cmd.index < len(state.nics) or \
                    state.nics[cmd.index] is not None:
                return accept()  # answered twice, or too late: the instance failed
            nic = NicSpec(network=cmd.network, vni=cmd.vni, mac=cmd.mac, ip=cmd.ip,
                          prefix=cmd.prefix, mtu=cmd.mtu)
            resolved = NicResolved(index=cmd.index, nic=nic, at=ctx.at)
            if sum(n is None for n in state.nics) > 1:
                return accept(resolved)
            return accept(resolved, commands=_place(ctx, cmd.id, state.template))
        case c.NicRefused():
            if state.status != "pending":
                return accept()
            reason = f"NIC {cmd.index} on network {cmd.network}: {cmd.reason}"
            others = [n for n in _networks(state) if n != cmd.network]
            return accept(NicFailed(reason=reason, at=ctx.at), note=reason, commands=follow_ups(
                ctx, *[(c.DetachPort, dict(id=n, instance=cmd.id)) for n in others]))
    if state.status == "failed" and not isinstance(cmd, c.DeleteInstance):
        return reject(f"instance {cmd.id} failed: {state.error}")
    match cmd:
        case c.Placed():
            if state.status not in ("pending", "unplaceable"):
                return reject(f"instance {cmd.id} is already {state.status}")
            return accept(PlacedOn(host=cmd.host, at=ctx.at), commands=follow_ups(ctx, *[
                (c.BindPort, dict(id=n, instance=cmd.id, host=cmd.host))
                for n in _networks(state)]))
        case c.PlacementFailed():
            if state.status != "pending":
                return reject(f"instance {cmd.id} is already {state.status}")
            return accept(Unplaceable(reason=cmd.reason, at=ctx.at))
        case c.MigrateInstance():
            return migration.ask(state, cmd, ctx)
        case c.MigrationReserved():
            return migration.reserved(state, cmd, ctx)
        case c.MigrationQueued():
            return migration.queued(state, cmd, ctx)
        case c.MigrationRefused():
            return migration.refused(state, cmd, ctx)
        case c.AbortMigration():
            return migration.abort(state, cmd, ctx)
        case c.Rehome():
            return migration.rehome(state, cmd, ctx)
        case c.MigrationProgress():
            return migration.progress(state, cmd, ctx)
        case c.SetRules() | c.StartInstance() | c.StopInstance() if (
                busy := migration.busy(state, type(cmd).__name__)):
            return busy
    match cmd:
        case c.SetRules():
            if state.template.rules == cmd.rules:
                return accept()
            return accept(RulesSet(rules=cmd.rules, at=ctx.at))
        case c.StartInstance():
            if state.leaving == "delete":
                return reject(f"instance {cmd.id} is being deleted")
            if state.leaving == "stop":
                return accept(Stays(at=ctx.at))
            return accept() if state.power == "running" else accept(
                PowerSet(power="running", at=ctx.at))
        case c.StopInstance():
            if state.power == "stopped" or state.leaving is not None:
                return accept()
            if serving(state):
                return accept(Leaving(then="stop", at=ctx.at))
            return accept(PowerSet(power="stopped", at=ctx.at))
        case c.DeleteInstance():
            if state.leaving == "delete":
                return accept()
            if state.leaving is not None or serving(state):
                return accept(Leaving(then="delete", at=ctx.at))
            return _delete(cmd.id, state, ctx)
        case c.MemberDrained():
            if state.leaving is None:
                return accept()
            if state.leaving == "stop":
                return accept(Left(at=ctx.at), PowerSet(power="stopped", at=ctx.at))
            deleted = _delete(cmd.id, state, ctx)
            return accept(Left(at=ctx.at), *deleted.events, commands=deleted.commands)
        case c.Applied() | c.Failed():
            if (decided := migration.report(state, cmd, ctx)) is not None:
                return decided
            if ctx.source != state.host:
                return reject(f"report from host {ctx.source}, but {cmd.id} is on {state.host}")
            if cmd.generation > state.generation:
                return reject(f"report for generation {cmd.generation} > {state.generation}")
            if cmd.generation < state.observed_generation:
                return accept()  # a stale report: a newer generation was already applied
            if isinstance(cmd, c.Applied):
                return accept(Observed(generation=cmd.generation, observed=cmd.observed, at=ctx.at))
            return accept(
                ApplyFailed(generation=cmd.generation, error=cmd.error, attempt=cmd.attempt,
                            at=ctx.at)
            )
        case c.Reconcile():
            late = state.observed_generation < state.generation
            if cmd.generation != state.generation or state.host is None or not (
                    late or state.cleanup):
                return accept()  # converged meanwhile, or a newer generation is on its way
            if state.status == "degraded" or (
                    state.migration is not None and state.migration.phase == "migrating"):
                return accept()  # alerted; or migrating, which its deadline bounds
            if state.attempts >= cmd.max_attempts:
                if state.status == "deleted" or not late:
                    # A removal that keeps failing degrades nothing wanted; one from a
                    # host left (``cleanup``) is applied when its agent returns.
                    return accept()
                reason = state.error or f"generation {state.generation} not applied"
                return accept(Degraded(attempts=state.attempts, reason=reason, at=ctx.at))
            return accept(Reissued(attempt=state.attempts + 1, at=ctx.at))
    return reject(f"{type(cmd).__name__} does not apply to an instance")


def _delete(instance_id: str, state: Instance, ctx: Ctx) -> Decision:
    """Removal from its host; a migration under way ends, and a destination that may hold
    the guest already is sent a removal too (Release ends the scheduler's move)."""
    m = state.migration
    first: list[Event] = []
    if m is not None and m.phase in MOVING:
        first = [migration.RolledBack(reason="deleted", at=ctx.at)]
    elif m is not None and m.phase != "cleaning":
        first = [migration.MigrationEnded(outcome="deleted", at=ctx.at)]
    return accept(*first, Deleted(at=ctx.at), commands=follow_ups(
        ctx,
        (c.Release, dict(id=SCHEDULER_ID, instance=instance_id)),
        *[(c.DetachPort, dict(id=n, instance=instance_id)) for n in _networks(state)],
    ))


# ---- what its pool hears (the fold calls these around every accepted command) ----------


def serving(state: Instance) -> bool:
    """Whether the instance should get traffic from its pool's balancers."""
    return (state.pool is not None and state.status == "placed" and state.power == "running"
            and state.leaving is None and bool(state.nics) and state.nics[0] is not None)


View = tuple[bool, bool, str | None]  # serving, leaving, address on the pool's network


def observe(state: Instance | None) -> View | None:
    if state is None or state.pool is None:
        return None
    nic = state.nics[0] if state.nics else None
    return serving(state), state.leaving is not None, nic.ip if nic is not None else None


def react(instance_id: str, before: View | None, after: View | None, state: Instance,
          ctx: Ctx, start: int) -> list[c.Command]:
    """Tell the pool when it must change what it balances: the member serves (anew, or at
    another address), begins to leave, or stopped serving (degraded). Nothing for one that
    never served, nor once it has left (the pool let it go)."""
    if after is None or state.pool is None:
        return []
    is_serving, leaving, ip = after
    tell = (is_serving or (leaving and not (before and before[1]))
            or (not leaving and before is not None and before[0]))
    if not tell:
        return []
    return follow_ups(ctx, (c.MemberState, dict(id=state.pool, instance=instance_id,
                                                 serving=is_serving, leaving=leaving, ip=ip)),
                      start=start)


def evolve(state: Instance | None, event: Event) -> Instance:
    if isinstance(event, Created):
        return Instance(template=event.template, power=event.power, pool=event.pool,
                        nics=[None] * len(event.template.nics), created_at=event.at,
                        updated_at=event.at)
    assert state is not None
    state.updated_at = event.at  # type: ignore[attr-defined]
    if isinstance(event, migration.NEW_GENERATION):
        _new_generation(state, event.at)
    if migration.evolve(state, event):
        return state
    match event:
        case NicResolved():
            state.nics[event.index] = event.nic
        case NicFailed():
            state.status, state.error = "failed", event.reason
        case PlacedOn():
            state.status, state.host = "placed", event.host
            _new_generation(state, event.at)
        case Unplaceable():
            state.status, state.error = "unplaceable", event.reason
        case RulesSet():
            state.template = msgspec.structs.replace(state.template, rules=event.rules)
            _new_generation(state, event.at)
        case PowerSet():
            state.power = event.power
            if state.status == "degraded":
                state.status = "placed"
            _new_generation(state, event.at)
        case Deleted():
            state.status = "deleted"
            _new_generation(state, event.at)
        case Leaving():
            state.leaving = event.then
        case Stays() | Left():
            state.leaving = None
        case Observed():
            state.observed_generation, state.observed = event.generation, event.observed
            if event.generation == state.generation:
                state.error = None
                if state.status == "degraded":  # late, but converged: the alert is over
                    state.status = "placed"
        case ApplyFailed():
            state.error = event.error
        case Reissued():
            state.attempts, state.issued_at = event.attempt, event.at
        case Degraded():
            state.status, state.error = "degraded", event.reason
    return state


def _new_generation(state: Instance, at: int) -> None:
    state.generation += 1
    state.attempts, state.issued_at, state.error = 0, at, None


def jobs(kind: str, id: str, before_generation: int, state: Instance,
         events: list[Event]) -> list[Job]:
    """A job whenever a host has something new to do, or must be told again.

    Each carries the full spec, or None for removal: to its host; while it migrates, to
    the destination too (``incoming``); and a removal to each host newly in ``cleanup``.
    """
    if state.host is None:
        return []
    if state.generation == before_generation and not any(
            isinstance(e, Reissued) for e in events):
        return []
    m = state.migration
    spec = None
    if state.status != "deleted":
        outgoing = None
        if m is not None and m.phase == "migrating":
            assert m.dest is not None and m.address is not None
            outgoing = Outgoing(dest=m.dest, address=m.address, deadline_at=m.deadline_at)
        spec = InstanceSpec(template=state.template, power=state.power, host=state.host,
                            nics=tuple(n for n in state.nics if n is not None),
                            outgoing=outgoing)
    out = [Job(kind=kind, id=id, host=state.host, generation=state.generation,
               attempt=state.attempts, spec=spec)]
    if spec is not None and m is not None and m.phase in MOVING and m.dest is not None:
        incoming = msgspec.structs.replace(spec, host=m.dest, incoming=True, outgoing=None)
        out.append(Job(kind=kind, id=id, host=m.dest, generation=state.generation,
                       attempt=state.attempts, spec=incoming))
    reissued = state.generation == before_generation  # a re-issue: to every host left too
    out.extend(Job(kind=kind, id=id, host=h, generation=state.generation,
                   attempt=state.attempts if reissued else 0, spec=None)
               for h, g in sorted(state.cleanup.items()) if reissued or g > before_generation)
    return out
