"""Connections of a one-shot verb: bounded waits, and one clear line when they fail.
Each imports its client when called: a verb reading PostgreSQL only never loads nats."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from orchestrator.cli.output import CliError

if TYPE_CHECKING:
    import asyncpg
    from nats.aio.client import Client

T = TypeVar("T")
NATS_CONNECT_TIMEOUT_S = 5.0
PG_CONNECT_TIMEOUT_S = 10.0


def redact(dsn: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", dsn)


async def open_nats(url: str, name: str, follow: bool = False,
                    client: type[Client] | None = None) -> Client:
    """Connect with a deadline: events.bus.connect retries forever, right for daemons only.

    A one-shot verb gives up after three refused attempts (about a second); a follower
    keeps reconnecting once connected, as it may outlive a server restart. ``client``: a
    subclass of nats-py's (orchestrator.logreader's LogClient, to read CMD fast).
    """
    import nats
    import nats.errors

    from events.bus import server_urls

    errors: list[Exception] = []

    async def remember(exc: Exception) -> None:  # instead of nats-py's logged traceback
        errors.append(exc)

    nc = (client or nats.NATS)()
    try:
        await asyncio.wait_for(
            nc.connect(server_urls(url), name=name, connect_timeout=2, reconnect_time_wait=0.5,
                       # nats-py reads 0 as "forever": 2 is the smallest finite bound.
                       max_reconnect_attempts=-1 if follow else 2, error_cb=remember),
            NATS_CONNECT_TIMEOUT_S,
        )
        return nc
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        reason = errors[-1] if errors else exc
        raise CliError(f"cannot connect to NATS at {url}: {reason or 'timed out'}") from None


async def open_pg(dsn: str) -> asyncpg.Connection:
    import asyncpg

    from orchestrator.store import connect_pg

    try:
        return await asyncio.wait_for(connect_pg(dsn), PG_CONNECT_TIMEOUT_S)
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise CliError(
            f"cannot connect to PostgreSQL at {redact(dsn)}: {exc or 'timed out'}"
        ) from None


async def query(dsn: str, read: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """One read on a connection of its own."""
    conn = await open_pg(dsn)
    try:
        return await read(conn)
    finally:
        await conn.close()


def stop_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM: long-running verbs stop cleanly and exit 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def until_stopped(work: Awaitable[None], stop: asyncio.Event) -> None:
    """Run ``work`` until it ends or ``stop`` is set; either way nothing is left running."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    for t in (task, stopped):
        t.cancel()
    await asyncio.gather(stopped, return_exceptions=True)
    with contextlib.suppress(asyncio.CancelledError):
        await task
