"""Live migration of an instance: a saga that the instance folds itself, step by step.

Every step is a command, an event and a line of the instance's timeline:

- ``reserving``: ``MigrateInstance`` asked the scheduler for a destination (``ReserveMove``);
  it may answer that the move queues (``queued``: too many migrations on a host, or, for a
  drain, no room anywhere), or refuse it with the reason.
- ``preparing``: the destination is reserved. Its job says ``incoming`` and its networks
  bind the ports there inactive (``BindPort incoming``), so its segments exist before any
  memory moves. It answers ``Applied`` "incoming" once it can take the guest.
- ``migrating``: the source's job says ``outgoing``: its agent runs libvirt's live
  migration, peer to peer, with the deadline.
- ``cleaning``: the destination reported the guest running there (or the source, that it
  left): the instance lives on the destination, its ports are bound there (every member
  host's forwarding entries follow), the source is sent a removal, and the scheduler hears
  it (``MoveSwitched``: the allocation is on the destination; the source's capacity and
  the move's slot in the limit stay held).
- done: the source applied its removal; the move ends (``EndMove``), and the source's
  capacity goes.

A rollback before the switch (the destination could not prepare, libvirt failed, an abort,
the deadline) sends the source the instance again and the destination a removal, binds the
ports back and ends the reservation: one running copy, on the source. An abort while memory
moves is not decided here, since only libvirt knows whether the guest already runs on the
destination: the source's job gets a deadline of now, and what its agent then reports
decides between rollback and switch.

Hosts sent a removal (``cleanup``) stay listed until they apply it: a host whose agent is
away cleans up when it returns, since the newest job on its subject says removal.

A stopped instance moves cold: once the destination is reserved it is defined there and
removed from the source, with nothing to copy (its disks are the image).

Evacuation (`Rehome`, from the scheduler, for an instance of a host that is down) is a
cold rebuild: a new generation on the new host, and a removal on the old one, which its
agent applies before anything else when it returns. A migration under way ends, and its
destination, which may hold the guest already, is sent a removal too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import msgspec

from orchestrator.deciders.base import Ctx, Decision, Event, accept, follow_ups, reject
from schemas import commands as c
from schemas.commands import SCHEDULER_ID

if TYPE_CHECKING:
    from orchestrator.deciders.instance import Instance

Phase = Literal["reserving", "queued", "preparing", "migrating", "cleaning"]
MOVING: tuple[Phase, ...] = ("preparing", "migrating")  # the destination is involved


class Migration(msgspec.Struct, kw_only=True):
    ticket: int  # its MigrateInstance's seq: the scheduler's answers name it
    source: str
    to: str | None = None  # the destination asked for; None: the scheduler's choice
    drain: bool = False  # asked by a drain: waits for room instead of being refused
    cold: bool = False  # stopped when asked: it moves cold
    deadline_ms: int
    asked_at: int
    phase: Phase = "reserving"
    reason: str | None = None  # why it queues
    dest: str | None = None
    address: str | None = None  # the destination's underlay
    generation: int = 0  # the instance's generation when the current phase began
    dest_observed: int = 0  # the newest generation the destination applied
    started_at: int = 0  # memory began to move
    deadline_at: int = 0
    abort: str | None = None  # why an abort was asked while memory moves


class MigrationAsked(Event):
    ticket: int
    source: str
    to: str | None
    drain: bool
    deadline_ms: int
    at: int
    cold: bool = False


class MigrationWaits(Event):
    reason: str
    at: int


class MigrationPreparing(Event):
    dest: str
    address: str
    at: int


class MigrationStarted(Event):
    deadline_at: int
    at: int


class AbortAsked(Event):
    reason: str
    at: int


class DestObserved(Event):
    generation: int
    at: int


class Switched(Event):
    """The guest runs on the destination: the instance lives there now."""

    at: int


class RolledBack(Event):
    reason: str
    at: int


class MovedCold(Event):
    dest: str
    at: int


class MigrationEnded(Event):
    outcome: str
    at: int


class CleanedUp(Event):
    host: str
    at: int


class Rehomed(Event):
    """Rebuilt on ``host``: the old one is down."""

    host: str
    reason: str
    at: int


class Stranded(Event):
    """Its host is down and no other has room yet."""

    reason: str
    at: int


def networks(state: Instance) -> list[str]:
    return sorted({nic.network for nic in state.template.nics})


def _bind(ctx: Ctx, instance_id: str, state: Instance, host: str, *, incoming: bool = False,
          start: int = 0) -> list[c.Command]:
    return follow_ups(ctx, *[(c.BindPort, dict(id=n, instance=instance_id, host=host,
                                               incoming=incoming))
                             for n in networks(state)], start=start)


def _end_move(ctx: Ctx, instance_id: str, ticket: int, moved: bool,
              start: int = 0) -> list[c.Command]:
    return follow_ups(ctx, (c.EndMove, dict(id=SCHEDULER_ID, instance=instance_id,
                                            ticket=ticket, moved=moved)), start=start)


def ask(state: Instance, cmd: c.MigrateInstance, ctx: Ctx) -> Decision:
    m = state.migration
    drain = ctx.source == "system"
    if m is not None and m.phase != "cleaning":
        if drain:
            return accept()  # a drain asking again: this migration serves it
        return reject(f"instance {cmd.id} is already migrating ({m.phase}"
                      + (f" to {m.dest}" if m.dest else "") + ")")
    # Moved, its source not clean yet (away, say): that removal stays pending on its own,
    # and the source's capacity goes now.
    done = [] if m is None else [MigrationEnded(
        outcome=f"moved to {state.host}; {m.source} has not removed its copy yet", at=ctx.at)]
    release = [] if m is None else _end_move(ctx, cmd.id, m.ticket, moved=True)
    if state.status != "placed" or state.host is None:
        return reject(f"instance {cmd.id} is {state.status}: only a placed instance moves")
    if state.leaving is not None:
        return reject(f"instance {cmd.id} is leaving its pool ({state.leaving})")
    if cmd.to == state.host:
        return reject(f"instance {cmd.id} is on {cmd.to} already")
    cold = state.power == "stopped"
    if cold and not _stopped(state):
        # Its host may run it yet: moved now, it could run on two.
        return reject(f"instance {cmd.id} is stopping: it moves once {state.host} has"
                      " stopped it")
    t = state.template
    return accept(
        *done,
        MigrationAsked(ticket=ctx.seq, source=state.host, to=cmd.to, drain=drain,
                       deadline_ms=cmd.deadline_ms, at=ctx.at, cold=cold),
        commands=[*release, *follow_ups(ctx, (c.ReserveMove, dict(
            id=SCHEDULER_ID, instance=cmd.id, ticket=ctx.seq, source=state.host, to=cmd.to,
            vcpus=t.vcpus, memory_mib=t.memory_mib, wait=drain,
            avoid=tuple(sorted(state.cleanup)))), start=len(release))])


def _stopped(state: Instance) -> bool:
    """Stopped, and its host says so of the current generation."""
    return (state.power == "stopped" and state.observed == "stopped"
            and state.observed_generation == state.generation)


def _asking(state: Instance, ticket: int) -> bool:
    m = state.migration
    return m is not None and m.ticket == ticket and m.phase in ("reserving", "queued")


def _stale(state: Instance, ticket: int) -> bool:
    """An answer about another migration than the one under way (an earlier one, ended)."""
    return state.migration is None or state.migration.ticket != ticket


def queued(state: Instance, cmd: c.MigrationQueued, ctx: Ctx) -> Decision:
    if _stale(state, cmd.ticket):  # the scheduler queues for nobody: its move goes
        return accept(commands=_end_move(ctx, cmd.id, cmd.ticket, moved=False))
    if not _asking(state, cmd.ticket):
        return accept()
    return accept(MigrationWaits(reason=cmd.reason, at=ctx.at), note=cmd.reason)


def refused(state: Instance, cmd: c.MigrationRefused, ctx: Ctx) -> Decision:
    if not _asking(state, cmd.ticket):
        return accept()
    return accept(MigrationEnded(outcome=f"refused: {cmd.reason}", at=ctx.at), note=cmd.reason)


def reserved(state: Instance, cmd: c.MigrationReserved, ctx: Ctx) -> Decision:
    m = state.migration
    if m is not None and m.ticket == cmd.ticket and m.dest == cmd.host:
        return accept()  # answered twice
    if m is None or not _asking(state, cmd.ticket):
        # Nobody moves any more (aborted, deleted meanwhile): the reservation goes.
        return accept(commands=_end_move(ctx, cmd.id, cmd.ticket, moved=False))
    if state.status != "placed" or (state.power == "stopped") != m.cold or (
            m.cold and not _stopped(state)):
        change = state.status if state.status != "placed" else (
            "stopped" if state.power == "stopped" else "started")
        why = f"not moved: {change} meanwhile"
        return accept(MigrationEnded(outcome=why, at=ctx.at), note=why,
                      commands=_end_move(ctx, cmd.id, m.ticket, moved=False))
    if m.cold:
        moved = f"moved cold to {cmd.host}"
        return accept(MovedCold(dest=cmd.host, at=ctx.at),
                      MigrationEnded(outcome=moved, at=ctx.at), note=moved,
                      commands=[*_bind(ctx, cmd.id, state, cmd.host),
                                *_end_move(ctx, cmd.id, m.ticket, moved=True,
                                           start=len(networks(state)))])
    return accept(MigrationPreparing(dest=cmd.host, address=cmd.address, at=ctx.at),
                  commands=_bind(ctx, cmd.id, state, cmd.host, incoming=True))


def abort(state: Instance, cmd: c.AbortMigration, ctx: Ctx) -> Decision:
    m = state.migration
    reason = f"aborted: {cmd.reason}" if cmd.reason else "aborted"
    if m is None:
        return reject(f"instance {cmd.id} is not migrating")
    if m.phase in ("reserving", "queued"):
        return accept(MigrationEnded(outcome=reason, at=ctx.at), note=reason,
                      commands=_end_move(ctx, cmd.id, m.ticket, moved=False))
    if m.phase == "preparing":
        return rollback(state, cmd.id, ctx, reason)
    if m.phase == "cleaning":
        return reject(f"instance {cmd.id} runs on {m.dest} already: too late to abort")
    if m.abort is not None:
        return accept()
    # Memory is moving: only libvirt knows whether the guest still runs on the source.
    return accept(AbortAsked(reason=reason, at=ctx.at), note=reason)


def progress(state: Instance, cmd: c.MigrationProgress, ctx: Ctx) -> Decision:
    """The source's word on a running migration: a line of the timeline, nothing more."""
    m = state.migration
    if m is None or m.phase != "migrating" or ctx.source != m.source:
        return accept()
    return accept(note=f"{cmd.processed_mib} MiB sent, {cmd.remaining_mib} MiB left")


