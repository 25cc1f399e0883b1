"""The projection store in PostgreSQL: one transaction per folded batch, fenced by epoch."""

import asyncio
import datetime
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


@dataclass(frozen=True, slots=True)
class Span:
    """The outbox rows of one partition with a seq after ``after`` and up to ``upto``.

    Deletes name both ends: below ``after`` lie the rows deleted before, whose dead index
    entries a delete bounded only above would walk through every time.
    """

    after: int
    upto: int

    def join(self, later: "Span") -> "Span":
        return later if self == NOTHING else Span(self.after, later.upto)


NOTHING = Span(0, 0)


@dataclass(slots=True)
class Batch:
    """Everything one fold batch writes, all or nothing."""

    entities: list[Row]  # (kind, id, state json bytes, last_seq)
    history: list[Row]  # (seq, kind, id, outcome json bytes)
    outbox: list[Row]  # (seq, n, subject, msg_id, payload)
    dead_letters: list[Row]  # (seq, subject, reason, payload, at)
    checkpoint: int
    relayed: Span = NOTHING  # outbox rows published since the last commit: delete them


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
        # No floor to keep: asyncpg would retry it in the background while PostgreSQL is
        # down, printing a traceback each time. Connections open when asked for, and a
        # closed one (PostgreSQL restarted) is opened again when next acquired.
        dsn, min_size=0, max_size=size, init=_init_connection, reset=_keep_session,
        # The projection is derived from the CMD stream, where every command is durable
        # before it is acknowledged: a commit lost in a crash of PostgreSQL moves the
        # checkpoint back, and the fold does it again, identically (replicas restart their
        # workers when the server has restarted, see Pulse). Waiting for the WAL
        # flush would cost every commit the disk's latency for nothing.
        server_settings={"search_path": schema, "application_name": "orch",
                         "synchronous_commit": "off"},
    )


@dataclass(frozen=True, slots=True)
class Pulse:
    live: int  # replicas alive
    # When the server started: another time, and it has restarted (or failed over) since.
    # Commits are asynchronous, so a crash may have lost some it acknowledged.
    server_started: datetime.datetime


@dataclass(frozen=True, slots=True)
class Commit:
    replica: str
    lease: Lease
    expected: int  # the checkpoint the batch was folded from
    batch: Batch


class Store:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._waiting: list[tuple[Commit, asyncio.Future[str | None]]] = []
        self._committing: asyncio.Task[None] | None = None

    async def migrate(self, partitions: int) -> None:
        ddl = "\n".join(resources.files("orchestrator").joinpath(name).read_text()
                        for name in ("schema.sql", "snapshots.sql"))
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

    async def folded_upto(self) -> int:
        """The highest CMD sequence any partition has committed."""
        return int(await self.pool.fetchval(
            "SELECT coalesce(max(checkpoint), 0) FROM partitions"))

    async def heartbeat(self, replica: str, ttl_s: float) -> Pulse:
        """Record this replica as alive; return how many replicas are alive, and since when
        the server runs."""
        async with self.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO replicas VALUES ($1, now())"
                " ON CONFLICT (id) DO UPDATE SET seen = now()",
                replica,
            )
            row = await conn.fetchrow(
                "SELECT count(*), pg_postmaster_start_time() FROM replicas"
                " WHERE seen > now() - make_interval(secs => $1)",
                ttl_s,
            )
            return Pulse(row[0], row[1])

    async def leave(self, replica: str) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE partitions SET owner = NULL, lease_until = 'epoch' WHERE partition IN"
                " (SELECT partition FROM partitions WHERE owner = $1"
                "  ORDER BY partition FOR UPDATE)",
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
        """Extend our leases; return the partitions we still hold.

        Rows are locked in partition order, as commit_batches locks them: a commit of
        several partitions and a renewal never wait for each other in a cycle.
        """
        leases = list(leases)
        rows = await self.pool.fetch(
            """
            UPDATE partitions SET lease_until = now() + make_interval(secs => $2)
            WHERE partition IN (
                SELECT partition FROM partitions
                WHERE owner = $1 AND (partition, epoch) IN
                      (SELECT * FROM unnest($3::int[], $4::bigint[]))
                ORDER BY partition FOR UPDATE)
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
        """Write a folded batch and move the checkpoint, or raise Fenced and write nothing.

        Commits that arrive while another is on its way go together in the next round
        trip: one transaction for the batches of many partitions costs PostgreSQL and this
        process little more than one.
        """
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((Commit(replica, lease, expected_checkpoint, batch), done))
        if self._committing is None:
            self._committing = asyncio.create_task(self._commit_waiting())
        reason = await done
        if reason is not None:
            raise Fenced(reason)

    async def _commit_waiting(self) -> None:
        group: list[tuple[Commit, asyncio.Future[str | None]]] = []
        try:
            while self._waiting:
                group, self._waiting = self._waiting, []
                try:
                    reasons = await self._commit_group([c for c, _ in group])
                except Exception as exc:
                    if len(group) == 1:
                        _settle(group[0][1], exc)
                        continue
                    # One bad batch must not fail the others: each goes again on its own.
                    for c, done in group:
                        try:
                            _settle(done, (await self._commit_group([c]))[0])
                        except Exception as exc_one:
                            _settle(done, exc_one)
                    continue
                for (_, done), reason in zip(group, reasons, strict=True):
                    _settle(done, reason)
        finally:
            self._committing = None
            for _, done in group + self._waiting:  # cancelled: nobody will settle these
                done.cancel()  # a no-op for the settled ones
            self._waiting = []

    async def _commit_group(self, commits: list[Commit]) -> list[str | None]:
        order = sorted(range(len(commits)), key=lambda i: commits[i].lease.partition)
        ordered = [commits[i] for i in order]
        heads = [(c.lease.partition, c.replica, c.lease.epoch, c.expected, c.batch.checkpoint,
                  c.batch.relayed.after, c.batch.relayed.upto) for c in ordered]
        rows: tuple[list[Row], ...] = ([], [], [], [])
        for b, c in enumerate(ordered, start=1):
            rows[0].extend((b, *r) for r in c.batch.entities)
            rows[1].extend((b, *r) for r in c.batch.history)
            rows[2].extend((b, *r) for r in c.batch.outbox)
            rows[3].extend((b, *r) for r in c.batch.dead_letters)
        fenced = await self.pool.fetchval(
            "SELECT commit_batches($1, $2, $3, $4, $5)", heads, *rows)
        reasons: list[str | None] = [None] * len(commits)
        for i, reason in zip(order, fenced, strict=True):
            reasons[i] = reason
        return reasons

    async def pending_outbox(self, partition: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            "SELECT seq, subject, msg_id, payload FROM outbox WHERE partition = $1"
            " ORDER BY seq, n",
            partition,
        )

    async def delete_outbox(self, partition: int, span: Span) -> None:
        await self.pool.execute(
            "DELETE FROM outbox WHERE partition = $1 AND seq > $2 AND seq <= $3",
            partition, span.after, span.upto)


def _settle(done: "asyncio.Future[str | None]", outcome: str | Exception | None) -> None:
    if done.done():  # its committer was cancelled meanwhile
        return
    if isinstance(outcome, Exception):
        done.set_exception(outcome)
    else:
        done.set_result(outcome)


async def connect_pg(dsn: str, schema: str = "public") -> asyncpg.Connection:
    """One connection with the same codecs as the pool (jsonb as raw bytes)."""
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    await _init_connection(conn)
    return conn
