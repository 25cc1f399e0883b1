"""Arguments verbs share: KIND[/ID] targets, and points of the log given as SEQ or TIME."""

from datetime import UTC, datetime

from orchestrator.cli.output import EXIT_USAGE, CliError
from schemas.ids import ID_PATTERN, KINDS, is_valid_id

_KIND_ALIASES = {f"{k}s": k for k in KINDS}


def parse_target(target: str, need_id: bool) -> tuple[str, str | None]:
    kind, _, id_ = target.partition("/")
    kind = _KIND_ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise CliError(f"unknown kind {kind!r}: one of {', '.join(KINDS)}", EXIT_USAGE)
    if need_id and not id_:
        raise CliError(f"expected KIND/ID, got {target!r}", EXIT_USAGE)
    if id_ and not is_valid_id(id_):
        raise CliError(f"invalid id {id_!r}: must match {ID_PATTERN}", EXIT_USAGE)
    return kind, id_ or None


def parse_kind(text: str) -> str:
    kind, _ = parse_target(text, need_id=False)
    return kind


def parse_point(text: str, option: str) -> int | datetime:
    """A point of the log: a stream sequence (digits) or an ISO-8601 time, UTC when it names
    no zone. ``option`` names the flag in the error."""
    if text.isdigit():
        if int(text) < 1:
            raise CliError(f"{option}: a sequence starts at 1", EXIT_USAGE)
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise CliError(f"{option}: {text!r} is neither a sequence nor an ISO-8601 time"
                       " (2026-11-26T10:00:00Z)", EXIT_USAGE) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def not_in_future(when: datetime, option: str, now: datetime | None = None) -> datetime:
    """A time to read the log at must have happened: the future holds nothing to show yet."""
    if when > (now or datetime.now(UTC)):
        raise CliError(f"{option}: {when.isoformat()} is in the future", EXIT_USAGE)
    return when
