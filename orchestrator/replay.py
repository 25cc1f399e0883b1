"""Replay: fold the whole CMD log again, with the same code, into a scratch schema.

Partitions are independent by construction (an entity's state depends only on its own
partition's commands), so they are replayed in parallel, one worker process per core.
With ``verify`` every partition is folded up to the live checkpoint read in the same
snapshot as the live projection, so both must agree entity by entity.
"""

import asyncio
import contextlib
import multiprocessing
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec
import uvloop

from events.bus import connect, read_stream
from events.meta import delivery
from events.subjects import CMD_STREAM, partition_filter
from orchestrator.fold import Key, fold_message
from orchestrator.history import Change, diff
from orchestrator.store import connect_pg
from schemas.codec import encode

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(slots=True)
class ReplayReport:
    schema: str
    commands: int = 0
    dead_letters: int = 0
    last_seq: int = 0
    seconds: float = 0.0
    entities: int = 0
    workers: int = 0
    differs: list[Key] = field(default_factory=list)  # only with verify
    # Field by field, each entity that differs: before is the live state, after the replayed.
    differences: dict[Key, list[Change]] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.commands / self.seconds if self.seconds else 0.0


@dataclass(frozen=True, slots=True)
class _Share:
    """One worker's part: some partitions, each folded up to a sequence (None: to the end)."""

    nats_url: str
    pg_dsn: str
    schema: str
    partitions: int
    limits: dict[int, int | None]


@dataclass(slots=True)
class _Done:
    commands: int = 0
    dead_letters: int = 0
    last_seq: int = 0
    entities: int = 0


async def _live_snapshot(conn: asyncpg.Connection) -> tuple[dict[int, int], dict[Key, bytes]]:
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        checkpoints = {r["partition"]: r["checkpoint"]
                       for r in await conn.fetch("SELECT partition, checkpoint FROM partitions")}
        live = {(r["kind"], r["id"]): r["state"]
                for r in await conn.fetch("SELECT kind, id, state FROM entities")}
    return checkpoints, live


async def _fold_share(share: _Share) -> _Done:
    done = _Done()
    states: dict[Key, object] = {}
    nc = await connect(share.nats_url, name="orch-replay")
    try:
        js = nc.jetstream()
        for partition, limit in share.limits.items():
            if limit == 0:
                continue
            stream = read_stream(js, CMD_STREAM, partition_filter(partition))
            async with contextlib.aclosing(stream):
                async for msgs in stream:
                    for msg in msgs:
                        d = delivery(msg.reply)
                        if limit is not None and d.stream_seq > limit:
                            break
                        folded = fold_message(states, msg.subject, msg.data, d.stream_seq,
                                              d.at_ms, share.partitions)
                        done.commands += 1
                        if done.commands % _COUNT_EVERY == 0 and _folded is not None:
                            with _folded.get_lock():
                                _folded.value += _COUNT_EVERY
                        done.dead_letters += folded.dead_letter is not None
                        done.last_seq = max(done.last_seq, d.stream_seq)
                    else:
                        continue
                    break
    finally:
        await nc.close()
    rows = [(kind, id_, encode(state), 0) for (kind, id_), state in states.items()]
    conn = await connect_pg(share.pg_dsn)
    try:
        await conn.copy_records_to_table("entities", records=rows, schema_name=share.schema,
                                         columns=["kind", "id", "state", "last_seq"])
    finally:
        await conn.close()
    done.entities = len(rows)
    return done


# Commands folded by every worker so far, for a progress display: shared memory, made
# before the workers fork, so each inherits it.
_folded: Any = None
_COUNT_EVERY = 1000


def _work(share: _Share) -> _Done:
    return uvloop.run(_fold_share(share))


async def _report_progress(progress: Callable[[int], None]) -> None:
    while True:
        progress(_folded.value)
        await asyncio.sleep(0.2)


async def replay(nats_url: str, pg_dsn: str, partitions: int, *, schema: str = "replay",
                 to_seq: int | None = None, verify: bool = False, workers: int | None = None,
                 progress: Callable[[int], None] | None = None) -> ReplayReport:
    """``progress``, if given, is called a few times a second with the commands folded."""
    global _folded
    if not _SCHEMA_RE.match(schema) or schema == "public":
        raise ValueError(f"invalid scratch schema name {schema!r}")
    if verify and to_seq is not None:
        raise ValueError("verify compares with the live projection: it replays the whole log")
    conn = await connect_pg(pg_dsn)
    try:
        checkpoints, live = await _live_snapshot(conn) if verify else ({}, {})
        async with conn.transaction():
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            await conn.execute(f"CREATE SCHEMA {schema}")
            await conn.execute(
                f"CREATE TABLE {schema}.entities (kind text, id text, state jsonb,"
                " last_seq bigint, PRIMARY KEY (kind, id))"
            )
        workers = max(1, min(workers or os.cpu_count() or 1, partitions))
        limits = {p: checkpoints.get(p, 0) if verify else to_seq for p in range(partitions)}
        shares = [_Share(nats_url, pg_dsn, schema, partitions,
                         {p: limits[p] for p in range(w, partitions, workers)})
                  for w in range(workers)]
        started = time.perf_counter()
        fork = multiprocessing.get_context("fork")
        _folded = fork.Value("q", 0) if progress is not None else None
        # fork: the workers start at once, with everything imported already.
        with ProcessPoolExecutor(workers, mp_context=fork) as pool:
            loop = asyncio.get_running_loop()
            shown = None if progress is None else asyncio.create_task(
                _report_progress(progress))
            try:
                results = await asyncio.gather(*(loop.run_in_executor(pool, _work, s)
                                                  for s in shares))
            finally:
                if shown is not None:
                    shown.cancel()
                _folded = None
        report = ReplayReport(
            schema=schema, seconds=time.perf_counter() - started, workers=workers,
            commands=sum(r.commands for r in results),
            dead_letters=sum(r.dead_letters for r in results),
            last_seq=max(r.last_seq for r in results), entities=sum(r.entities for r in results),
        )
        if verify:
            replayed = {(r["kind"], r["id"]): msgspec.json.decode(r["state"]) for r in
                        await conn.fetch(f"SELECT kind, id, state FROM {schema}.entities")}
            lived = {key: msgspec.json.decode(raw) for key, raw in live.items()}
            report.differs = sorted(key for key in replayed.keys() | lived.keys()
                                    if replayed.get(key) != lived.get(key))
            report.differences = {key: diff(lived.get(key), replayed.get(key))
                                  for key in report.differs}
        return report
    finally:
        await conn.close()