def rollback(state: Instance, instance_id: str, ctx: Ctx, reason: str) -> Decision:
    m = state.migration
    assert m is not None and state.host is not None
    binds = _bind(ctx, instance_id, state, state.host)
    return accept(RolledBack(reason=reason, at=ctx.at), note=reason,
                  commands=[*binds, *_end_move(ctx, instance_id, m.ticket, moved=False,
                                               start=len(binds))])


def _switch(state: Instance, instance_id: str, ctx: Ctx, note: str) -> Decision:
    m = state.migration
    assert m is not None and m.dest is not None
    binds = _bind(ctx, instance_id, state, m.dest)
    return accept(Switched(at=ctx.at), note=note, commands=[*binds, *follow_ups(
        ctx, (c.MoveSwitched, dict(id=SCHEDULER_ID, instance=instance_id, ticket=m.ticket)),
        start=len(binds))])


def report(state: Instance, cmd: c.Applied | c.Failed, ctx: Ctx) -> Decision | None:
    """An agent's report that the migration decides; None: the usual handling."""
    m, host = state.migration, ctx.source
    if host in state.cleanup and host != state.host and not (m and host == m.dest):
        if not isinstance(cmd, c.Applied) or cmd.generation < state.cleanup[host]:
            return accept()  # a stale report, or a failed removal: re-issued by its agent
        done = m is not None and m.phase == "cleaning" and host == m.source
        if not done:
            return accept(CleanedUp(host=host, at=ctx.at))
        moved = f"moved to {state.host}"
        return accept(CleanedUp(host=host, at=ctx.at),
                      MigrationEnded(outcome=moved, at=ctx.at), note=moved,
                      commands=_end_move(ctx, cmd.id, m.ticket, moved=True))
    if m is None or m.phase not in MOVING or cmd.generation < m.generation:
        return None
    if cmd.generation > state.generation:
        return reject(f"report for generation {cmd.generation} > {state.generation}")
    if host == m.dest:
        if isinstance(cmd, c.Failed):
            if m.phase == "preparing":
                return rollback(state, cmd.id, ctx,
                                f"destination {host} could not prepare: {cmd.error}")
            return accept(note=f"destination {host}: {cmd.error}")
        seen = [DestObserved(generation=cmd.generation, at=ctx.at)] \
            if cmd.generation > m.dest_observed else []
        if cmd.observed == "running" and m.phase == "migrating":
            return _switch(state, cmd.id, ctx, f"the guest runs on {host}")
        if cmd.observed == "incoming" and m.phase == "preparing":
            return accept(*seen, MigrationStarted(deadline_at=ctx.at + m.deadline_ms,
                                                  at=ctx.at))
        return accept(*seen)
    if host != m.source or m.phase != "migrating":
        return None
    if isinstance(cmd, c.Failed):
        why = f"{m.abort}: {cmd.error}" if m.abort else f"the migration failed: {cmd.error}"
        return rollback(state, cmd.id, ctx, why)
    if cmd.observed == "migrated":
        return _switch(state, cmd.id, ctx, f"{host} says the guest left for {m.dest}")
    return None


