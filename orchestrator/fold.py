"""Folding one message from the CMD stream: parse, check, decide, evolve. Pure.

The partition workers and ``orch replay`` both run this, so the live projection and a
replayed one cannot disagree by construction: only by a bug, which replay then reveals.

One rule at this boundary: whatever a single message holds, and whatever a decider does
with it, the message ends as an outcome in its entity's timeline (when its subject names
an entity), a dead letter, or both; the partition goes on. A decider that raises on a
command that decoded is a bug: the command is rejected as an internal error (a dead
letter too, so that it can be sent again once the bug is fixed), the entity keeps the
state it had before the command, and the worker raises an alert.
"""

import functools
import re
import sys
import traceback
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi

from events.subjects import partition_of
from orchestrator.deciders import DECIDERS, STATE_TYPES
from orchestrator.deciders.base import Ctx, Event
from schemas.codec import CommandError, decode_command, printable
from schemas.commands import Command, SourceClass
from schemas.ids import RESERVED_SOURCES, is_valid_id
from schemas.jobs import Job
from schemas.outcomes import Outcome

Key = tuple[str, str]  # (kind, id)
States = MutableMapping[Key, Any]

INTERNAL_ERROR = "internal error in "  # how the reason of a bug's rejection begins
_WILDCARDS = frozenset({"*", ">"})
_ROOT = Path(__file__).resolve().parents[1]
# What differs from one process to the next in an exception's text: replay must reproduce
# the reason exactly.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_snapshot = msgspec.msgpack.Encoder()


def _immutable(t: mi.Type) -> bool:
    match t:
        case mi.UnionType():
            return all(_immutable(u) for u in t.types)
        case mi.VarTupleType() | mi.FrozenSetType():
            return _immutable(t.item_type)
        case mi.TupleType():
            return all(_immutable(u) for u in t.item_types)
        case mi.StructType():
            return t.cls.__struct_config__.frozen and all(_immutable(f.type) for f in t.fields)
        case _:
            return isinstance(t, (mi.NoneType, mi.BoolType, mi.IntType, mi.FloatType,
                                  mi.StrType, mi.BytesType, mi.LiteralType, mi.EnumType))


# Evolve updates a state in place, so what gives back the state before it is kept, to be
# called if it raises. A state whose fields are all immutable can only change by
# assignments to them: a shallow copy keeps it. A decider whose state grows with others (the
# scheduler, with every instance) keeps only what its events change, with its ``keep``.
# Any other state is kept encoded, which costs more.
_SHALLOW = {kind: all(_immutable(f.type) for f in mi.type_info(cls).fields)  # type: ignore[attr-defined]
            for kind, cls in STATE_TYPES.items()}
Restore = Callable[[], Any]


def _keep(decider: Any, kind: str, state: Any, events: list[Event]) -> Restore:
    keep = getattr(decider, "keep", None)
    if keep is not None:
        return keep(state, events)
    if _SHALLOW[kind]:
        copy = state.__copy__()  # a Struct's
        return lambda: copy
    encoded = _snapshot.encode(state)
    return lambda: msgspec.msgpack.decode(encoded, type=STATE_TYPES[kind])


def _restore(states: States, key: Key, kept: Restore | None) -> None:
    if kept is None:
        states.pop(key, None)
    else:
        states[key] = kept()


@dataclass(slots=True)
class Folded:
    seq: int
    subject: str
    key: Key | None = None  # the entity whose timeline records this, if the subject names one
    outcome: Outcome | None = None
    dead_letter: str | None = None  # reason, when the message is unusable
    changed: bool = False
    jobs: list[Job] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    internal_error: bool = False  # a bug raised while folding it: an alert


def source_class(source: str) -> SourceClass:
    return source if source in RESERVED_SOURCES else "host"  # type: ignore[return-value]


# Subjects seen again soon (an entity's follow-ups, a busy network) skip the parse and the
# FNV hash (~8 us). Small: 65,536 entries held ~30 MB of a replica at 100,000 entities,
# where uniform traffic hits a cache of any affordable size rarely anyway.
@functools.lru_cache(maxsize=1 << 12)
def address(subject: str, partitions: int) -> tuple[int, str, str, str]:
    """Split a stored subject cmd.<P>.<source>.<kind>.<id>; ValueError says what is wrong."""
    tokens = subject.split(".")
    if len(tokens) != 5 or tokens[0] != "cmd":
        if _WILDCARDS.intersection(tokens):
            # The stream's partition transform leaves such a subject as it was published.
            raise ValueError(f"subject {subject!r} has a wildcard token where a name"
                             " belongs: cmd.<source>.<kind>.<id> takes literal names")
        raise ValueError(f"subject {subject!r} is not cmd.<partition>.<source>.<kind>.<id>")
    _, part, source, kind, id_ = tokens
    if kind not in DECIDERS:
        raise ValueError(f"unknown entity kind {kind!r} in subject {subject!r}")
    for name, token in (("source", source), ("id", id_)):
        if not is_valid_id(token):
            raise ValueError(f"invalid {name} {token!r} in subject {subject!r}")
    expected = partition_of(kind, id_, partitions)
    if part != str(expected):
        raise ValueError(f"{kind}/{id_} belongs to partition {expected}, not {part}")
    return expected, source, sys.intern(kind), id_  # one copy in every state's key


