"""Messages the CMD stream stored outside every partition: the leader dead-letters them.

The server's partition transform maps only subjects whose tokens are all literal, so a
publish on ``cmd.user.instance.*`` is stored as it was, where no partition's consumer
reads. One durable consumer takes exactly those (events.topology); the leader folds each
(fold_message makes it a dead letter, saying why), records it, and acks it after the
commit. Then every stored message is folded or dead-lettered.
"""

import datetime

import asyncpg
from nats.js import JetStreamContext

from events.meta import delivery
from events.subjects import CMD_STREAM
from events.topology import open_unpartitioned_consumer
from orchestrator.fold import fold_message
from schemas.codec import printable

BATCH = 100
WAIT_S = 0.05  # a fetch waits this long when there is nothing: most ticks


class Strays:
    def __init__(self, js: JetStreamContext, partitions: int) -> None:
        self.js, self.partitions = js, partitions
        self._sub: JetStreamContext.PullSubscription | None = None

    async def tick(self, conn: asyncpg.Connection) -> int:
        """Dead-letter what came since the last tick; how many."""
        if self._sub is None:
            name = await open_unpartitioned_consumer(self.js)
            self._sub = await self.js.pull_subscribe_bind(name, stream=CMD_STREAM)
        try:
            msgs = await self._sub.fetch(BATCH, timeout=WAIT_S)
        except TimeoutError:  # nats-py's own, or asyncio's when the server is slow to answer
            return 0
        rows = []
        for msg in msgs:
            d = delivery(msg.reply)
            folded = fold_message({}, msg.subject, msg.data, d.stream_seq, d.at_ms,
                                  self.partitions)
            at = datetime.datetime.fromtimestamp(d.timestamp_ns / 1e9, datetime.UTC)
            rows.append((d.stream_seq, printable(msg.subject),
                         folded.dead_letter or "not addressed to any partition", msg.data, at))
        # Idempotent: a redelivery after a commit whose ack was lost changes nothing.
        await conn.executemany(
            "INSERT INTO dead_letters (seq, subject, reason, payload, at)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (seq) DO NOTHING", rows)
        for msg in msgs:
            await msg.ack()
        return len(msgs)
