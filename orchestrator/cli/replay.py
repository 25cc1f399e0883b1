"""`orch replay`: fold the CMD log again into a scratch schema, to a point, from a snapshot
or to verify; `orch snapshot` and `orch snapshots`: the snapshots replays start from."""

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Annotated

import typer

from orchestrator.cli.app import Options, app
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

# Same rule as orchestrator.replay; checked here so a bad name is a usage error (exit 2).
_SCRATCH_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@contextlib.contextmanager
def shown(enabled: bool, total: int) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr, on a TTY only: commands folded, per second, and an ETA.
    (The total counts every command up to the end, some of which no partition reads.)"""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    err = Console(stderr=True)
    if not enabled or not err.is_terminal:
        yield None
        return
    columns = (TextColumn("replay"), BarColumn(), MofNCompleteColumn(),
               TextColumn("[progress.data.speed]{task.fields[rate]}"),
               TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("replay", total=total, rate="")
        started = time.perf_counter()

        def update(done: int) -> None:
            elapsed = time.perf_counter() - started
            bar.update(task, completed=min(done, total),
                       rate=f"{done / elapsed:,.0f} commands/s" if elapsed > 0 else "")

        yield update


@app.command()
def replay(
    ctx: typer.Context,
    to: Annotated[str | None, typer.Option(
        "--to", metavar="SEQ|TIME", help="Stop after this CMD sequence, or after the last"
        " command stored at or before this ISO-8601 time (UTC unless it names a zone)",
    )] = None,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Compare with the live projection, and each snapshot with the fold"
        " at its checkpoints; exit 1 if any differ")] = False,
    from_snapshot: Annotated[bool, typer.Option(
        "--from-snapshot", help="Start from the newest snapshot of this code (before --to),"
        " folding only what came after it")] = False,
    schema: Annotated[str, typer.Option(help="Scratch schema, dropped and recreated")] = "replay",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Fold the whole CMD log again into a scratch schema, and optionally verify it."""
    from events.bus import last_seq_at
    from events.subjects import CMD_STREAM
    from events.topology import ensure_topology
    from orchestrator import render
    from orchestrator.cli.connect import open_nats, open_pg
    from orchestrator.logview import verify_json, verify_lines
    from orchestrator.replay import replay as run_replay

    opts: Options = ctx.obj

    async def main() -> int:
        if not _SCRATCH_SCHEMA_RE.match(schema) or schema == "public":
            raise CliError(f"invalid scratch schema name {schema!r}", EXIT_USAGE)
        if verify and (to is not None or from_snapshot):
            raise CliError("--verify folds the whole log to compare with the live projection:"
                           " not with --to or --from-snapshot", EXIT_USAGE)
        target = None if to is None else parse_point(to, "--to")
        nc = await open_nats(opts.nats_url(), "orch-replay")
        try:
            js = nc.jetstream()
            topology = await ensure_topology(js)
            to_seq = (await last_seq_at(js, CMD_STREAM, target)
                      if isinstance(target, datetime) else target)
            last = (await js.stream_info(CMD_STREAM)).state.last_seq
        finally:
            await nc.close()
        await (await open_pg(opts.pg_dsn())).close()  # a clear error if it is unreachable
        with shown(not as_json, to_seq or last) as progress:
            try:
                report = await run_replay(opts.nats_url(), opts.pg_dsn(), topology.partitions,
                                          schema=schema, to_seq=to_seq, verify=verify,
                                          from_snapshot=from_snapshot, progress=progress)
            except ValueError as exc:  # no snapshot to start from
                raise CliError(str(exc), EXIT_FAILURE) from None
        if as_json:
            doc = render.replay_json(report, verify)
            if verify:
                doc["differences"] = verify_json(report.differences)
            print_json(doc)
        else:
            out = console()
            for line in render.replay_lines(report, verify=False):
                out.print(line)
            for line in verify_lines(report.differences) if verify else ():
                out.print(line)
            for line in render.snapshot_check_lines(report.snapshots) if verify else ():
                out.print(line)
        unreproduced = any(report.snapshots.values())
        return EXIT_FAILURE if verify and (report.differs or unreproduced) else EXIT_OK

    run(main)


@app.command()
def snapshot(
    ctx: typer.Context,
    keep: Annotated[int, typer.Option(min=1, help="Snapshots kept, the newest")] = 2,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Snapshot the projection now (the leader also does, on `orch orchestrator`'s schedule)."""
    from orchestrator import render, snapshots
    from orchestrator.cli.connect import open_pg

    opts: Options = ctx.obj

    async def main() -> int:
        conn = await open_pg(opts.pg_dsn())
        try:
            taken = await snapshots.take(conn, keep)
        finally:
            await conn.close()
        if as_json:
            print_json(render.snapshot_json(taken))
        else:
            console().print(render.snapshot_table([taken]))
        return EXIT_OK

    run(main)


@app.command("snapshots")
def list_snapshots(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The snapshots a replay can start from, oldest first."""
    from orchestrator import render, snapshots
    from orchestrator.cli.connect import query

    opts: Options = ctx.obj

    async def main() -> int:
        taken = await query(opts.pg_dsn(), snapshots.listed)
        if as_json:
            print_json([render.snapshot_json(s) for s in taken])
        else:
            console().print(render.snapshot_table(taken))
        return EXIT_OK

    run(main)
