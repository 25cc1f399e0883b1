"""Replay: fold the whole CMD log again, with the same code, into a scratch schema.

Partitions are independent by construction (an entity's state depends only on its own
partition's commands), so they are replayed in parallel, one worker process per core.
With ``verify`` every partition is folded up to the live checkpoint read in the same
snapshot as the live projection, so both must agree entity by entity; on the way, each
snapshot of the projection is compared with the fold at its own checkpoints. With
``from_snapshot`` the scratch projection starts as the newest snapshot of the current
code, and each partition folds only what came after its checkpoint there.
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
from orchestrator import snapshots
from orchestrator.deciders import STATE_TYPES
from orchestrator.fold import Key, fold_message
from orchestrator.history import Change, diff
from orchestrator.snapshots import Snapshot
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
    snapshot: Snapshot | None = None  # the one it started from
    # With verify: each snapshot, and the entities in it the fold does not reproduce.
    snapshots: dict[int, list[Key]] = field(default_factory=dict)

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
    snapshot: int | None = None  # the states before ``starts`` are this snapshot's
    starts: dict[int, int] = field(default_factory=dict)  # seq folded up to, per partition
    # Snapshots to compare with the fold at their checkpoints: id -> checkpoints.
    checks: dict[int, tuple[int, ...]] = field(default_factory=dict)


@dataclass(slots=True)
class _Done:
    commands: int = 0
    dead_letters: int = 0
    last_seq: int = 0


@dataclass(frozen=True, slots=True)
class _Live:
    """The live projection, its checkpoints and its snapshots, as of one moment."""

    checkpoints: dict[int, int]
    states: dict[Key, bytes]
    snapshots: list[Snapshot]


async def _live(conn: asyncpg.Connection) -> _Live:
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        checkpoints = {r["partition"]: r["checkpoint"]
                       for r in await conn.fetch("SELECT partition, checkpoint FROM partitions")}
        live = {(r["kind"], r["id"]): r["state"]
                for r in await conn.fetch("SELECT kind, id, state FROM entities")}
        return _Live(checkpoints, live, await snapshots.listed(conn))


async def _unreproduced(conn: asyncpg.Connection, schema: str, snapshot: int) -> list[Key]:
    """The entities whose state in the snapshot differs from the fold's at its checkpoints
    (jsonb compares as values: key order and spacing do not count)."""
    rows = await conn.fetch(
        "SELECT coalesce(s.kind, c.kind) AS kind, coalesce(s.id, c.id) AS id"
        " FROM (SELECT kind, id, state FROM snapshot_entities WHERE snapshot = $1) s"
        f" FULL JOIN (SELECT kind, id, state FROM {schema}.snapshot_check"
        "             WHERE snapshot = $1) c ON s.kind = c.kind AND s.id = c.id"
        " WHERE s.state IS DISTINCT FROM c.state ORDER BY 1, 2", snapshot)
    return [(r["kind"], r["id"]) for r in rows]


async def _fold_share(share: _Share) -> _Done:
    done = _Done()
    nc = await connect(share.nats_url, name="orch-replay")
    conn = await connect_pg(share.pg_dsn)
    try:
        js = nc.jetstream()
        for partition, limit in share.limits.items():
            states, captured = await _fold_partition(js, conn, share, partition, limit, done)
            rows = [(kind, id_, encode(state), 0) for (kind, id_), state in states.items()]
            await _write(conn, share, rows)
            if captured:
                await conn.copy_records_to_table(
                    "snapshot_check", records=captured, schema_name=share.schema,
                    columns=["snapshot", "kind", "id", "state"])
    finally:
        await nc.close()
        await conn.close()
    return done


async def _fold_partition(js: Any, conn: asyncpg.Connection, share: _Share, partition: int,
                          limit: int | None, done: _Done
                          ) -> tuple[dict[Key, object], list[tuple[int, str, str, bytes]]]:
    """The partition's states folded up to ``limit``, and the states as of each check's
    checkpoint, encoded."""
    states: dict[Key, object] = {}
    captured: list[tuple[int, str, str, bytes]] = []
    start = share.starts.get(partition, 0)
    checks = sorted((cps[partition], id_) for id_, cps in share.checks.items())

    def capture(snapshot_id: int) -> None:
        captured.extend((snapshot_id, kind, id_, encode(state))
                        for (kind, id_), state in states.items())

    if limit is None or limit > start:
        stream = read_stream(js, CMD_STREAM, partition_filter(partition), start_seq=start + 1)
        async with contextlib.aclosing(stream):
            async for msgs in stream:
                if share.snapshot is not None:
                    await _load(conn, share.snapshot, states, msgs)
                for msg in msgs:
                    d = delivery(msg.reply)
                    if limit is not None and d.stream_seq > limit:
                        break
                    while checks and checks[0][0] < d.stream_seq:
                        capture(checks.pop(0)[1])
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
    for _, snapshot_id in checks:  # checkpoints at or after the last command folded
        capture(snapshot_id)
    return states, captured


async def _load(conn: asyncpg.Connection, snapshot: int, states: dict[Key, object],
                msgs: list[Any]) -> None:
    """The snapshot's states of the entities these commands name, not yet in ``states``;
    the others are only copied, in SQL, never decoded."""
    wanted = set()
    for msg in msgs:
        tokens = msg.subject.split(".")
        if len(tokens) == 5 and tokens[3] in STATE_TYPES and (tokens[3], tokens[4]) not in states:
            wanted.add((tokens[3], tokens[4]))
    if not wanted:
        return
    rows = await conn.fetch(
        "SELECT s.kind, s.id, s.state FROM snapshot_entities s"
        " JOIN unnest($2::text[], $3::text[]) AS k(kind, id) USING (kind, id)"
        " WHERE s.snapshot = $1",
        snapshot, [k for k, _ in wanted], [i for _, i in wanted])
    for r in rows:
        states[(r["kind"], r["id"])] = msgspec.json.decode(r["state"],
                                                           type=STATE_TYPES[r["kind"]])


async def _write(conn: asyncpg.Connection, share: _Share, rows: list[tuple]) -> None:
    """A partition's states into the scratch projection; over a snapshot's, they replace
    the rows of the entities its commands changed."""
    columns = ["kind", "id", "state", "last_seq"]
    if share.snapshot is None:
        await conn.copy_records_to_table("entities", records=rows, schema_name=share.schema,
                                         columns=columns)
        return
    async with conn.transaction():
        await conn.execute(f"CREATE TEMP TABLE folded (LIKE {share.schema}.entities)"
                           " ON COMMIT DROP")
        await conn.copy_records_to_table("folded", records=rows, columns=columns)
        await conn.execute(
            f"INSERT INTO {share.schema}.entities SELECT * FROM folded"
            " ON CONFLICT (kind, id) DO UPDATE SET state = EXCLUDED.state")


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
                 to_seq: int | None = None, verify: bool = False, from_snapshot: bool = False,
                 workers: int | None = None,
                 progress: Callable[[int], None] | None = None) -> ReplayReport:
    """``progress``, if given, is called a few times a second with the commands folded."""
    global _folded
    if not _SCHEMA_RE.match(schema) or schema == "public":
        raise ValueError(f"invalid scratch schema name {schema!r}")
    if verify and (to_seq is not None or from_snapshot):
        raise ValueError("verify compares the whole log's fold with the live projection:"
                         " not to a point, nor from a snapshot")
    conn = await connect_pg(pg_dsn)
    try:
        live = await _live(conn) if verify else _Live({}, {}, [])
        start = await _starting_point(conn, partitions, to_seq) if from_snapshot else None
        async with conn.transaction():
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            await conn.execute(f"CREATE SCHEMA {schema}")
            await conn.execute(
                f"CREATE TABLE {schema}.entities (kind text, id text, state jsonb,"
                " last_seq bigint, PRIMARY KEY (kind, id))"
            )
            await conn.execute(f"CREATE TABLE {schema}.snapshot_check (snapshot bigint,"
                               " kind text, id text, state jsonb)")
            if start is not None:
                await conn.execute(
                    f"INSERT INTO {schema}.entities SELECT kind, id, state, 0"
                    " FROM snapshot_entities WHERE snapshot = $1", start.id)
        workers = max(1, min(workers or os.cpu_count() or 1, partitions))
        limits = {p: live.checkpoints.get(p, 0) if verify else to_seq for p in range(partitions)}
        checks = {s.id: s.checkpoints for s in live.snapshots if len(s.checkpoints) == partitions}
        shares = [_Share(nats_url, pg_dsn, schema, partitions,
                         {p: limits[p] for p in range(w, partitions, workers)},
                         snapshot=None if start is None else start.id,
                         starts={} if start is None else dict(enumerate(start.checkpoints)),
                         checks=checks)
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
            last_seq=max(r.last_seq for r in results),
            entities=await conn.fetchval(f"SELECT count(*) FROM {schema}.entities"),
            snapshot=start,
        )
        if verify:
            replayed = {(r["kind"], r["id"]): msgspec.json.decode(r["state"]) for r in
                        await conn.fetch(f"SELECT kind, id, state FROM {schema}.entities")}
            lived = {key: msgspec.json.decode(raw) for key, raw in live.states.items()}
            report.differs = sorted(key for key in replayed.keys() | lived.keys()
                                    if replayed.get(key) != lived.get(key))
            report.differences = {key: diff(lived.get(key), replayed.get(key))
                                  for key in report.differs}
            report.snapshots = {id_: await _unreproduced(conn, schema, id_) for id_ in checks}
        return report
    finally:
        await conn.close()


async def _starting_point(conn: asyncpg.Connection, partitions: int,
                          to_seq: int | None) -> Snapshot:
    snapshot = await snapshots.newest(conn, to_seq)
    if snapshot is None:
        point = "" if to_seq is None else f" up to seq {to_seq}"
        raise ValueError(f"no snapshot of this code ({snapshots.CODE_VERSION}){point}:"
                         " take one with `orch snapshot`, or replay the whole log")
    if len(snapshot.checkpoints) != partitions:
        raise ValueError(f"snapshot {snapshot.id} has {len(snapshot.checkpoints)} partitions,"
                         f" the CMD stream {partitions}")
    return snapshot
