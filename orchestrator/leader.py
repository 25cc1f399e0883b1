"""Singleton duties (liveness, reconciler) run in whichever replica holds an advisory lock.

The lock belongs to a PostgreSQL session: if the replica dies, its connection goes and
the lock with it, and the next replica to ask becomes the leader. So does a restart of
PostgreSQL: a leader whose session is gone has lost the lock, and asks again on a new one.
"""

import asyncio

import asyncpg
import structlog

from orchestrator.store import connect_pg

log = structlog.get_logger()
LEADER_LOCK = 7_316_001
CLOSE_S = 2.0
# A session-level advisory lock on a bigint key, as pg_locks shows it (the key's high and
# low halves, objsubid 1), granted to this session.
_HOLDING = (
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"
    " AND classid = ($1::bigint >> 32)::oid AND objid = ($1::bigint & 4294967295)::oid"
    " AND objsubid = 1"
    " AND pid = pg_backend_pid() AND granted)"
)


class Leadership:
    def __init__(self, dsn: str, replica: str, timeout_s: float = 5.0) -> None:
        self.dsn, self.replica = dsn, replica
        self.timeout_s = timeout_s  # for an answer from PostgreSQL
        self.conn: asyncpg.Connection | None = None
        self.leader = False

    async def held(self) -> bool:
        """Whether this replica leads, asked of PostgreSQL every time: the lock's session
        may have died unnoticed (PostgreSQL restarted), and the lock with it."""
        try:
            async with asyncio.timeout(self.timeout_s):
                if self.conn is None or self.conn.is_closed():
                    self._lost("the lock's session is gone")
                    self.conn = await connect_pg(self.dsn)
                elif self.leader and not await self.conn.fetchval(_HOLDING, LEADER_LOCK):
                    self._lost("the lock's session no longer holds it")
                if not self.leader:
                    self.leader = await self.conn.fetchval("SELECT pg_try_advisory_lock($1)",
                                                           LEADER_LOCK)
                    if self.leader:
                        log.info("leader_elected", replica=self.replica)
            return self.leader
        except Exception as exc:
            # Refused, timed out, or a session that died in the middle (asyncpg raises
            # several kinds of error for that). One that failed may hold the lock still:
            # ending it lets another replica take over.
            if not self._lost(repr(exc)):
                log.warning("leadership_unavailable", replica=self.replica, error=repr(exc))
            if self.conn is not None:
                self.conn.terminate()
                self.conn = None
            return False

    def _lost(self, reason: str) -> bool:
        """Forget the lock; whether it was held."""
        was, self.leader = self.leader, False
        if was:
            log.warning("leadership_lost", replica=self.replica, reason=reason)
        return was

    async def close(self) -> None:
        if self.conn is not None:
            try:
                await self.conn.close(timeout=CLOSE_S)
            except Exception:  # PostgreSQL down or stuck: the session goes with the socket
                self.conn.terminate()
            self.conn = None
