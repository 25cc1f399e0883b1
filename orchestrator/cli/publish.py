"""`orch publish`: validate and append commands, and wait for what they caused if asked;
`orch schema`: what the bus carries."""

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.cli.app import Options, app
from orchestrator.cli.output import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CliError, fail, run


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
    from events.bus import Publisher, same_as_stored
    from events.topology import ensure_topology
    from orchestrator import render
    from orchestrator.cli.compose import apply_set, build, parse_json, read_lines
    from orchestrator.cli.connect import open_nats
    from orchestrator.cli.output import console, print_json
    from orchestrator.cli.wait import wait_and_report
    from schemas.codec import CommandError
    from schemas.commands import Command

    opts: Options = ctx.obj

    def commands() -> list[tuple[str, Command]]:
        if file is not None:
            if type_ or id_ or sets or fields or key:
                raise CliError("--file takes whole commands: no TYPE, ID, --set, --json or"
                               " --key with it", EXIT_USAGE)
            return read_lines(file, source)
        if fields is None and type_ is None:
            raise CliError("nothing to publish: give TYPE ID, --json or --file", EXIT_USAGE)
        doc: dict[str, Any] = {}
        if fields is not None:
            doc = parse_json(fields, "--json")
            if not isinstance(doc, dict):
                raise CommandError("--json: expected a JSON object")
        for assignment in sets or ():
            apply_set(doc, assignment)
        if type_ is not None:
            doc["type"] = type_
        if id_ is not None:
            doc["id"] = id_
        return [build(doc, source, key)]

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
            return await wait_and_report(opts.nats_url(), opts.pg_dsn(), items, results,
                                         wait is WaitMode.applied, timeout, json_out, out)
        return EXIT_OK

    run(main)


@app.command()
def schema(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write to FILE")] = None,
) -> None:
    """The JSON Schema of every message on the bus (commands, jobs, outcomes)."""
    from schemas.export import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if out is None:
        sys.stdout.write(text)
        return
    try:
        out.write_text(text)
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror}", EXIT_FAILURE)
