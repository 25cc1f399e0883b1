"""Verbs over the log, entity by entity or across them: `orch tail`, `orch trace`."""

from collections.abc import Callable
from typing import Annotated

import asyncpg
import msgspec
import typer
from nats.aio.client import Client

from events.bus import read_stream
from events.subjects import EVT_STREAM, event_subject
from orchestrator import queries, render
from orchestrator.cli.app import Options, app
from orchestrator.cli.causes import find_command, reader
from orchestrator.cli.connect import open_nats, open_pg, stop_event, until_stopped
from orchestrator.cli.output import EXIT_FAILURE, CliError, console, print_json, run
from orchestrator.cli.parse import parse_target
from orchestrator.logview import trace_tree
from orchestrator.trace import to_json as trace_json
from schemas.outcomes import Outcome


@app.command()
def tail(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(metavar="KIND/ID")],
    follow: Annotated[bool, typer.Option("--follow", "-f",
                                         help="Keep printing new outcomes")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One Outcome object per line")] = False,
) -> None:
    """The timeline of an entity: every command folded, accepted or rejected, and why."""
    opts: Options = ctx.obj
    out = console()

    def emit(outcome: Outcome) -> None:
        if as_json:
            print_json(outcome)
        else:
            out.print(render.outcome_line(outcome), soft_wrap=True)

    async def main() -> None:
        stop = stop_event() if follow else None
        kind, id_ = parse_target(target, need_id=True)
        assert id_ is not None
        conn = await open_pg(opts.pg_dsn())
        try:
            history = await queries.timeline(conn, kind, id_)
        except asyncpg.UndefinedTableError:
            if stop is None:
                raise
            history = []  # no replica has run yet: everything will come from the stream
        finally:
            await conn.close()
        if not history and stop is None:
            raise CliError(f"no {kind}/{id_}: nothing in its timeline", EXIT_FAILURE)
        for outcome in history:
            emit(outcome)
        if stop is None:
            return
        nc = await open_nats(opts.nats_url(), "orch-tail", follow=True)
        try:
            await until_stopped(
                follow_outcomes(nc, event_subject(kind, id_),
                                history[-1].seq if history else 0, emit), stop)
        finally:
            await nc.close()

    run(main)


async def follow_outcomes(nc: Client, subject: str, after_seq: int,
                          emit: Callable[[Outcome], None]) -> None:
    """Outcomes published on EVT after ``after_seq`` (a relay may repeat one: skip it)."""
    last = after_seq
    async for msgs in read_stream(nc.jetstream(), EVT_STREAM, subject, follow=True):
        for msg in msgs:
            try:
                outcome = queries.decode_outcome(msg.data)
            except msgspec.DecodeError:
                continue  # not an outcome: nothing a timeline can show
            if outcome.seq > last:
                last = outcome.seq
                emit(outcome)



@app.command()
def trace(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="SEQ|CMD_ID",
                                       help="The command: its CMD seq, or its cmd id")],
    as_json: Annotated[bool, typer.Option("--json", help="The tree as one JSON object")] = False,
) -> None:
    """Everything one command caused: follow-ups, theirs in turn, jobs and agents' reports."""
    opts: Options = ctx.obj

    async def main() -> None:
        async with reader(opts.nats_url(), opts.pg_dsn(), "orch-trace") as r:
            root = await find_command(r, ref)
            tree = await r.tracer().tree(root)
        if as_json:
            print_json(trace_json(tree, root.at))
        else:
            console().print(trace_tree(tree))

    run(main)
