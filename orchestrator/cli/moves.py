"""Moving instances between hosts: `orch migrate` (live), `orch drain` (a host emptied by
migrations, then in maintenance), `orch evacuate` (a down host's instances rebuilt
elsewhere); with --wait each follows what the log records."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from orchestrator.cli.app import Options, app
from orchestrator.cli.output import EXIT_FAILURE, EXIT_OK, EXIT_TIMEOUT, CliError, run

if TYPE_CHECKING:
    import asyncpg

    from orchestrator.cli.output import Lines
    from schemas.outcomes import Outcome

POLL_S = 0.1
ENDS = ("MigrationEnded", "RolledBack")  # the events that end a migration


async def _publish(opts: Options, doc: dict[str, object]) -> int:
    """Publish one command from the admin; its CMD seq."""
    from events.bus import Publisher
    from events.topology import ensure_topology
    from orchestrator.cli.compose import build
    from orchestrator.cli.connect import open_nats

    source, cmd = build(doc, "admin")
    nc = await open_nats(opts.nats_url(), "orch-moves")
    try:
        js = nc.jetstream()
        await ensure_topology(js)
        return (await Publisher(js).publish(source, cmd)).seq
    finally:
        await nc.close()


def _show(lines: Lines, outcome: Outcome, as_json: bool) -> None:
    from orchestrator import render

    if as_json:
        lines.json(outcome)
    else:
        lines.text(render.outcome_line(outcome))


def migration_result(seq: int, timeline: list[Outcome]) -> tuple[int, str] | None:
    """How the migration asked at ``seq`` ended, from the instance's timeline since: (exit
    code, what to say), or None while it runs."""
    for o in timeline:
        if o.seq == seq and not o.accepted:
            return EXIT_FAILURE, f"rejected: {o.reason}"
        if o.seq > seq and o.accepted and any(e in ENDS for e in o.events):
            said = o.reason or ("deleted" if "Deleted" in o.events else "ended")
            return (EXIT_OK if said.startswith("moved") else EXIT_FAILURE), said
    return None


@app.command()
def migrate(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(metavar="instance/ID")],
    to: Annotated[str | None, typer.Option(
        "--to", metavar="HOST", help="The destination [default: the scheduler's choice]")]
    = None,
    deadline: Annotated[float, typer.Option(
        min=1, max=3600, metavar="SECONDS", help="Abort (and roll back) after this long")]
    = 120.0,
    wait: Annotated[bool, typer.Option(
        "--wait", help="Print its phases as they happen; exit 1 unless it moved")] = False,
    timeout: Annotated[float | None, typer.Option(
        min=0, metavar="SECONDS", help="Give up waiting after this long (exit 124)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One Outcome object per line")]
    = False,
) -> None:
    """Move a running instance live to another hypervisor (a stopped one moves cold)."""
    from orchestrator.cli.output import Lines
    from orchestrator.cli.parse import parse_target

    opts: Options = ctx.obj
    lines = Lines(wait)

    async def main() -> int:
        kind, id_ = parse_target(target, need_id=True)
        if kind != "instance" or id_ is None:
            raise CliError(f"only instances migrate, not {target}")
        doc: dict[str, object] = {"type": "MigrateInstance", "id": id_,
                                  "deadline_ms": int(deadline * 1000)}
        if to is not None:
            doc["to"] = to
        seq = await _publish(opts, doc)
        if not wait:
            if not as_json:
                lines.plain(f"MigrateInstance instance/{id_} published (seq {seq})")
            return EXIT_OK
        code, said = await _follow(opts, id_, seq, timeout, lines, as_json)
        if not as_json and code != EXIT_TIMEOUT:
            lines.plain(f"instance/{id_}: {said}")
        if code != EXIT_OK:
            raise CliError(said, code)
        return code

    run(main)


async def _follow(opts: Options, id_: str, seq: int, timeout: float | None, lines: Lines,
                  as_json: bool) -> tuple[int, str]:
    """Print the instance's timeline from ``seq`` on as it grows, until the migration ends."""
    import asyncio
    import time

    import asyncpg

    from orchestrator import queries
    from orchestrator.cli.connect import open_pg

    until = None if timeout is None else time.monotonic() + timeout
    conn = await open_pg(opts.pg_dsn())
    seen: list[Outcome] = []
    try:
        while True:
            try:
                new = await queries.timeline(conn, "instance", id_,
                                             seen[-1].seq if seen else seq - 1)
            except asyncpg.UndefinedTableError:
                new = []  # no replica has run yet
            for outcome in new:
                _show(lines, outcome, as_json)
            seen += new
            if (result := migration_result(seq, seen)) is not None:
                return result
            if until is not None and time.monotonic() >= until:
                phase = await _phase(conn, id_)
                return EXIT_TIMEOUT, f"timed out after {timeout:g} s: {phase}"
            await asyncio.sleep(POLL_S)
    finally:
        await conn.close()


