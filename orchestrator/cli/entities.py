"""Verbs over the projection: `orch get`, `orch hosts`, `orch alerts`, `orch dead-letters`."""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from orchestrator.cli.app import Options, app
from orchestrator.cli.output import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    console,
    list_rows,
    print_json,
    run,
)
from orchestrator.cli.parse import not_in_future, parse_point, parse_target

if TYPE_CHECKING:
    from orchestrator.queries import EntityRow, HostRow


@app.command()
def get(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(metavar="KIND[/ID]",
                                          help="e.g. instance/vm1, or instance to list")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON (one object per line)")] = False,
    at: Annotated[str | None, typer.Option(
        "--at", metavar="SEQ|TIME", help="The entity as it was after this CMD seq, or after"
        " the last command stored at or before this ISO-8601 time (UTC unless it names a"
        " zone): its history folded again")] = None,
) -> None:
    """Show one entity's projected state, or list the entities of a kind."""
    from orchestrator import queries, render
    from orchestrator.cli.connect import open_pg

    opts: Options = ctx.obj

    async def main() -> None:
        kind, id_ = parse_target(target, need_id=False)
        if at is not None:
            if id_ is None:
                raise CliError("--at shows one entity: give KIND/ID", EXIT_USAGE)
            row, seq = await _state_at(opts, kind, id_, parse_point(at, "--at"))
            if as_json:
                print_json({"kind": kind, "id": id_, "last_seq": row.last_seq, "at_seq": seq,
                            "state": row.state})
            else:
                print(f"{kind}/{id_} as of seq {seq}", flush=True)
                console().print(render.entity_view(row))
            return
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

    run(main, folds=at is not None)


async def _state_at(opts: Options, kind: str, id_: str,
                    point: int | datetime) -> tuple[EntityRow, int]:
    """The entity folded from its own commands up to a point of the log, and that seq:
    from a snapshot of the current code at or before the point, if there is one."""
    from events.subjects import CMD_STREAM
    from orchestrator.cli.connect import open_nats, open_pg
    from orchestrator.history import as_stored
    from orchestrator.logreader import LogClient, fed, log_info, read_entity, resumed_fold
    from orchestrator.queries import EntityRow

    conn = await open_pg(opts.pg_dsn())
    try:
        nc = await open_nats(opts.nats_url(), "orch-get-at", client=LogClient)
        try:
            js = nc.jetstream()
            log = await log_info(js)
            if isinstance(point, datetime):
                from events.bus import last_seq_at  # only here: it imports structlog

                not_in_future(point, "--at")
                seq = await last_seq_at(js, CMD_STREAM, point)
                if seq < log.first_seq:
                    raise CliError(f"--at: {point.isoformat()} is before the log's first"
                                   " command", EXIT_USAGE)
            else:
                seq = point
                if seq > log.last_seq:
                    raise CliError(f"--at: seq {seq} is past the log's end (seq"
                                   f" {log.last_seq})", EXIT_USAGE)
            fold = await resumed_fold(conn, kind, id_, log.partitions, seq, states=False)
            async for _ in fed(js, fold, seq):  # only the end matters
                pass
            state = as_stored(fold.states.get((kind, id_)))
            first = [] if state is not None else await read_entity(js, kind, id_, limit=1)
        finally:
            await nc.close()
    finally:
        await conn.close()
    if state is None and not first:
        raise CliError(f"no {kind}/{id_}: nothing in its history", EXIT_FAILURE)
    if state is None:
        raise CliError(f"{kind}/{id_} did not exist yet at seq {seq}: its first command is"
                       f" seq {first[0].seq}", EXIT_FAILURE)
    return EntityRow(kind, id_, state, fold.last_seq), seq


@app.command()
def hosts(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One object per line")] = False,
) -> None:
    """Hosts with their condition, instance count and last heartbeat."""
    from events.heartbeats import read_heartbeats
    from orchestrator import queries, render
    from orchestrator.cli.connect import open_nats, query

    opts: Options = ctx.obj

    async def main() -> None:
        rows = await query(opts.pg_dsn(), queries.hosts)
        nc = await open_nats(opts.nats_url(), "orch-hosts")
        try:
            beats = await read_heartbeats(nc.jetstream())
        finally:
            await nc.close()
        now_ms = int(time.time() * 1000)

        def as_doc(row: HostRow) -> dict[str, Any]:
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
    from orchestrator import queries, render
    from orchestrator.cli.connect import query

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
    from orchestrator import queries, render
    from orchestrator.cli.connect import query

    opts: Options = ctx.obj

    async def main() -> None:
        rows = list(reversed(await query(
            opts.pg_dsn(), lambda conn: queries.dead_letters(conn, limit))))
        list_rows(rows, as_json, dataclasses.asdict, render.dead_letters_table,
                  "no dead letters")

    run(main)
