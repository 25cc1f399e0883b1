"""Singleton duties (liveness, reconciler) run in whichever replica holds an advisory lock.

The lock belongs to a PostgreSQL session: if the replica dies, its connection goes and
the lock with it, and the next replica to ask becomes the leader.
"""

import asyncpg
import structlog

from orchestrator.store import connect_pg

log = structlog.get_logger()
LEADER_LOCK = 7_316_001


class Leadership:
    def __init__(self, dsn: str, replica: str) -> None:
        self.dsn, self.replica = dsn, replica
        self.conn: asyncpg.Connection | None = None
        self.leader = False

    async def held(self) -> bool:
        try:
            if self.conn is None or self.conn.is_closed():
                self.conn, self.leader = await connect_pg(self.dsn), False
            if not self.leader:
                self.leader = await self.conn.fetchval("SELECT pg_try_advisory_lock($1)",
                                                       LEADER_LOCK)
                if self.leader:
                    log.info("leader_elected", replica=self.replica)
            return self.leader
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("leadership_lost", replica=self.replica, error=repr(exc))
            self.leader = False
            if self.conn is not None:
                self.conn.terminate()
                self.conn = None
            return False

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
