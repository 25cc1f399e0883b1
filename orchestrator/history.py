"""An entity's history folded again, command by command, with the fold's own code. Pure.

An entity's state depends only on its own commands, so folding just those (read from CMD
by subject) gives, at each step, exactly the state the projection had: what each command
changed (`orch tail --diff`), the state as of any point (`orch get --at`), and the jobs a
command emitted, with their generations (`orch trace`). Nothing extra is stored. A fold
may start from the entity's row in a snapshot of the projection instead of its first
command (`EntityFold.resume`): that row is the same fold, up to the snapshot's checkpoint.
"""

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from orchestrator.deciders import STATE_TYPES
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
    before: dict[str, Any] | None  # the state as builtins (as_stored: as the projection), or None
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

    def __init__(self, key: Key, partitions: int, states: bool = True) -> None:
        """``states``: keep each step's state as stored (diffs need it, jobs do not)."""
        self.key, self.partitions, self.track = key, partitions, states
        self.states: dict[Key, Any] = {}
        self.current: dict[str, Any] | None = None
        self.last_seq = 0  # of the last command that changed the state
        self.read_upto = 0  # the last seq fed
        self.started_after = 0  # the seq its first state is as of: a snapshot's checkpoint

    def resume(self, checkpoint: int, state: bytes | None, last_seq: int) -> None:
        """Start, unfed, from the entity's row in a snapshot of the current code (None: it
        had none), its state as of ``checkpoint``: feed it only the commands after that."""
        assert self.read_upto == 0, "a fold resumes before it is fed"
        if state is not None:
            self.states[self.key] = msgspec.json.decode(state, type=STATE_TYPES[self.key[0]])
            if self.track:
                self.current = msgspec.to_builtins(self.states[self.key])
        self.last_seq, self.read_upto, self.started_after = last_seq, checkpoint, checkpoint

    def feed(self, messages: Iterable[Stored]) -> Iterator[Step]:
        for m in messages:
            folded = fold_message(self.states, m.subject, m.data, m.seq, m.at, self.partitions)
            before = self.current
            if folded.changed:
                self.last_seq = m.seq
                if self.track:  # builtins, as stored but for int keys: half the cost
                    self.current = msgspec.to_builtins(self.states.get(self.key))
            self.read_upto = m.seq
            yield Step(folded, before, self.current, self.last_seq)


def _changes(path: str, old: Any, new: Any, out: list[Change]) -> None:
    """Only called where ``old != new`` (compared in C: most of a state does not change)."""
    if type(old) is dict and type(new) is dict and old and new:
        for key in sorted(old.keys() | new.keys()):
            o, n = old.get(key, _MISSING), new.get(key, _MISSING)
            if o != n:
                _changes(f"{path}.{key}" if path else key, o, n, out)
    elif type(old) is dict and old:  # a whole object appeared or went: its leaves
        _changes(path, old, dict.fromkeys(old, _MISSING), out)
    elif type(new) is dict and new:
        _changes(path, dict.fromkeys(new, _MISSING), new, out)
    elif path:
        before, after = None if old is _MISSING else old, None if new is _MISSING else new
        if before is not None or after is not None:  # a field that appears unset: nothing
            out.append(Change(path, before, after))


def diff(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> list[Change]:
    """Fields that differ, by dotted path, in key order at each level; lists compare whole."""
    out: list[Change] = []
    old, new = dict(before or {}), dict(after or {})
    if old != new:
        _changes("", old, new, out)
    return out


_MISSING: Any = object()
