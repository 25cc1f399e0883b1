"""An entity's history folded again, command by command, with the fold's own code. Pure.

An entity's state depends only on its own commands, so folding just those (read from CMD
by subject) gives, at each step, exactly the state the projection had: what each command
changed (`orch tail --diff`), the state as of any point (`orch get --at`), and the jobs a
command emitted, with their generations (`orch trace`). Nothing extra is stored.
"""

from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from orchestrator.fold import Folded, Key, fold_message
from schemas.codec import encode


@dataclass(frozen=True, slots=True)
class Stored:
    """One command as CMD stores it."""

    seq: int
    at: int  # ms
    subject: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Step:
    folded: Folded
    before: dict[str, Any] | None  # the state as the projection stores it (JSON), or None
    after: dict[str, Any] | None
    last_seq: int  # of the last command that changed the state, as the projection's column


@dataclass(frozen=True, slots=True)
class Change:
    path: str  # dotted, as `orch get` shows nested fields
    before: Any  # None where the field did not exist
    after: Any


def as_stored(state: Any) -> dict[str, Any] | None:
    """The state as the projection's jsonb holds it (int keys become strings, say)."""
    return None if state is None else msgspec.json.decode(encode(state))


class EntityFold:
    """An entity's fold that can be fed more of its commands later, where it stopped."""

    def __init__(self, key: Key, partitions: int) -> None:
        self.key, self.partitions = key, partitions
        self.states: dict[Key, Any] = {}
        self.current: dict[str, Any] | None = None
        self.last_seq = 0  # of the last command that changed the state
        self.read_upto = 0  # the last seq fed

    def feed(self, messages: Iterable[Stored]) -> Iterator[Step]:
        for m in messages:
            folded = fold_message(self.states, m.subject, m.data, m.seq, m.at, self.partitions)
            before = self.current
            if folded.changed:
                self.current, self.last_seq = as_stored(self.states.get(self.key)), m.seq
            self.read_upto = m.seq
            yield Step(folded, before, self.current, self.last_seq)


def fold_entity(key: Key, messages: Iterable[Stored], partitions: int) -> Iterator[Step]:
    """Fold the entity's own commands in order; one step per command."""
    return EntityFold(key, partitions).feed(messages)


def state_at(steps: Iterable[Step]) -> Step | None:
    """The last step: the entity after every command given, or None if there was none."""
    last = deque(steps, maxlen=1)
    return last[0] if last else None


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif prefix:
        out[prefix] = value


def diff(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> list[Change]:
    """Fields that differ, by dotted path, in path order; lists compare whole."""
    old: dict[str, Any] = {}
    new: dict[str, Any] = {}
    _flatten(before or {}, "", old)
    _flatten(after or {}, "", new)
    return [Change(path, old.get(path), new.get(path)) for path in sorted(old.keys() | new.keys())
            if old.get(path, _MISSING) != new.get(path, _MISSING)]


_MISSING = object()
