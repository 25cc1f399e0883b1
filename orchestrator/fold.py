"""Folding one message from the CMD stream: parse, check, decide, evolve. Pure.

The partition workers and ``orch replay`` both run this, so the live projection and a
replayed one cannot disagree by construction: only by a bug, which replay then reveals.
"""

import functools
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

from events.subjects import partition_of
from orchestrator.deciders import DECIDERS
from orchestrator.deciders.base import Ctx
from schemas.codec import CommandError, decode_command
from schemas.commands import Command, SourceClass
from schemas.ids import RESERVED_SOURCES, is_valid_id
from schemas.jobs import Job
from schemas.outcomes import Outcome

Key = tuple[str, str]  # (kind, id)
States = MutableMapping[Key, Any]


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


def source_class(source: str) -> SourceClass:
    return source if source in RESERVED_SOURCES else "host"  # type: ignore[return-value]


@functools.lru_cache(maxsize=1 << 16)
def address(subject: str, partitions: int) -> tuple[int, str, str, str]:
    """Split a stored subject cmd.<P>.<source>.<kind>.<id>; ValueError says what is wrong."""
    tokens = subject.split(".")
    if len(tokens) != 5 or tokens[0] != "cmd":
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
    return expected, source, kind, id_


def fold_message(states: States, subject: str, data: bytes, seq: int, at: int,
                 partitions: int) -> Folded:
    """Fold one stored command into ``states``; never raises for bad input."""
    folded = Folded(seq=seq, subject=subject)
    try:
        _, source, kind, id_ = address(subject, partitions)
    except ValueError as exc:
        folded.dead_letter = str(exc)
        return folded
    key = folded.key = (kind, id_)

    def rejected(type_: str, cmd_id: str, reason: str) -> Folded:
        folded.outcome = Outcome(seq=seq, at=at, cmd_id=cmd_id, type=type_, source=source,
                                 kind=kind, id=id_, accepted=False, reason=reason)
        return folded

    try:
        cmd = decode_command(data)
    except CommandError as exc:
        folded.dead_letter = str(exc)
        return rejected(exc.type, "", str(exc))
    type_ = type(cmd).__name__
    if cmd.kind != kind or cmd.id != id_:
        folded.dead_letter = f"misaddressed: {type_} for {cmd.kind}/{cmd.id} on {subject}"
        return rejected(type_, cmd.cmd_id, folded.dead_letter)
    if source_class(source) not in cmd.sources:
        return rejected(type_, cmd.cmd_id, f"{type_} may not come from source {source!r}")

    decider = DECIDERS[kind]
    state = states.get(key)
    generation = getattr(state, "generation", 0)
    decision = decider.decide(state, cmd, Ctx(source=source, seq=seq, at=at))
    if not decision.accepted:
        return rejected(type_, cmd.cmd_id, decision.reason or "")
    for event in decision.events:
        state = decider.evolve(state, event)
    if decision.events:
        states[key] = state
        folded.changed = True
        emit_jobs = getattr(decider, "jobs", None)
        if emit_jobs is not None:
            folded.jobs = emit_jobs(kind, id_, generation, state, decision.events)
    folded.commands = decision.commands
    folded.outcome = Outcome(
        seq=seq, at=at, cmd_id=cmd.cmd_id, type=type_, source=source, kind=kind, id=id_,
        accepted=True,
        events=tuple(type(e).__name__ for e in decision.events),
        jobs=tuple(job_subject(j) for j in folded.jobs),
        commands=tuple(f"{c.kind}/{c.id}:{type(c).__name__}" for c in decision.commands),
    )
    return folded


def job_subject(job: Job) -> str:
    return f"job.{job.host}.{job.kind}.{job.id}"
