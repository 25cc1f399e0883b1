"""Commands as `orch publish` takes them: TYPE ID with --set and --json, or a JSON-lines
file; each validated as the fold will see it, or CommandError (a usage error) says why."""

import json
import sys
import uuid
from pathlib import Path
from typing import Any

from orchestrator.cli.output import EXIT_USAGE, CliError
from orchestrator.fold import source_class
from schemas.codec import CommandError, command_from_dict, loads
from schemas.commands import Command
from schemas.ids import is_valid_id


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def parse_json(text: str, what: str = "") -> Any:
    """JSON input, or CommandError (a usage error) saying why not."""
    where = f"{what}: " if what else ""
    try:
        return loads(text)  # a key given twice is refused, not the last one taken
    except CommandError as exc:
        raise CommandError(f"{where}{exc}") from None
    except ValueError as exc:
        raise CommandError(f"{where}not valid JSON: {exc}") from None
    except RecursionError:
        raise CommandError(f"{where}JSON nested too deeply") from None


def apply_set(doc: dict[str, Any], assignment: str) -> None:
    """`--set a.b=v`: v as JSON if it parses, else as a string; dots make nested objects."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise CommandError(f"--set {assignment!r}: expected KEY=VALUE")
    *parents, leaf = key.split(".")
    target = doc
    for part in parents:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise CommandError(f"--set {assignment!r}: {part!r} is not an object")
    target[leaf] = parse_value(value)


def build(doc: Any, default_source: str, key: str | None = None) -> tuple[str, Command]:
    """A validated (source, command) from one parsed object; CommandError says what is wrong."""
    if not isinstance(doc, dict):
        raise CommandError("a command must be a JSON object")
    doc = dict(doc)
    source = doc.pop("source", default_source)
    if not isinstance(source, str) or not is_valid_id(source):
        raise CommandError(f"invalid source {source!r}: user, admin, system or a host name")
    if key is not None:
        doc["cmd_id"] = key
    doc.setdefault("cmd_id", uuid.uuid4().hex)
    cmd = command_from_dict(doc)
    if source_class(source) not in cmd.sources:
        allowed = ", ".join("a host name" if s == "host" else s for s in cmd.sources)
        raise CommandError(f"{type(cmd).__name__} may not come from source {source!r}"
                           f" (allowed: {allowed}) at `$.source`")
    return source, cmd


def read_lines(file: str, default_source: str) -> list[tuple[str, Command]]:
    """Every command of a JSON-lines file, or CommandError naming the first bad line."""
    try:
        raw = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {file}: {exc.strerror}", EXIT_USAGE) from None
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise CliError(f"{file} is not UTF-8: byte {exc.start} is {raw[exc.start]:#04x}",
                       EXIT_USAGE) from None
    items: list[tuple[str, Command]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(build(parse_json(line), default_source))
        except CommandError as exc:
            raise CommandError(f"line {number}: {exc}") from None
    return items
