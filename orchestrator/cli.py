"""`orch`: the command line of the orchestrator.

Human output by default (rich tables, colours only on a TTY), ``--json`` for scripts.
Exit codes: 0 ok, 1 not found / verify failed / runtime failure, 2 invalid input or usage.
Errors are one line on stderr, ``error: ...``; set ORCH_DEBUG=1 for the traceback instead.
"""

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import asyncpg
import msgspec
import nats
import nats.errors
import prometheus_client
import typer
import uvloop
from nats.aio.client import Client
from rich.console import Console

from events import logs
from events.bus import Publisher, last_seq_at, read_stream, same_as_stored, server_urls
from events.heartbeats import read_heartbeats
from events.subjects import CMD_STREAM, EVT_STREAM, event_subject
from events.topology import ensure_topology
from orchestrator import demo as demo_mod
from orchestrator import queries, render
from orchestrator.embedded import Stack, read_stack_file
from orchestrator.fold import source_class
from orchestrator.reconciler import ReconcilerConfig
from orchestrator.replay import replay as run_replay
from orchestrator.replica import Replica, ReplicaConfig
from orchestrator.settings import NoStack, resolve, stack_dir
from orchestrator.store import connect_pg
from schemas.codec import CommandError, command_from_dict, encode, loads
from schemas.commands import Command
from schemas.export import json_schema
from schemas.ids import ID_PATTERN, KINDS, is_valid_id
from schemas.outcomes import Outcome

T = TypeVar("T")
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
NATS_CONNECT_TIMEOUT_S = 5.0
PG_CONNECT_TIMEOUT_S = 10.0
# A replica gets this long to stop its workers after SIGTERM before it is cancelled.
REPLICA_STOP_GRACE_S = 8.0
# `orch up` restarts a server that exits, unless they keep exiting: then it gives up.
UP_MAX_RESTARTS, UP_RESTART_WINDOW_S = 3, 60.0
# Same rule as orchestrator.replay; checked here so a bad name is a usage error (exit 2).
_SCRATCH_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_KIND_ALIASES = {f"{k}s": k for k in KINDS}

app = typer.Typer(
    name="orch",
    help="Event-sourced cloud orchestrator: publish commands, inspect state and timelines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click errors: a usage error stays short, without a box drawn around it.
    rich_markup_mode=None,
)


class CliError(Exception):
    """Reported as one `error: ...` line, then the process exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Options:
    nats: str | None
    pg: str | None

    def nats_url(self) -> str:
        # Only what this verb needs: publishing must not require a database setting.
        return self.nats or os.environ.get("ORCH_NATS_URL") or resolve(self.nats, self.pg).nats_url

    def pg_dsn(self) -> str:
        return self.pg or os.environ.get("ORCH_PG_DSN") or resolve(self.nats, self.pg).pg_dsn


def _console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # Piped: no colours (rich decides), and no 80-column wrapping of long lines either.
        console = Console(highlight=False, width=240)
    return console


def _fail(message: str, code: int) -> NoReturn:
    line = " ".join(message.split())  # one line, whatever the exception text held
    print(f"error: {line}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def _redact(dsn: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", dsn)


def _run(main: Callable[[], Coroutine[Any, Any, int | None]]) -> None:
    """Run an async verb; map every expected failure to one error line and an exit code."""
    try:
        code = uvloop.run(main())
    except CliError as exc:
        _fail(str(exc), exc.code)
    except CommandError as exc:
        _fail(str(exc), EXIT_USAGE)
    except NoStack as exc:
        _fail(str(exc), EXIT_FAILURE)
    except asyncpg.UndefinedTableError:
        _fail("no projection in this database yet: start `orch orchestrator` first", EXIT_FAILURE)
    except Exception as exc:  # connection lost, server refusal, a bug: still one line
        if os.environ.get("ORCH_DEBUG"):
            raise
        _fail(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, EXIT_FAILURE)
    raise typer.Exit(code or EXIT_OK)


async def _open_nats(url: str, name: str, follow: bool = False) -> Client:
    """Connect with a deadline: events.bus.connect retries forever, right for daemons only.

    A one-shot verb gives up after three refused attempts (about a second); a follower
    keeps reconnecting once connected, as it may outlive a server restart.
    """
    errors: list[Exception] = []

    async def remember(exc: Exception) -> None:  # instead of nats-py's logged traceback
        errors.append(exc)

    try:
        return await asyncio.wait_for(
            nats.connect(server_urls(url), name=name, connect_timeout=2, reconnect_time_wait=0.5,
                         # nats-py reads 0 as "forever": 2 is the smallest finite bound.
                         max_reconnect_attempts=-1 if follow else 2, error_cb=remember),
            NATS_CONNECT_TIMEOUT_S,
        )
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        reason = errors[-1] if errors else exc
        raise CliError(f"cannot connect to NATS at {url}: {reason or 'timed out'}") from None


async def _open_pg(dsn: str) -> asyncpg.Connection:
    try:
        return await asyncio.wait_for(connect_pg(dsn), PG_CONNECT_TIMEOUT_S)
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise CliError(
            f"cannot connect to PostgreSQL at {_redact(dsn)}: {exc or 'timed out'}"
        ) from None


async def _query(dsn: str, query: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """One read on a connection of its own."""
    conn = await _open_pg(dsn)
    try:
        return await query(conn)
    finally:
        await conn.close()


def _list(rows: list[T], as_json: bool, as_doc: Callable[[T], Any],
          table: Callable[[list[T]], Any], empty: str) -> None:
    """A listing verb's output: one JSON object per row, or a table, or one line if empty."""
    if as_json:
        for row in rows:
            _print_json(as_doc(row))
    elif rows:
        _console().print(table(rows))
    else:
        print(empty, flush=True)


