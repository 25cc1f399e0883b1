"""Snapshots of the projection: a replay's starting point that skips the log before it.

A snapshot is a copy of every entity's row together with each partition's checkpoint,
read in one repeatable-read transaction: the rows are exactly the fold of each partition's
commands up to its checkpoint, whatever the fold committed meanwhile (it is never stopped
or locked out). Each snapshot names the code that folded it (`CODE_VERSION`, a digest of
the fold's sources): a replay from it is only a replay of the current code if they match,
so `orch replay --from-snapshot` takes the newest of the current code, and
`orch replay --verify`, which folds the whole log, reports any snapshot it does not
reproduce.

An entity's own fold (`orch get --at`, `orch trace`) can start from a snapshot too: its
row there is the fold of its commands up to its partition's checkpoint (no row: it did
not exist yet), so only its commands after that checkpoint are folded again.
"""

import asyncio
import hashlib
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from orchestrator.store import connect_pg

_ROOT = Path(__file__).resolve().parents[1]
# What decides a state: the fold's boundary, the deciders and the shapes they fold.
_FOLD_SOURCES = ("orchestrator/fold.py", "orchestrator/deciders", "schemas")


def _code_version() -> str:
    digest = hashlib.sha256()
    for source in _FOLD_SOURCES:
        path = _ROOT / source
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.relative_to(_ROOT).as_posix().encode() + b"\0")
            digest.update(file.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


CODE_VERSION = _code_version()


@dataclass(frozen=True, slots=True)
class Snapshot:
    id: int
    taken_at: datetime
    code: str
    checkpoints: tuple[int, ...]  # index: partition
    entities: int
    seconds: float  # what taking it took

    @property
    def upto(self) -> int:
        """The newest command it holds: a replay to an earlier point cannot start from it."""
        return max(self.checkpoints, default=0)

    @property
    def current(self) -> bool:
        return self.code == CODE_VERSION


def _snapshot(row: asyncpg.Record) -> Snapshot:
    return Snapshot(row["id"], row["taken_at"], row["code"], tuple(row["checkpoints"]),
                    row["entities"], row["seconds"])


_COLUMNS = "id, taken_at, code, checkpoints, entities, seconds"


async def take(conn: asyncpg.Connection, keep: int) -> Snapshot:
    """Copy the projection as of one moment; then forget all but the newest ``keep``."""
    started = time.perf_counter()
    async with conn.transaction(isolation="repeatable_read"):
        checkpoints = [r["checkpoint"] for r in await conn.fetch(
            "SELECT checkpoint FROM partitions ORDER BY partition")]
        snapshot_id = await conn.fetchval(
            "INSERT INTO snapshots (code, checkpoints) VALUES ($1, $2) RETURNING id",
            CODE_VERSION, checkpoints)
        copied = await conn.execute(
            "INSERT INTO snapshot_entities (snapshot, kind, id, state, last_seq)"
            " SELECT $1, kind, id, state, last_seq FROM entities", snapshot_id)
        row = await conn.fetchrow(
            f"UPDATE snapshots SET entities = $2, seconds = $3 WHERE id = $1"
            f" RETURNING {_COLUMNS}",
            snapshot_id, int(copied.split()[-1]), time.perf_counter() - started)
    await prune(conn, keep)
    return _snapshot(row)


async def prune(conn: asyncpg.Connection, keep: int) -> None:
    # Rows go before their snapshot's line, in one transaction: never a line without rows.
    async with conn.transaction():
        old = [r["id"] for r in await conn.fetch(
            "SELECT id FROM snapshots ORDER BY id DESC OFFSET $1", keep)]
        if old:
            await conn.execute("DELETE FROM snapshot_entities WHERE snapshot = ANY($1)", old)
            await conn.execute("DELETE FROM snapshots WHERE id = ANY($1)", old)


async def listed(conn: asyncpg.Connection) -> list[Snapshot]:
    """Oldest first."""
    return [_snapshot(r) for r in await conn.fetch(
        f"SELECT {_COLUMNS} FROM snapshots ORDER BY id")]


async def newest(conn: asyncpg.Connection, upto: int | None = None) -> Snapshot | None:
    """The newest snapshot of the current code, holding nothing after ``upto`` if given."""
    usable = [s for s in await listed(conn)
              if s.current and (upto is None or s.upto <= upto)]
    return usable[-1] if usable else None


@dataclass(frozen=True, slots=True)
class EntityStart:
    """Where one entity's fold can start: a snapshot of the current code."""

    snapshot: int
    checkpoint: int  # of the entity's partition: the state is the fold of what is up to it
    state: bytes | None  # its row's JSON; None: the entity did not exist yet
    last_seq: int  # of the command that last changed it (0 when it did not exist)


async def entity_start(conn: asyncpg.Connection, kind: str, id_: str, partition: int,
                       partitions: int, upto: int) -> EntityStart | None:
    """The snapshot of the current code and partition count whose checkpoint of
    ``partition`` is the latest at or before ``upto``: the entity's row there."""
    try:
        row = await conn.fetchrow(
            "SELECT s.id, s.checkpoints[$3 + 1] AS checkpoint, e.state, e.last_seq"
            " FROM snapshots s LEFT JOIN snapshot_entities e"
            "   ON e.snapshot = s.id AND e.kind = $5 AND e.id = $6"
            " WHERE s.code = $1 AND cardinality(s.checkpoints) = $2"
            "   AND s.checkpoints[$3 + 1] <= $4"
            " ORDER BY s.checkpoints[$3 + 1] DESC, s.id DESC LIMIT 1",
            CODE_VERSION, partitions, partition, upto, kind, id_)
    except asyncpg.UndefinedTableError:  # no replica has made the tables yet
        return None
    if row is None:
        return None
    return EntityStart(row["id"], row["checkpoint"], row["state"], row["last_seq"] or 0)


def _log() -> Any:
    """structlog, imported when a snapshot is taken: a verb that reads one never loads it
    (~30 ms of its start-up, with the rich it imports)."""
    import structlog

    return structlog.get_logger()


class Schedule:
    """The leader's duty: a snapshot every ``every_s``, when anything was folded since.

    Asked every tick on the leader's connection, which must stay free for the other
    duties; the copy itself runs on a connection of its own, in the background.
    """

    def __init__(self, dsn: str, every_s: float | None, keep: int) -> None:
        self.dsn, self.every_s, self.keep = dsn, every_s, keep
        self.taking: asyncio.Task[Snapshot | None] | None = None

    async def tick(self, conn: asyncpg.Connection) -> None:
        if self.every_s is None or (self.taking is not None and not self.taking.done()):
            return
        if await conn.fetchval(_DUE, self.every_s):
            self.taking = asyncio.create_task(self._take())

    async def _take(self) -> Snapshot | None:
        """A failure is only logged: the next tick that finds one due tries again."""
        try:
            conn = await connect_pg(self.dsn)
            try:
                snapshot = await take(conn, self.keep)
            finally:
                await conn.close()
        except Exception as exc:
            _log().warning("snapshot_failed", error=repr(exc))
            return None
        _log().info("snapshot_taken", snapshot=snapshot.id, entities=snapshot.entities,
                 upto=snapshot.upto, seconds=round(snapshot.seconds, 3))
        return snapshot

    async def close(self) -> None:
        if self.taking is not None:
            self.taking.cancel()
            await asyncio.gather(self.taking, return_exceptions=True)


# Due when the newest snapshot is older than the period and something was folded since.
_DUE = """
SELECT coalesce(
    (SELECT taken_at < now() - make_interval(secs => $1)
            AND checkpoints <> (SELECT array_agg(checkpoint ORDER BY partition) FROM partitions)
     FROM snapshots ORDER BY id DESC LIMIT 1),
    (SELECT max(checkpoint) > 0 FROM partitions))
"""
