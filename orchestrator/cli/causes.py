"""Finding a command and what it caused, for `orch trace` and `orch publish --wait`."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg
from nats.js import JetStreamContext

from orchestrator import queries
from orchestrator.cli.connect import open_nats, open_pg
from orchestrator.cli.output import EXIT_USAGE, CliError
from orchestrator.logreader import LogClient, log_info
from orchestrator.tracer import Tracer
from schemas.ids import KEY_PATTERN
from schemas.outcomes import Outcome

if TYPE_CHECKING:  # rich only where a wait shows progress: a trace on a pipe never loads it
    from rich.console import Console
    from rich.status import Status

POLL_S = 0.1
PROGRESS_AFTER_S = 1.0  # a wait shorter than this shows nothing


@dataclass(slots=True)
class Reader:
    conn: asyncpg.Connection
    js: JetStreamContext
    partitions: int

    def tracer(self) -> Tracer:
        return Tracer(self.conn, self.js, self.partitions)


@contextlib.asynccontextmanager
async def reader(nats_url: str, pg_dsn: str, name: str) -> AsyncIterator[Reader]:
    conn = await open_pg(pg_dsn)
    try:
        nc = await open_nats(nats_url, name, client=LogClient)
        try:
            js = nc.jetstream()
            yield Reader(conn, js, (await log_info(js)).partitions)
        finally:
            await nc.close()
    finally:
        await conn.close()


async def find_command(r: Reader, ref: str) -> Outcome:
    """The folded command a seq or a cmd id names; a CliError (usage) says why there is none."""
    if ref.isdigit():
        seq = int(ref)
        found = await queries.outcome_at(r.conn, seq)
        if found is not None:
            return found
        last = (await log_info(r.js)).last_seq
        if seq < 1 or seq > last:
            raise CliError(f"no command at seq {seq}: the log holds seqs 1 to {last}", EXIT_USAGE)
        raise CliError(f"seq {seq} is in no timeline: not folded yet, or a dead letter"
                       " (orch dead-letters)", EXIT_USAGE)
    if not re.match(KEY_PATTERN, ref):
        raise CliError(f"{ref!r} is neither a seq nor a cmd id", EXIT_USAGE)
    found_all = await queries.outcomes_with_key(r.conn, ref)
    if not found_all:
        raise CliError(f"no folded command has cmd id {ref!r}", EXIT_USAGE)
    if len(found_all) > 1:
        seqs = ", ".join(str(o.seq) for o in found_all[:10])
        raise CliError(f"cmd id {ref!r} names {len(found_all)} commands (seq {seqs}):"
                       " trace one by its seq", EXIT_USAGE)
    return found_all[0]


class Progress:
    """A spinner on a TTY for a wait that lasts: never on a pipe or with --json."""

    def __init__(self, console: Console, enabled: bool) -> None:
        self._console, self._enabled = console, enabled and console.is_terminal
        self._started = time.monotonic()
        self._status: Status | None = None

    def update(self, text: str) -> None:
        if not self._enabled or time.monotonic() - self._started < PROGRESS_AFTER_S:
            return
        if self._status is None:
            self._status = self._console.status(text)
            self._status.start()
        else:
            self._status.update(text)

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