async def _phase(conn: asyncpg.Connection, id_: str) -> str:
    from orchestrator import queries

    row = await queries.get_entity(conn, "instance", id_)
    m = (row.state or {}).get("migration") if row else None
    if not m:
        return "not migrating"
    return f"{m['phase']} to {m.get('dest') or '?'}" + (
        f" ({m['reason']})" if m.get("reason") else "")


@app.command()
def drain(
    ctx: typer.Context,
    host: Annotated[str, typer.Argument(metavar="HOST")],
    wait: Annotated[bool, typer.Option(
        "--wait", help="Follow the migrations until the host is in maintenance")] = False,
    timeout: Annotated[float | None, typer.Option(
        min=0, metavar="SECONDS", help="Give up waiting after this long (exit 124)")] = None,
) -> None:
    """Migrate every instance off HOST (within the migration limit); it then goes into
    maintenance by itself."""
    from orchestrator.cli.output import Lines

    opts: Options = ctx.obj
    lines = Lines(wait)

    async def main() -> int:
        from orchestrator import queries
        from orchestrator.cli.connect import query

        found = await query(opts.pg_dsn(), lambda conn: queries.get_entity(conn, "host", host))
        if found is None:
            raise CliError(f"no host {host}")
        seq = await _publish(opts, {"type": "SetHostCondition", "id": host,
                                    "condition": "draining"})
        lines.plain(f"SetHostCondition host/{host} draining published (seq {seq})")
        if not wait:
            return EXIT_OK
        outcome = await _outcome(opts, seq)  # folded: from here on the host says draining
        if not outcome.accepted:
            raise CliError(f"rejected: {outcome.reason}")
        return await _drained(opts, host, timeout, lines)

    run(main)


async def _drained(opts: Options, host: str, timeout: float | None, lines: Lines) -> int:
    """Say how the drain goes each time it changes, until the host is in maintenance."""
    import asyncio
    import time

    from orchestrator import queries
    from orchestrator.cli.connect import open_pg

    until = None if timeout is None else time.monotonic() + timeout
    conn = await open_pg(opts.pg_dsn())
    said = ""
    try:
        while True:
            row = next((r for r in await queries.hosts(conn) if r.id == host), None)
            assert row is not None
            now = (f"{host}: {row.condition}, {row.instances} instance(s) left,"
                   f" {row.migrating_out} migrating out, {row.queued} queued")
            if now != said:
                lines.plain(now)
                said = now
            if row.condition == "maintenance":
                return EXIT_OK
            if row.condition != "draining":
                raise CliError(f"{host} is {row.condition}: the drain was called off")
            if until is not None and time.monotonic() >= until:
                raise CliError(f"timed out after {timeout:g} s: {now}", EXIT_TIMEOUT)
            await asyncio.sleep(POLL_S * 5)
    finally:
        await conn.close()


@app.command()
def evacuate(
    ctx: typer.Context,
    host: Annotated[str, typer.Argument(metavar="HOST")],
) -> None:
    """Rebuild every instance of HOST, which must be down, on other hosts (cold); its agent
    destroys the stale copies when it returns."""
    from orchestrator.cli.output import console

    opts: Options = ctx.obj

    async def main() -> int:
        from orchestrator import render

        seq = await _publish(opts, {"type": "EvacuateHost", "id": host})
        outcome = await _outcome(opts, seq)
        console().print(render.outcome_line(outcome))
        if not outcome.accepted:
            raise CliError(f"rejected: {outcome.reason}")
        return EXIT_OK

    run(main)


async def _outcome(opts: Options, seq: int, timeout_s: float = 30.0) -> Outcome:
    """The outcome of the command at ``seq``, once a replica has folded it."""
    import asyncio
    import time

    from orchestrator import queries
    from orchestrator.cli.connect import open_pg

    until = time.monotonic() + timeout_s
    conn = await open_pg(opts.pg_dsn())
    try:
        while (found := await queries.outcome_at(conn, seq)) is None:
            if time.monotonic() >= until:
                raise CliError(f"seq {seq} not folded after {timeout_s:g} s: is a replica"
                               " running?", EXIT_TIMEOUT)
            await asyncio.sleep(POLL_S)
        return found
    finally:
        await conn.close()