def fold_message(states: States, subject: str, data: bytes, seq: int, at: int,
                 partitions: int) -> Folded:
    """Fold one stored command into ``states``. Never raises, whatever the message holds
    or a decider does with it (the module docstring says what comes of it)."""
    folded = Folded(seq=seq, subject=subject)
    try:
        _, source, kind, id_ = address(subject, partitions)
    except ValueError as exc:
        folded.dead_letter = printable(str(exc))
        return folded
    except Exception as exc:  # a bug of ours, on a subject nobody checked before
        folded.dead_letter = _internal_error("address", exc)
        folded.internal_error = True
        return folded
    folded.key = (kind, id_)
    try:
        return _fold_command(folded, states, data, source, at)
    except Exception as exc:  # a bug of ours (in an upcaster, say), before any state moved
        return _reject_internal(folded, source, at, "?", "", "fold", exc)


def _fold_command(folded: Folded, states: States, data: bytes, source: str,
                  at: int) -> Folded:
    key = folded.key
    assert key is not None
    kind, id_ = key
    seq = folded.seq
    try:
        cmd = decode_command(data)
    except CommandError as exc:
        folded.dead_letter = str(exc)
        return _reject(folded, source, at, exc.type, "", folded.dead_letter)
    type_ = type(cmd).__name__
    if cmd.kind != kind or cmd.id != id_:
        folded.dead_letter = f"misaddressed: {type_} for {cmd.kind}/{cmd.id} on {folded.subject}"
        return _reject(folded, source, at, type_, cmd.cmd_id, folded.dead_letter)
    if source_class(source) not in cmd.sources:
        return _reject(folded, source, at, type_, cmd.cmd_id,
                       f"{type_} may not come from source {source!r}")

    decider = DECIDERS[kind]
    state = states.get(key)
    generation = getattr(state, "generation", 0)
    stage, touched = "decide", False
    before: Restore | None = None
    ctx = Ctx(source=source, seq=seq, at=at)
    try:
        decision = decider.decide(state, cmd, ctx)
        if not decision.accepted:
            # Its follow-ups, if any, answer whoever asked: they must hear the refusal.
            folded.commands = decision.commands
            return _reject(folded, source, at, type_, cmd.cmd_id, printable(decision.reason or ""),
                           commands=_subjects(decision.commands))
        if decision.events:
            stage = "evolve"
            if state is not None:
                before = _keep(decider, kind, state, decision.events)
            touched = True
            # What other entities follow of this one (a pool, of its members), before and
            # after: a change is told to them by the decider's react.
            observe = getattr(decider, "observe", None)
            seen = observe(state) if observe is not None else None
            for event in decision.events:
                state = decider.evolve(state, event)
            states[key] = state
            folded.changed = True
            if observe is not None and (now := observe(state)) != seen:
                stage = "react"
                decision.commands = [*decision.commands, *decider.react(
                    id_, seen, now, state, ctx, start=len(decision.commands))]
            emit_jobs = getattr(decider, "jobs", None)
            if emit_jobs is not None:
                stage = "jobs"
                folded.jobs = emit_jobs(kind, id_, generation, state, decision.events)
        stage = "outcome"
        folded.commands = decision.commands
        folded.outcome = Outcome(
            seq=seq, at=at, cmd_id=cmd.cmd_id, type=type_, source=source, kind=kind, id=id_,
            accepted=True, reason=decision.note,
            events=tuple(type(e).__name__ for e in decision.events),
            jobs=tuple(job_subject(j) for j in folded.jobs),
            commands=_subjects(decision.commands),
        )
        return folded
    except Exception as exc:
        if touched:  # evolve may have updated the state halfway: it is as before the command
            _restore(states, key, before)
        return _reject_internal(folded, source, at, type_, cmd.cmd_id, f"{kind}.{stage}", exc)


def _subjects(commands: list[Command]) -> tuple[str, ...]:
    return tuple(f"{c.kind}/{c.id}:{type(c).__name__}" for c in commands)


def _reject(folded: Folded, source: str, at: int, type_: str, cmd_id: str,
            reason: str, commands: tuple[str, ...] = ()) -> Folded:
    assert folded.key is not None
    kind, id_ = folded.key
    folded.outcome = Outcome(seq=folded.seq, at=at, cmd_id=cmd_id, type=type_, source=source,
                             kind=kind, id=id_, accepted=False, reason=reason,
                             commands=commands)
    return folded


def _reject_internal(folded: Folded, source: str, at: int, type_: str, cmd_id: str,
                     where: str, exc: Exception) -> Folded:
    """A bug: nothing of what the command did so far is kept, and it is a dead letter."""
    folded.changed, folded.jobs, folded.commands = False, [], []
    folded.internal_error = True
    folded.dead_letter = _internal_error(where, exc)
    return _reject(folded, source, at, type_, cmd_id, folded.dead_letter)


def _internal_error(where: str, exc: Exception) -> str:
    """``internal error in <where>: <type>: <message> (<file>:<line>)``, the same in every
    process: no memory address, and the file relative to the project."""
    frames = traceback.extract_tb(exc.__traceback__)
    origin = ""
    if frames:
        path = Path(frames[-1].filename)
        shown = path.relative_to(_ROOT) if path.is_relative_to(_ROOT) else path.name
        origin = f" ({shown}:{frames[-1].lineno})"
    message = printable(_ADDRESS.sub("", str(exc)), limit=300)
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return printable(f"{INTERNAL_ERROR}{where}: {text}{origin}")


def job_subject(job: Job) -> str:
    return f"job.{job.host}.{job.kind}.{job.id}"
