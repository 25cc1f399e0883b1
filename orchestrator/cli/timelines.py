"""Verbs over the log, entity by entity or across them: `orch tail`, `orch trace`,
`orch log`."""

from datetime import datetime
from typing import Annotated

import typer

from orchestrator.cli.app import Options, app
from orchestrator.cli.output import EXIT_FAILURE, CliError, Lines, console, print_json, run
from orchestrator.cli.parse import not_in_future, parse_kind, parse_point, parse_target


@app.command()
def tail(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(metavar="KIND/ID")],
    follow: Annotated[bool, typer.Option("--follow", "-f",
                                         help="Keep printing new outcomes")] = False,
    diff: Annotated[bool, typer.Option(
        "--diff", help="Under each command, the fields of the state it changed")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One Outcome object per line")] = False,
) -> None:
    """The timeline of an entity: every command folded, accepted or rejected, and why."""
    import asyncio

    import asyncpg

    from orchestrator import queries
    from orchestrator.cli.connect import open_nats, open_pg, stop_event, until_stopped
    from orchestrator.logview import change_json, change_line, change_plain, outcome_plain
    from schemas.outcomes import Outcome

    if follow or diff:  # only these read NATS: a plain timeline is PostgreSQL's alone
        from events.subjects import event_subject
        from orchestrator.cli.streams import Changes, follow_outcomes
        from orchestrator.logreader import LogClient, log_info
    opts: Options = ctx.obj
    lines = Lines(follow)
    if lines.terminal:
        from orchestrator import render

    async def main() -> None:
        stop = stop_event() if follow else None
        kind, id_ = parse_target(target, need_id=True)
        assert id_ is not None
        conn = await open_pg(opts.pg_dsn())
        nc = await open_nats(opts.nats_url(), "orch-tail", follow=True,
                             client=LogClient if diff else None) if follow or diff else None
        try:
            changes = None
            if diff and nc is not None:
                changes = Changes(nc.jetstream(), kind, id_,
                                  (await log_info(nc.jetstream())).partitions)
            try:
                # The entity's commands are read from CMD while PostgreSQL answers.
                history, _ = await asyncio.gather(queries.timeline(conn, kind, id_),
                                                  changes.read() if changes else asyncio.sleep(0))
            except asyncpg.UndefinedTableError:
                if stop is None:
                    raise
                history = []  # no replica has run yet: everything will come from the stream
            finally:
                await conn.close()
            if not history and stop is None:
                raise CliError(f"no {kind}/{id_}: nothing in its timeline", EXIT_FAILURE)

            async def emit(outcome: Outcome) -> None:
                found = None if changes is None else await changes.of(outcome)
                if as_json:
                    if found is None:
                        lines.json(outcome)
                    else:  # the outcome's own encoding, with its changes added
                        lines.plain(f"{lines.encode(outcome)[:-1]},\"changes\":"
                                    f"{lines.encode([change_json(c) for c in found])}}}")
                    return
                if lines.terminal:
                    lines.text(render.outcome_line(outcome))
                    for change in found or ():
                        lines.text(change_line(change))
                    return
                lines.plain(outcome_plain(outcome))
                for change in found or ():
                    lines.plain(change_plain(change))

            for outcome in history:
                await emit(outcome)
            if stop is None or nc is None:
                return
            await until_stopped(
                follow_outcomes(nc, event_subject(kind, id_),
                                history[-1].seq if history else 0, emit), stop)
        finally:
            if nc is not None:
                await nc.close()

    run(main, folds=diff)


@app.command()
def trace(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="SEQ|CMD_ID",
                                       help="The command: its CMD seq, or its cmd id")],
    as_json: Annotated[bool, typer.Option("--json", help="The tree as one JSON object")] = False,
) -> None:
    """Everything one command caused: follow-ups, theirs in turn, jobs and agents' reports."""
    from orchestrator.cli.causes import find_command, reader
    from orchestrator.logview import trace_tree
    from orchestrator.trace import to_json as trace_json

    opts: Options = ctx.obj

    async def main() -> None:
        async with reader(opts.nats_url(), opts.pg_dsn(), "orch-trace") as r:
            root = await find_command(r, ref)
            tree = await r.tracer().tree(root)
        if as_json:
            print_json(trace_json(tree, root.at))
        else:
            console().print(trace_tree(tree))

    run(main, folds=True)


# Outcomes a follower remembers having printed: a relay may publish one again.
_SEEN = 100_000


@app.command("log")
def log_(
    ctx: typer.Context,
    kind: Annotated[str | None, typer.Option(help="Only commands on entities of this kind")]
    = None,
    source: Annotated[str | None, typer.Option(
        help="Only commands from this source: user, admin, system or a host")] = None,
    type_: Annotated[str | None, typer.Option("--type", help="Only this command type")]
    = None,
    rejected: Annotated[bool, typer.Option("--rejected", help="Only rejected commands")]
    = False,
    since: Annotated[str | None, typer.Option(
        "--since", metavar="SEQ|TIME", help="From this CMD seq, or from the first command"
        " stored after this ISO-8601 time (UTC unless it names a zone)")] = None,
    limit: Annotated[int | None, typer.Option(
        min=0, help="At most the newest N [default: 100, all with --since; 0: all]")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f",
                                         help="Keep printing new outcomes")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One Outcome object per line")] = False,
) -> None:
    """The whole log across entities, newest last: every command folded, and its outcome."""
    from orchestrator import queries
    from orchestrator.cli.connect import open_nats, query, stop_event, until_stopped
    from orchestrator.logview import log_line, log_plain
    from schemas.outcomes import Outcome

    opts: Options = ctx.obj
    lines = Lines(follow)

    async def main() -> None:
        stop = stop_event() if follow else None
        where = queries.LogFilter(kind=None if kind is None else parse_kind(kind),
                                  source=source, type=type_, rejected=rejected)
        point = None if since is None else parse_point(since, "--since")
        if isinstance(point, datetime):
            not_in_future(point, "--since")
        # NATS only to follow, or to find the seq of a time: the log itself is PostgreSQL's.
        nc = await open_nats(opts.nats_url(), "orch-log", follow=follow) if (
            follow or isinstance(point, datetime)) else None
        try:
            js = None if nc is None else nc.jetstream()
            evt_from = 0
            if js is not None and follow:
                from events.subjects import EVT_STREAM

                # Where following starts: before the history is read, so nothing falls between.
                evt_from = (await js.stream_info(EVT_STREAM)).state.last_seq + 1
            if js is not None and isinstance(point, datetime):
                from events.bus import last_seq_at
                from events.subjects import CMD_STREAM

                after = await last_seq_at(js, CMD_STREAM, point)
            else:
                after = 0 if point is None else int(point) - 1
            shown = limit if limit is not None else (100 if point is None else 0)
            history = await query(opts.pg_dsn(),
                                  lambda conn: queries.log(conn, where, after, shown or None))
            seen: dict[int, None] = {}

            async def emit(o: Outcome) -> None:
                if o.seq in seen or o.seq <= after or not where.matches(o):
                    return
                seen[o.seq] = None
                if len(seen) > _SEEN:
                    del seen[next(iter(seen))]
                if as_json:
                    lines.json(o)
                elif lines.terminal:
                    lines.text(log_line(o))
                else:
                    lines.plain(log_plain(o))

            for o in history:
                await emit(o)
            if stop is not None and js is not None:
                from orchestrator.cli.streams import follow_events

                subject = "evt.>" if where.kind is None else f"evt.{where.kind}.>"
                await until_stopped(follow_events(js, subject, evt_from, emit), stop)
        finally:
            if nc is not None:
                await nc.close()

    run(main)
