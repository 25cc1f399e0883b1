"""What the fold decided for one command: a timeline entry, also published on evt.<kind>.<id>."""

import msgspec


class Outcome(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    seq: int
    at: int  # JetStream timestamp of the command, in ms since the epoch
    cmd_id: str
    type: str
    source: str
    kind: str
    id: str
    accepted: bool
    reason: str | None = None
    events: tuple[str, ...] = ()
    jobs: tuple[str, ...] = ()  # subjects of the jobs emitted
    commands: tuple[str, ...] = ()  # subjects of the follow-up commands emitted