def _stop_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM: long-running verbs stop cleanly and exit 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _parse_target(target: str, need_id: bool) -> tuple[str, str | None]:
    kind, _, id_ = target.partition("/")
    kind = _KIND_ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise CliError(f"unknown kind {kind!r}: one of {', '.join(KINDS)}", EXIT_USAGE)
    if need_id and not id_:
        raise CliError(f"expected KIND/ID, got {target!r}", EXIT_USAGE)
    if id_ and not is_valid_id(id_):
        raise CliError(f"invalid id {id_!r}: must match {ID_PATTERN}", EXIT_USAGE)
    return kind, id_ or None


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, separators=(",", ":")), flush=True)


# ---- global options ---------------------------------------------------------------


@app.callback()
def main(
    ctx: typer.Context,
    nats_url: Annotated[str | None, typer.Option(
        "--nats", metavar="URL", help="NATS URL [env ORCH_NATS_URL, else the `orch up` stack]",
    )] = None,
    pg_dsn: Annotated[str | None, typer.Option(
        "--pg", metavar="DSN", help="PostgreSQL DSN [env ORCH_PG_DSN, else the `orch up` stack]",
    )] = None,
) -> None:
    ctx.obj = Options(nats_url, pg_dsn)
    # Verbs that run daemons log JSON at their own level; the others keep stdout for their
    # output and say only what goes wrong (a lost connection, say) on stderr.
    logs.configure("warning", json=False)


# ---- orch up ------------------------------------------------------------------------


async def _create_topology(url: str, partitions: int, replicas: int) -> None:
    nc = await _open_nats(url, "orch-up")
    try:
        await ensure_topology(nc.jetstream(), partitions, replicas)
    finally:
        await nc.close()


