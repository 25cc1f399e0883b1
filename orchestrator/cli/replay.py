"""`orch replay`: fold the CMD log again into a scratch schema, to a point or to verify."""

import re
from datetime import datetime
from typing import Annotated

import typer

from events.bus import last_seq_at
from events.subjects import CMD_STREAM
from events.topology import ensure_topology
from orchestrator import render
from orchestrator.cli.app import Options, app
from orchestrator.cli.connect import open_nats, open_pg
from orchestrator.cli.output import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    console,
    print_json,
    run,
)
from orchestrator.cli.parse import parse_point
from orchestrator.replay import replay as run_replay

# Same rule as orchestrator.replay; checked here so a bad name is a usage error (exit 2).
_SCRATCH_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@app.command()
def replay(
    ctx: typer.Context,
    to: Annotated[str | None, typer.Option(
        "--to", metavar="SEQ|TIME", help="Stop after this CMD sequence, or after the last"
        " command stored at or before this ISO-8601 time (UTC unless it names a zone)",
    )] = None,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Compare with the live projection; exit 1 if they differ")] = False,
    schema: Annotated[str, typer.Option(help="Scratch schema, dropped and recreated")] = "replay",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Fold the whole CMD log again into a scratch schema, and optionally verify it."""
    opts: Options = ctx.obj

    async def main() -> int:
        if not _SCRATCH_SCHEMA_RE.match(schema) or schema == "public":
            raise CliError(f"invalid scratch schema name {schema!r}", EXIT_USAGE)
        if verify and to is not None:
            raise CliError("--verify compares with the live projection: not with --to",
                           EXIT_USAGE)
        target = None if to is None else parse_point(to, "--to")
        nc = await open_nats(opts.nats_url(), "orch-replay")
        try:
            js = nc.jetstream()
            topology = await ensure_topology(js)
            to_seq = (await last_seq_at(js, CMD_STREAM, target)
                      if isinstance(target, datetime) else target)
        finally:
            await nc.close()
        await (await open_pg(opts.pg_dsn())).close()  # a clear error if it is unreachable
        report = await run_replay(opts.nats_url(), opts.pg_dsn(), topology.partitions,
                                  schema=schema, to_seq=to_seq, verify=verify)
        if as_json:
            print_json(render.replay_json(report, verify))
        else:
            out = console()
            for line in render.replay_lines(report, verify):
                out.print(line)
        return EXIT_FAILURE if verify and report.differs else EXIT_OK

    run(main)
