"""Verbs that run the platform: `orch up`, `orch orchestrator`, `orch agent`, `orch demo`."""

import contextlib
import os
import signal
import sys
import threading
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli.app import Options, app
from orchestrator.cli.output import EXIT_FAILURE, EXIT_USAGE, CliError, console, fail, run

# A replica gets this long to stop its workers after SIGTERM before it is cancelled.
REPLICA_STOP_GRACE_S = 8.0
# `orch up` restarts a server that exits, unless they keep exiting: then it gives up.
UP_MAX_RESTARTS, UP_RESTART_WINDOW_S = 3, 60.0


async def _create_topology(url: str, partitions: int, replicas: int) -> None:
    from events.topology import ensure_topology
    from orchestrator.cli.connect import open_nats

    nc = await open_nats(url, "orch-up")
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
    import nats.errors
    import uvloop

    from orchestrator.embedded import Stack, read_stack_file
    from orchestrator.settings import stack_dir

    if servers not in (1, 3):
        fail("--servers: 1, or 3 for a cluster", EXIT_USAGE)
    root = directory or stack_dir()
    live = read_stack_file(root)
    if live is not None:
        fail(f"a stack is already running in {root} (nats {live.nats_url})", EXIT_FAILURE)
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
            fail(f"the stack did not start: {exc}".splitlines()[0], EXIT_FAILURE)
        out = console()
        out.print(f"nats        {info.nats_url}")
        out.print(f"postgresql  {info.pg_dsn}")
        out.print(f"stack file  {root / 'stack.json'} (other `orch` commands here use it)")
        out.print(f"export ORCH_NATS_URL={info.nats_url} ORCH_PG_DSN={info.pg_dsn}")
        out.print("running; Ctrl-C to stop", style="dim")
        restarts: list[float] = []
        while not stop.wait(0.5):
            try:
                revived = stack.revive()
            except (RuntimeError, OSError) as exc:
                fail(f"a server of the stack exited and did not start again: {exc}"
                     .splitlines()[0], EXIT_FAILURE)
            for line in revived:
                print(f"warning: {line}", file=sys.stderr, flush=True)
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < UP_RESTART_WINDOW_S]
            restarts += [now] * len(revived)
            if len(restarts) > UP_MAX_RESTARTS:
                fail(f"servers of the stack exited {len(restarts)} times in"
                     f" {UP_RESTART_WINDOW_S:.0f} s; see the logs in {root}", EXIT_FAILURE)
    finally:
        stack.stop()
    print("stack stopped", flush=True)


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
    evacuate_after: Annotated[float | None, typer.Option(
        min=0, metavar="SECONDS", help="Rebuild the instances of a host down this long"
        " elsewhere [default: never by itself]")] = None,
    snapshot_every: Annotated[float, typer.Option(
        min=0, metavar="SECONDS", help="The leader snapshots the projection this often, when"
        " anything was folded since; 0: never by itself")] = 3600.0,
    snapshot_keep: Annotated[int, typer.Option(min=1, help="Snapshots kept, the newest")] = 2,
    metrics_port: Annotated[int | None, typer.Option(
        help="Serve Prometheus metrics on 127.0.0.1:PORT")] = None,
    log_level: Annotated[LogLevel, typer.Option(case_sensitive=False)] = LogLevel.info,
) -> None:
    """Run an orchestrator replica until SIGTERM or Ctrl-C (JSON logs on stderr)."""
    import asyncio

    import prometheus_client

    from events import logs
    from orchestrator.cli.connect import stop_event
    from orchestrator.reconciler import ReconcilerConfig
    from orchestrator.replica import Replica, ReplicaConfig

    opts: Options = ctx.obj
    logs.configure(log_level.value, json=True)
    if metrics_port is not None:
        prometheus_client.start_http_server(metrics_port, addr="127.0.0.1")

    async def main() -> None:
        stop = stop_event()
        extra = {"replica_id": replica_id} if replica_id else {}
        config = ReplicaConfig(
            opts.nats_url(), opts.pg_dsn(), partitions=partitions, lease_s=lease, tick_s=tick,
            batch=batch, cached=cached, down_after_s=down_after,
            reconcile=ReconcilerConfig(deadline_s=deadline, max_attempts=max_attempts,
                                       evacuate_after_s=evacuate_after),
            snapshot_every_s=snapshot_every or None, snapshot_keep=snapshot_keep,
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

    run(main)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "help_option_names": []})
def agent(ctx: typer.Context) -> None:
    """Run the agent of one host: `orch agent --host NAME [--libvirt URI] ...` (--help)."""
    # The agent is its own program (python -m agents): the orchestrator never imports it,
    # they meet only on the bus. It gets the bus this CLI would use.
    from orchestrator.settings import NoStack

    opts: Options = ctx.obj
    argv = [sys.executable, "-m", "agents", *ctx.args]
    if "--help" not in ctx.args:
        try:
            argv += ["--nats", opts.nats_url()]
        except NoStack as exc:
            fail(str(exc), EXIT_FAILURE)
    os.execv(sys.executable, argv)


@app.command()
def demo(
    directory: Annotated[Path, typer.Option("--dir", help="Scratch directory, removed after")]
    = Path(".orch/demo"),
    timeout: Annotated[float | None, typer.Option(
        help="Give up if not converged, seconds [default: the demo's own]")] = None,
) -> None:
    """A private stack, a replica and a short scenario; prints the state, then tears down."""
    from events import logs
    from orchestrator import demo as demo_mod


    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # SIGTERM unwinds like Ctrl-C, so the servers are stopped and the directory removed.
    signal.signal(signal.SIGTERM, interrupt)
    # The replica logs only what is wrong: the scenario's own output tells the story.
    logs.configure("error", json=True)
    try:
        demo_mod.run(directory, console(),
                     demo_mod.DEMO_TIMEOUT_S if timeout is None else timeout)
    except demo_mod.DemoError as exc:
        fail(f"demo failed: {exc}", EXIT_FAILURE)
    except KeyboardInterrupt:
        fail("demo interrupted", 130)
    except Exception as exc:  # a failed step: one line, the teardown has already run
        if os.environ.get("ORCH_DEBUG"):
            raise
        fail(f"demo failed: {type(exc).__name__}: {exc}", EXIT_FAILURE)