@app.command()
def up(
    directory: Annotated[Path | None, typer.Option(
        "--dir", help="Where the stack keeps its data [default: $ORCH_HOME or .orch]",
    )] = None,
    sync_always: Annotated[bool, typer.Option(
        "--sync-always", help="fsync every JetStream write: acked commands survive a power"
        " loss, at about 3x the latency (bench/converge.py --sync-always)")] = False,
    servers: Annotated[int, typer.Option(
        help="nats-servers: 3 makes a cluster whose streams are replicated three times")] = 1,
    partitions: Annotated[int, typer.Option(
        min=1, help="Partitions of the CMD stream a cluster is created with")] = 8,
) -> None:
    """Run the embedded development stack (nats-server + PostgreSQL) until Ctrl-C."""
    if servers not in (1, 3):
        _fail("--servers: 1, or 3 for a cluster", EXIT_USAGE)
    root = directory or stack_dir()
    live = read_stack_file(root)
    if live is not None:
        _fail(f"a stack is already running in {root} (nats {live.nats_url})", EXIT_FAILURE)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    # Set before starting: a SIGTERM during start-up must still stop the servers.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    def replicate(nats_url: str) -> None:
        # Before any other process can find the cluster: none can create a stream first,
        # with one replica.
        uvloop.run(_create_topology(nats_url, partitions, replicas=servers))

    stack = Stack(root, sync_always, servers)
    try:
        try:
            info = stack.start(prepare=replicate if servers > 1 else None)
        except (RuntimeError, OSError, nats.errors.Error, CliError) as exc:
            # The first line says what failed; the server log it quotes stays in its file.
            _fail(f"the stack did not start: {exc}".splitlines()[0], EXIT_FAILURE)
        console = _console()
        console.print(f"nats        {info.nats_url}")
        console.print(f"postgresql  {info.pg_dsn}")
        console.print(f"stack file  {root / 'stack.json'} (other `orch` commands here use it)")
        console.print(f"export ORCH_NATS_URL={info.nats_url} ORCH_PG_DSN={info.pg_dsn}")
        console.print("running; Ctrl-C to stop", style="dim")
        restarts: list[float] = []
        while not stop.wait(0.5):
            try:
                revived = stack.revive()
            except (RuntimeError, OSError) as exc:
                _fail(f"a server of the stack exited and did not start again: {exc}"
                      .splitlines()[0], EXIT_FAILURE)
            for line in revived:
                print(f"warning: {line}", file=sys.stderr, flush=True)
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < UP_RESTART_WINDOW_S]
            restarts += [now] * len(revived)
            if len(restarts) > UP_MAX_RESTARTS:
                _fail(f"servers of the stack exited {len(restarts)} times in"
                      f" {UP_RESTART_WINDOW_S:.0f} s; see the logs in {root}", EXIT_FAILURE)
    finally:
        stack.stop()
    print("stack stopped", flush=True)


# ---- orch publish -------------------------------------------------------------------


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

    async def run() -> None:
        items = commands()  # all validated before anything is sent
        if not items:
            return
        nc = await _open_nats(opts.nats_url(), "orch-publish")
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
        console = _console()
        for n, ((_, cmd), result) in enumerate(zip(items, results, strict=True)):
            if json_out:
                _print_json({"seq": result.seq, "duplicate": result.duplicate,
                             "conflict": n in conflicts, "cmd_id": cmd.cmd_id,
                             "type": type(cmd).__name__, "kind": cmd.kind, "id": cmd.id})
            else:
                console.print(render.published_line(type(cmd).__name__, cmd.kind, cmd.id,
                                                    result.seq, result.duplicate))
        if conflicts:
            first = items[min(conflicts)][1]
            raise CliError(
                f"{len(conflicts)} command(s) not published: idempotency key {first.cmd_id!r}"
                f" of {first.kind}/{first.id} was already used for a different command"
                f" (seq {results[min(conflicts)].seq}); use a new --key")

    _run(run)


# ---- orch get -----------------------------------------------------------------------


@app.command()
def get(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(metavar="KIND[/ID]",
                                          help="e.g. instance/vm1, or instance to list")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON (one object per line)")] = False,
) -> None:
    """Show one entity's projected state, or list the entities of a kind."""
    opts: Options = ctx.obj

    async def run() -> None:
        kind, id_ = _parse_target(target, need_id=False)
        conn = await _open_pg(opts.pg_dsn())
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
                _print_json({"kind": row.kind, "id": row.id, "last_seq": row.last_seq,
                             "state": row.state})
        elif id_ is not None:
            _console().print(render.entity_view(rows[0]))
        elif rows:
            _console().print(render.entity_table(kind, rows))
        else:
            print(f"no {kind} entities", flush=True)

    _run(run)


# ---- orch tail ----------------------------------------------------------------------


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
    console = _console()

    def emit(outcome: Outcome) -> None:
        if as_json:
            sys.stdout.write(encode(outcome).decode() + "\n")
            sys.stdout.flush()
        else:
            console.print(render.outcome_line(outcome), soft_wrap=True)

    async def run() -> None:
        stop = _stop_event() if follow else None
        kind, id_ = _parse_target(target, need_id=True)
        assert id_ is not None
        conn = await _open_pg(opts.pg_dsn())
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
        nc = await _open_nats(opts.nats_url(), "orch-tail", follow=True)
        try:
            follower = asyncio.create_task(_follow(
                nc, kind, id_, history[-1].seq if history else 0, emit))
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({follower, stopped}, return_when=asyncio.FIRST_COMPLETED)
            for task in (follower, stopped):
                task.cancel()
            await asyncio.gather(stopped, return_exceptions=True)
            with contextlib.suppress(asyncio.CancelledError):
                await follower
        finally:
            await nc.close()

    _run(run)