def rehome(state: Instance, cmd: c.Rehome, ctx: Ctx) -> Decision:
    """The scheduler ended any move of it (its host is down): a migration under way ends
    here too, its destination sent a removal if memory may have moved."""
    if state.host is None or state.status not in ("placed", "degraded"):
        return accept()
    m = state.migration
    ended: list[Event] = []
    if m is not None and m.phase in MOVING:
        ended = [RolledBack(reason=f"its host {state.host} is down", at=ctx.at)]
    elif m is not None and m.phase != "cleaning":
        ended = [MigrationEnded(outcome=f"its host {state.host} is down", at=ctx.at)]
    if cmd.host is None:
        return accept(*ended, Stranded(reason=cmd.reason, at=ctx.at), note=cmd.reason)
    # Its own host, back before another had room: its agent dropped it with the others
    # (`HostSpec`), so it starts anew there too.
    note = f"rebuilt on {cmd.host}: {cmd.reason} ({state.host})"
    return accept(*ended, Rehomed(host=cmd.host, reason=cmd.reason, at=ctx.at), note=note,
                  commands=_bind(ctx, cmd.id, state, cmd.host))


def busy(state: Instance, what: str) -> Decision | None:
    """A rejection of ``what`` while memory may move, or None."""
    m = state.migration
    if m is None or m.phase not in MOVING:
        return None
    return reject(f"instance is migrating to {m.dest} ({m.phase}): {what} once it has"
                  " moved, or abort it first (AbortMigration)")


