"""`orch publish`: validate and append commands, and wait for what they caused if asked;
`orch schema`: what the bus carries."""

import json
import sys
import uuid
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from events.bus import Published, Publisher, same_as_stored
from events.topology import ensure_topology
from orchestrator import render
from orchestrator.cli.app import Options, app
from orchestrator.cli.causes import Progress, reader
from orchestrator.cli.connect import open_nats
from orchestrator.cli.output import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    console,
    fail,
    print_json,
    run,
)
from orchestrator.cli.wait import Waited, report, wait_all
from orchestrator.fold import source_class
from schemas.codec import CommandError, command_from_dict, loads
from schemas.commands import Command
from schemas.export import json_schema
from schemas.ids import is_valid_id


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def _parse_json(text: str, what: str = "") -> Any:
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


def _apply_set(doc: dict[str, Any], assignment: str) -> None:
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
    target[leaf] = _parse_value(value)


def _build(doc: Any, default_source: str, key: str | None = None) -> tuple[str, Command]:
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


def _read_lines(file: str, default_source: str) -> list[tuple[str, Command]]:
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
            items.append(_build(_parse_json(line), default_source))
        except CommandError as exc:
            raise CommandError(f"line {number}: {exc}") from None
    return items


class WaitMode(StrEnum):
    outcome = "outcome"
    applied = "applied"


@app.command()
def publish(
    ctx: typer.Context,
    type_: Annotated[str | None, typer.Argument(metavar="TYPE", help="Command type")] = None,
    id_: Annotated[str | None, typer.Argument(metavar="ID", help="Entity id")] = None,
    source: Annotated[str, typer.Option(
        "--source", "-s", help="user, admin, system or a host name")] = "user",
    sets: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE", help="A field (VALUE parsed as JSON if it can be)",
    )] = None,
    fields: Annotated[str | None, typer.Option(
        "--json", metavar="OBJECT", help="Fields as a JSON object (--set wins over it)",
    )] = None,
    file: Annotated[str | None, typer.Option(
        "--file", "-f", metavar="FILE|-", help="JSON lines, one full command each",
    )] = None,
    key: Annotated[str | None, typer.Option(
        "--key", help="Idempotency key (cmd_id) [default: random]")] = None,
    json_out: Annotated[bool, typer.Option(
        "--json-out", help='Print {"seq":..,"duplicate":..} per command')] = False,
    wait: Annotated[WaitMode | None, typer.Option(
        "--wait", metavar="[applied]", help="Wait for each command's outcome and print it"
        " (exit 1 if rejected); `--wait applied`: and until every job it caused is applied"
        " (exit 1 on a failure that ran out of retries)")] = None,
    timeout: Annotated[float | None, typer.Option(
        min=0, metavar="SECONDS", help="Give up waiting after this long (exit 124, saying"
        " what is missing)")] = None,
) -> None:
    """Validate and publish one command (TYPE ID and fields) or many (--file, - for stdin).

    Nothing is published unless every command is valid.
    """
    opts: Options = ctx.obj

    def commands() -> list[tuple[str, Command]]:
        if file is not None:
            if type_ or id_ or sets or fields or key:
                raise CliError("--file takes whole commands: no TYPE, ID, --set, --json or"
                               " --key with it", EXIT_USAGE)
            return _read_lines(file, source)
        if fields is None and type_ is None:
            raise CliError("nothing to publish: give TYPE ID, --json or --file", EXIT_USAGE)
        doc: dict[str, Any] = {}
        if fields is not None:
            doc = _parse_json(fields, "--json")
            if not isinstance(doc, dict):
                raise CommandError("--json: expected a JSON object")
        for assignment in sets or ():
            _apply_set(doc, assignment)
        if type_ is not None:
            doc["type"] = type_
        if id_ is not None:
            doc["id"] = id_
        return [_build(doc, source, key)]

    async def main() -> int:
        if timeout is not None and wait is None:
            raise CliError("--timeout bounds --wait: give --wait too", EXIT_USAGE)
        items = commands()  # all validated before anything is sent
        if not items:
            return EXIT_OK
        nc = await open_nats(opts.nats_url(), "orch-publish")
        try:
            js = nc.jetstream()
            await ensure_topology(js)
            publisher = Publisher(js)
            if len(items) == 1:
                results = [await publisher.publish(*items[0])]
            else:
                results = await publisher.publish_many(items)
            # The server drops a duplicate key whatever the command: a reused key is not a retry.
            conflicts = {n for n, ((_, cmd), result) in enumerate(zip(items, results, strict=True))
                         if result.duplicate and not await same_as_stored(js, result.seq, cmd)}
        finally:
            await nc.close()
        out = console()
        for n, ((_, cmd), result) in enumerate(zip(items, results, strict=True)):
            if wait is not None and not conflicts:
                break  # the outcomes say it all
            if json_out:
                print_json({"seq": result.seq, "duplicate": result.duplicate,
                             "conflict": n in conflicts, "cmd_id": cmd.cmd_id,
                             "type": type(cmd).__name__, "kind": cmd.kind, "id": cmd.id})
            else:
                out.print(render.published_line(type(cmd).__name__, cmd.kind, cmd.id,
                                                result.seq, result.duplicate))
        if conflicts:
            first = items[min(conflicts)][1]
            raise CliError(
                f"{len(conflicts)} command(s) not published: idempotency key {first.cmd_id!r}"
                f" of {first.kind}/{first.id} was already used for a different command"
                f" (seq {results[min(conflicts)].seq}); use a new --key")
        if wait is not None:
            return await _wait(opts, items, results, wait, timeout, json_out, out)
        return EXIT_OK

    run(main)


async def _wait(opts: Options, items: list[tuple[str, Command]], results: list[Published],
                mode: WaitMode, timeout: float | None, json_out: bool, out: Console) -> int:
    waited = [Waited(r.seq, {"seq": r.seq, "duplicate": r.duplicate, "cmd_id": cmd.cmd_id,
                             "type": type(cmd).__name__, "kind": cmd.kind, "id": cmd.id})
              for (_, cmd), r in zip(items, results, strict=True)]
    applied = mode is WaitMode.applied
    progress = Progress(Console(stderr=True), enabled=not json_out)
    try:
        async with reader(opts.nats_url(), opts.pg_dsn(), "orch-publish-wait") as r:
            settled = await wait_all(r, waited, applied, timeout, progress)
    finally:
        progress.close()
    code, error = report(waited, applied, settled, json_out, out, timeout)
    if error is not None:
        print(f"error: {error}", file=sys.stderr, flush=True)
    return code


@app.command()
def schema(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write to FILE")] = None,
) -> None:
    """The JSON Schema of every message on the bus (commands, jobs, outcomes)."""
    text = json.dumps(json_schema(), indent=2) + "\n"
    if out is None:
        sys.stdout.write(text)
        return
    try:
        out.write_text(text)
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror}", EXIT_FAILURE)
