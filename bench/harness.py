"""What every benchmark does around its work: signals, exit codes, cleanup, its header."""

import os
import signal
import sys
from collections.abc import Callable
from types import FrameType

import asyncpg
from nats.aio.client import Client

from orchestrator.children import uninterruptible


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(body: Callable[[], None], cleanup: Callable[[], None]) -> int:
    """Run ``body`` and then ``cleanup``, whatever happened, uninterruptibly; an exit code.

    Ctrl-C and SIGTERM are raised wherever the loop is (exit 130), rather than left to
    asyncio's SIGINT handling, which cancels the main task: nats-py turns that cancellation
    into TooManyStalledMsgsError. An expected failure prints one line (exit 1).
    """
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)
    try:
        body()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        with uninterruptible():
            cleanup()


async def environment(nc: Client, conn: asyncpg.Connection, sync_always: bool,
                      servers: int = 1) -> str:
    """The machine and servers a benchmark ran on, for its first line."""
    pg = await conn.fetchval("SHOW server_version")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    sync = "fsync every write" if sync_always else "default fsync interval"
    nats = "1 server" if servers == 1 else f"a cluster of {servers}, streams replicated 3 times"
    return (f"{os.cpu_count()} CPUs (load average {load}), Python {sys.version.split()[0]},"
            f" nats-server {nc.connected_server_version} ({nats}, {sync}), PostgreSQL {pg}")
