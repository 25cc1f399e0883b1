"""The decider contract shared by every entity kind.

``decide(state, command, ctx) -> Decision`` and ``evolve(state, event) -> state`` are pure:
time comes from ``ctx.at`` (the command's JetStream timestamp), ids from ``ctx.seq``.
``evolve`` may update the state it is given in place (the fold owns its states); it must
never raise for an event ``decide`` produced.
"""

from dataclasses import dataclass, field
from typing import Any

import msgspec

from schemas.commands import FOLLOW_UP_PREFIX, Command


@dataclass(frozen=True, slots=True)
class Ctx:
    source: str  # subject token: user, admin, system or a host name
    seq: int  # stream sequence of the command
    at: int  # JetStream timestamp, ms

    def key(self, n: int) -> str:
        """Idempotency key of the n-th follow-up command: stable across replays and relays."""
        return f"{FOLLOW_UP_PREFIX}{self.seq}-{n}"


class Event(msgspec.Struct, frozen=True):
    """Base of the facts a decider records; their class names appear in timelines."""


@dataclass(slots=True)
class Decision:
    events: list[Event] = field(default_factory=list)
    # Follow-ups to other entities. A rejection may carry some too: the answer to the
    # entity that asked (an instance told why its port was refused, say).
    commands: list[Command] = field(default_factory=list)
    reason: str | None = None  # set: the command is rejected and no event happens
    note: str | None = None  # on an accepted command: why, for its timeline

    @property
    def accepted(self) -> bool:
        return self.reason is None


def reject(reason: str, commands: list[Command] | None = None) -> Decision:
    return Decision(reason=reason, commands=commands or [])


def accept(*events: Event, commands: list[Command] | None = None,
           note: str | None = None) -> Decision:
    return Decision(events=list(events), commands=commands or [], note=note)


def follow_ups(ctx: Ctx, *make: Any, start: int = 0) -> list[Command]:
    """Build follow-up commands, each given its derived idempotency key.

    ``make`` holds (command class, keyword arguments) pairs; ``start`` numbers them after
    follow-ups the same decision already built.
    """
    return [cls(cmd_id=ctx.key(start + n), **kwargs) for n, (cls, kwargs) in enumerate(make)]