def evolve(state: Instance, event: Event) -> bool:
    """Apply a migration event to ``state``; False if ``event`` is none of them. For those
    in NEW_GENERATION the caller has begun the new generation already."""
    m = state.migration
    match event:
        case MigrationAsked():
            state.migration = Migration(
                ticket=event.ticket, source=event.source, to=event.to, drain=event.drain,
                cold=event.cold, deadline_ms=event.deadline_ms, asked_at=event.at)
        case MigrationWaits():
            assert m is not None
            m.phase, m.reason = "queued", event.reason
        case MigrationEnded():
            state.migration = None
        case CleanedUp():
            state.cleanup.pop(event.host, None)
        case DestObserved():
            assert m is not None
            m.dest_observed = event.generation
        case MigrationPreparing():
            assert m is not None
            m.phase, m.dest, m.address, m.reason = "preparing", event.dest, event.address, None
            m.generation = state.generation
        case MigrationStarted():
            assert m is not None
            m.phase, m.generation = "migrating", state.generation
            m.started_at, m.deadline_at = event.at, event.deadline_at
        case AbortAsked():
            assert m is not None
            m.abort, m.deadline_at = event.reason, event.at
        case Switched():
            assert m is not None and m.dest is not None
            state.cleanup[m.source] = state.generation
            state.host, m.phase, m.generation = m.dest, "cleaning", state.generation
            state.observed_generation, state.observed = m.dest_observed, "running"
        case RolledBack():
            assert m is not None
            if m.dest is not None:
                state.cleanup[m.dest] = state.generation
            state.migration = None
        case MovedCold():
            assert state.host is not None
            state.cleanup[state.host] = state.generation
            state.host, state.observed_generation = event.dest, 0
        case Rehomed():
            assert state.host is not None
            for gone in (state.host, m.dest if m is not None else None):
                if gone is not None and gone != event.host:
                    state.cleanup[gone] = state.generation
            state.host, state.observed_generation, state.observed = event.host, 0, None
            state.cleanup.pop(event.host, None)
            state.migration, state.error = None, None
            if state.status == "degraded":
                state.status = "placed"
        case Stranded():
            state.error = event.reason
        case _:
            return False
    return True


NEW_GENERATION = (MigrationPreparing, MigrationStarted, AbortAsked, Switched, RolledBack,
                  MovedCold, Rehomed)
