"""Verbs over the projection: `orch get`, `orch hosts`, `orch alerts`, `orch dead-letters`."""

import dataclasses
import time
from typing import Annotated, Any

import typer

from events.heartbeats import read_heartbeats
from orchestrator import queries, render
from orchestrator.cli.app import Options, app
from orchestrator.cli.connect import open_nats, open_pg, query
from orchestrator.cli.output import (
    EXIT_FAILURE,
    EXIT_OK,
    CliError,
    console,
    list_rows,
    print_json,
    run,
)
from orchestrator.cli.parse import parse_target


@app.command()
def get(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(metavar="KIND[/ID]",
                                          help="e.g. instance/vm1, or instance to list")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON (one object per line)")] = False,
) -> None:
    """Show one entity's projected state, or list the entities of a kind."""
    opts: Options = ctx.obj

    async def main() -> None:
        kind, id_ = parse_target(target, need_id=False)
        conn = await open_pg(opts.pg_dsn())
        try:
            if id_ is not None:
                row = await queries.get_entity(conn, kind, id_)
                if row is None:
                    raise CliError(f"no {kind}/{id_}", EXIT_FAILURE)
                rows = [row]
            else:
                rows = await queries.list_entities(conn, kind)
        finally:
            await conn.close()
        if as_json:
            for row in rows:
                print_json({"kind": row.kind, "id": row.id, "last_seq": row.last_seq,
                            "state": row.state})
        elif id_ is not None:
            console().print(render.entity_view(rows[0]))
        elif rows:
            console().print(render.entity_table(kind, rows))
        else:
            print(f"no {kind} entities", flush=True)

    run(main)


@app.command()
def hosts(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One object per line")] = False,
) -> None:
    """Hosts with their condition, instance count and last heartbeat."""
    opts: Options = ctx.obj

    async def main() -> None:
        rows = await query(opts.pg_dsn(), queries.hosts)
        nc = await open_nats(opts.nats_url(), "orch-hosts")
        try:
            beats = await read_heartbeats(nc.jetstream())
        finally:
            await nc.close()
        now_ms = int(time.time() * 1000)

        def as_doc(row: queries.HostRow) -> dict[str, Any]:
            beat = beats.get(row.id)
            return {**dataclasses.asdict(row), "last_heartbeat_ms": beat.at_ms if beat else None}

        list_rows(rows, as_json, as_doc, lambda rs: render.hosts_table(rs, beats, now_ms),
                  "no hosts")

    run(main)


@app.command()
def alerts(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One object per line")] = False,
) -> None:
    """Entities degraded after their retries ran out, and hosts down (exit 1 if any)."""
    opts: Options = ctx.obj

    async def main() -> int:
        rows = await query(opts.pg_dsn(), queries.alerts)
        list_rows(rows, as_json, dataclasses.asdict, render.alerts_table, "no alerts")
        return EXIT_FAILURE if rows else EXIT_OK

    run(main)


@app.command("dead-letters")
def dead_letters(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, help="The newest N")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One object per line")] = False,
) -> None:
    """Messages the fold could not use (bad subject or body), oldest first."""
    opts: Options = ctx.obj

    async def main() -> None:
        rows = list(reversed(await query(
            opts.pg_dsn(), lambda conn: queries.dead_letters(conn, limit))))
        list_rows(rows, as_json, dataclasses.asdict, render.dead_letters_table,
                  "no dead letters")

    run(main)