async def _follow(nc: Client, kind: str, id_: str, after_seq: int,
                  emit: Callable[[Outcome], None]) -> None:
    """Outcomes published on EVT after ``after_seq`` (a relay may repeat one: skip it)."""
    last = after_seq
    async for msgs in read_stream(nc.jetstream(), EVT_STREAM, event_subject(kind, id_),
                                  follow=True):
        for msg in msgs:
            try:
                outcome = queries.decode_outcome(msg.data)
            except msgspec.DecodeError:
                continue  # not an outcome: nothing a timeline can show
            if outcome.seq > last:
                last = outcome.seq
                emit(outcome)


# ---- orch replay --------------------------------------------------------------------


def _replay_target(text: str) -> int | datetime:
    """``--to``: a stream sequence (digits) or an ISO-8601 time, UTC when it names no zone."""
    if text.isdigit():
        if int(text) < 1:
            raise CliError("--to: a sequence starts at 1", EXIT_USAGE)
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise CliError(f"--to: {text!r} is neither a sequence nor an ISO-8601 time"
                       " (2026-11-26T10:00:00Z)", EXIT_USAGE) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


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

    async def run() -> int:
        if not _SCRATCH_SCHEMA_RE.match(schema) or schema == "public":
            raise CliError(f"invalid scratch schema name {schema!r}", EXIT_USAGE)
        if verify and to is not None:
            raise CliError("--verify compares with the live projection: not with --to",
                           EXIT_USAGE)
        target = None if to is None else _replay_target(to)
        nc = await _open_nats(opts.nats_url(), "orch-replay")
        try:
            js = nc.jetstream()
            topology = await ensure_topology(js)
            to_seq = (await last_seq_at(js, CMD_STREAM, target)
                      if isinstance(target, datetime) else target)
        finally:
            await nc.close()
        await (await _open_pg(opts.pg_dsn())).close()  # a clear error if it is unreachable
        report = await run_replay(opts.nats_url(), opts.pg_dsn(), topology.partitions,
                                  schema=schema, to_seq=to_seq, verify=verify)
        if as_json:
            _print_json(render.replay_json(report, verify))
        else:
            console = _console()
            for line in render.replay_lines(report, verify):
                console.print(line)
        return EXIT_FAILURE if verify and report.differs else EXIT_OK

    _run(run)


# ---- orch schema --------------------------------------------------------------------


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
        _fail(f"cannot write {out}: {exc.strerror}", EXIT_FAILURE)


# ---- orch orchestrator --------------------------------------------------------------


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


@app.command()
def orchestrator(
    ctx: typer.Context,
    replica_id: Annotated[str | None, typer.Option(
        "--id", metavar="NAME", help="Replica id [default: HOSTNAME-PID]")] = None,
    partitions: Annotated[int | None, typer.Option(
        min=1, help="Partitions of a new CMD stream [default: the stream's, else 8]")] = None,
    batch: Annotated[int, typer.Option(min=1, help="Commands folded per transaction")] = 500,
    cached: Annotated[int, typer.Option(
        min=1, help="Entity states a partition keeps in memory between batches")] = 50_000,
    lease: Annotated[float, typer.Option(help="Partition lease, seconds")] = 5.0,
    tick: Annotated[float, typer.Option(help="Heartbeat and rebalance period, seconds")] = 1.0,
    down_after: Annotated[float, typer.Option(
        help="Heartbeat silence after which a host is down, seconds")] = 5.0,
    deadline: Annotated[float, typer.Option(
        help="Time an agent gets to apply a job before it is re-issued, seconds")] = 10.0,
    max_attempts: Annotated[int, typer.Option(
        min=0, help="Re-issues of a job before its entity is degraded and alerted")] = 5,
    metrics_port: Annotated[int | None, typer.Option(
        help="Serve Prometheus metrics on 127.0.0.1:PORT")] = None,
    log_level: Annotated[LogLevel, typer.Option(case_sensitive=False)] = LogLevel.info,
) -> None:
    """Run an orchestrator replica until SIGTERM or Ctrl-C (JSON logs on stderr)."""
    opts: Options = ctx.obj
    logs.configure(log_level.value, json=True)
    if metrics_port is not None:
        prometheus_client.start_http_server(metrics_port, addr="127.0.0.1")

    async def run() -> None:
        stop = _stop_event()
        extra = {"replica_id": replica_id} if replica_id else {}
        config = ReplicaConfig(
            opts.nats_url(), opts.pg_dsn(), partitions=partitions, lease_s=lease, tick_s=tick,
            batch=batch, cached=cached, down_after_s=down_after,
            reconcile=ReconcilerConfig(deadline_s=deadline, max_attempts=max_attempts),
            **extra)
        task = asyncio.create_task(Replica(config).run(stop))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not task.done():
            # Still connecting, say: it will never look at the stop event, so cancel it.
            done, _ = await asyncio.wait({task}, timeout=REPLICA_STOP_GRACE_S)
            if not done:
                task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    _run(run)


