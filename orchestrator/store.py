"""The projection store in PostgreSQL: one transaction per folded batch, fenced by epoch."""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg

Row = tuple[Any, ...]


class Fenced(Exception):
    """This replica no longer owns the partition (or its lease ran out): it must not commit."""


@dataclass(frozen=True, slots=True, order=True)
class Lease:
    partition: int
    epoch: int
    checkpoint: int


@dataclass(slots=True)
class Batch:
    """Everything one fold batch writes, all or nothing."""

    entities: list[Row]  # (kind, id, state json bytes, last_seq)
    history: list[Row]  # (seq, kind, id, outcome json bytes)
    outbox: list[Row]  # (partition, seq, n, subject, msg_id, payload)
    dead_letters: list[Row]  # (seq, subject, reason, payload, at)
    checkpoint: int
    relayed_upto: int = 0  # outbox rows at or below this seq were published: delete them


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb travels as raw JSON bytes: msgspec encodes and decodes, asyncpg only frames.
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", format="binary",
        encoder=lambda data: b"\x01" + (data if isinstance(data, bytes) else data.encode()),
        decoder=lambda data: data[1:],
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pooled connections keep no session state (no locks, no LISTEN, no SET): skip the
    reset query asyncpg would run on every release (open transactions still roll back)."""


async def create_pool(dsn: str, schema: str = "public", size: int = 4) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        dsn, min_size=1, max_size=size, init=_init_connection, reset=_keep_session,
        server_settings={"search_path": schema, "application_name": "orch"},
    )


class Store:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def migrate(self, partitions: int) -> None:
        ddl = resources.files("orchestrator").joinpath("schema.sql").read_text()
        async with self.pool.acquire() as conn, conn.transaction():
            # Replicas start together: serialise their DDL.
            await conn.execute("SELECT pg_advisory_xact_lock(7316)")
            await conn.execute(ddl)
            await conn.execute(
                "INSERT INTO partitions (partition) SELECT generate_series(0, $1 - 1)"
                " ON CONFLICT DO NOTHING",
                partitions,
            )

    # ---- ownership --------------------------------------------------------------

    async def heartbeat(self, replica: str, ttl_s: float) -> int:
        """Record this replica as alive; return how many replicas are alive."""
        async with self.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO replicas VALUES ($1, now())"
                " ON CONFLICT (id) DO UPDATE SET seen = now()",
                replica,
            )
            return await conn.fetchval(
                "SELECT count(*) FROM replicas WHERE seen > now() - make_interval(secs => $1)",
                ttl_s,
            )

    async def leave(self, replica: str) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE partitions SET owner = NULL, lease_until = 'epoch' WHERE owner = $1",
                replica,
            )
            await conn.execute("DELETE FROM replicas WHERE id = $1", replica)

    async def claim(self, replica: str, ttl_s: float, limit: int) -> list[Lease]:
        """Take up to ``limit`` partitions that nobody holds; each taking bumps the epoch."""
        rows = await self.pool.fetch(
            """
            UPDATE partitions SET owner = $1, epoch = epoch + 1,
                   lease_until = now() + make_interval(secs => $2)
            WHERE partition IN (
                SELECT partition FROM partitions
                WHERE owner IS NULL OR lease_until < now()
                ORDER BY partition LIMIT $3 FOR UPDATE SKIP LOCKED)
            RETURNING partition, epoch, checkpoint
            """,
            replica, ttl_s, limit,
        )
        return sorted(Lease(r["partition"], r["epoch"], r["checkpoint"]) for r in rows)

    async def renew(self, replica: str, leases: Iterable[Lease], ttl_s: float) -> set[int]:
        """Extend our leases; return the partitions we still hold."""
        leases = list(leases)
        rows = await self.pool.fetch(
            """
            UPDATE partitions SET lease_until = now() + make_interval(secs => $2)
            WHERE owner = $1 AND (partition, epoch) IN
                  (SELECT * FROM unnest($3::int[], $4::bigint[]))
            RETURNING partition
            """,
            replica, ttl_s, [le.partition for le in leases], [le.epoch for le in leases],
        )
        return {r["partition"] for r in rows}

    async def release(self, replica: str, lease: Lease) -> None:
        await self.pool.execute(
            "UPDATE partitions SET owner = NULL, lease_until = 'epoch'"
            " WHERE partition = $1 AND owner = $2 AND epoch = $3",
            lease.partition, replica, lease.epoch,
        )

    # ---- folding ----------------------------------------------------------------

    async def load_states(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
        rows = await self.pool.fetch(
            "SELECT e.kind, e.id, e.state FROM entities e"
            " JOIN unnest($1::text[], $2::text[]) AS k(kind, id) USING (kind, id)",
            [k for k, _ in keys], [i for _, i in keys],
        )
        return {(r["kind"], r["id"]): r["state"] for r in rows}

    async def commit(self, replica: str, lease: Lease, expected_checkpoint: int,
                     batch: Batch) -> None:
        """Write a folded batch and move the checkpoint, or raise Fenced and write nothing."""
        fenced = await self.pool.fetchval(
            "SELECT commit_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14,"
            " $15, $16, $17, $18, $19, $20, $21, $22, $23, $24)",
            lease.partition, replica, lease.epoch, expected_checkpoint, batch.checkpoint,
            batch.relayed_upto,
            *_columns(batch.entities, 4), *_columns(batch.history, 4),
            *_columns([row[1:] for row in batch.outbox], 5), *_columns(batch.dead_letters, 5),
        )
        if fenced is not None:
            raise Fenced(fenced)

    async def pending_outbox(self, partition: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            "SELECT seq, subject, msg_id, payload FROM outbox WHERE partition = $1"
            " ORDER BY seq, n",
            partition,
        )

    async def delete_outbox(self, partition: int, upto_seq: int) -> None:
        await self.pool.execute("DELETE FROM outbox WHERE partition = $1 AND seq <= $2",
                                partition, upto_seq)


def _columns(rows: list[Row], width: int) -> list[list[Any]]:
    """Rows to columns, as the arrays commit_batch unnests."""
    return [list(col) for col in zip(*rows, strict=True)] if rows else [[]] * width


async def connect_pg(dsn: str, schema: str = "public") -> asyncpg.Connection:
    """One connection with the same codecs as the pool (jsonb as raw bytes)."""
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    await _init_connection(conn)
    return conn
