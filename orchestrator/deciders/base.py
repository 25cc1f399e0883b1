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
    commands: list[Command] = field(default_factory=list)  # follow-ups to other entities
    reason: str | None = None  # set: the command is rejected and nothing else happens

    @property
    def accepted(self) -> bool:
        return self.reason is None


def reject(reason: str) -> Decision:
    return Decision(reason=reason)


def accept(*events: Event, commands: list[Command] | None = None) -> Decision:
    return Decision(events=list(events), commands=commands or [])


def follow_ups(ctx: Ctx, *make: Any) -> list[Command]:
    """Build follow-up commands, each given its derived idempotency key.

    ``make`` holds (command class, keyword arguments) pairs.
    """
    return [cls(cmd_id=ctx.key(n), **kwargs) for n, (cls, kwargs) in enumerate(make)]