# ---- orch dead-letters --------------------------------------------------------------


@app.command("dead-letters")
def dead_letters(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, help="The newest N")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One object per line")] = False,
) -> None:
    """Messages the fold could not use (bad subject or body), oldest first."""
    opts: Options = ctx.obj

    async def run() -> None:
        rows = list(reversed(await _query(
            opts.pg_dsn(), lambda conn: queries.dead_letters(conn, limit))))
        _list(rows, as_json, dataclasses.asdict, render.dead_letters_table, "no dead letters")

    _run(run)


# ---- orch agent ----------------------------------------------------------------------


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "help_option_names": []})
def agent(ctx: typer.Context) -> None:
    """Run the agent of one host: `orch agent --host NAME [--libvirt URI] ...` (--help)."""
    # The agent is its own program (python -m agents): the orchestrator never imports it,
    # they meet only on the bus. It gets the bus this CLI would use.
    opts: Options = ctx.obj
    argv = [sys.executable, "-m", "agents", *ctx.args]
    if "--help" not in ctx.args:
        try:
            argv += ["--nats", opts.nats_url()]
        except NoStack as exc:
            _fail(str(exc), EXIT_FAILURE)
    os.execv(sys.executable, argv)


# ---- orch hosts, orch alerts ---------------------------------------------------------


@app.command()
def hosts(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One object per line")] = False,
) -> None:
    """Hosts with their condition, instance count and last heartbeat."""
    opts: Options = ctx.obj

    async def run() -> None:
        rows = await _query(opts.pg_dsn(), queries.hosts)
        nc = await _open_nats(opts.nats_url(), "orch-hosts")
        try:
            beats = await read_heartbeats(nc.jetstream())
        finally:
            await nc.close()
        now_ms = int(time.time() * 1000)

        def as_doc(row: queries.HostRow) -> dict[str, Any]:
            beat = beats.get(row.id)
            return {**dataclasses.asdict(row), "last_heartbeat_ms": beat.at_ms if beat else None}

        _list(rows, as_json, as_doc, lambda rs: render.hosts_table(rs, beats, now_ms),
              "no hosts")

    _run(run)


@app.command()
def alerts(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One object per line")] = False,
) -> None:
    """Entities degraded after their retries ran out, and hosts down (exit 1 if any)."""
    opts: Options = ctx.obj

    async def run() -> int:
        rows = await _query(opts.pg_dsn(), queries.alerts)
        _list(rows, as_json, dataclasses.asdict, render.alerts_table, "no alerts")
        return EXIT_FAILURE if rows else EXIT_OK

    _run(run)


# ---- orch demo ----------------------------------------------------------------------


@app.command()
def demo(
    directory: Annotated[Path, typer.Option("--dir", help="Scratch directory, removed after")]
    = Path(".orch/demo"),
    timeout: Annotated[float, typer.Option(help="Give up if not converged, seconds")]
    = demo_mod.DEMO_TIMEOUT_S,
) -> None:
    """A private stack, a replica and a short scenario; prints the state, then tears down."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # SIGTERM unwinds like Ctrl-C, so the servers are stopped and the directory removed.
    signal.signal(signal.SIGTERM, interrupt)
    # The replica logs only what is wrong: the scenario's own output tells the story.
    logs.configure("error", json=True)
    try:
        demo_mod.run(directory, _console(), timeout)
    except demo_mod.DemoError as exc:
        _fail(f"demo failed: {exc}", EXIT_FAILURE)
    except KeyboardInterrupt:
        _fail("demo interrupted", 130)
    except Exception as exc:  # a failed step: one line, the teardown has already run
        if os.environ.get("ORCH_DEBUG"):
            raise
        _fail(f"demo failed: {type(exc).__name__}: {exc}", EXIT_FAILURE)


if __name__ == "__main__":
    app()
