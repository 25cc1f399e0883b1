"""Reading one partition: a push consumer (ack all), acked now and then.

Compared with fetching from a pull consumer, this saves the request and the status that
ends it, for every batch, and the ack of most batches: messages that each cost a wake-up
of two processes. The consumer's max_ack_pending bounds what waits here, so acks only
have to come before it is reached (and before ack_wait). Its idle heartbeats tell a live
consumer from one deleted under the feed.
"""

import asyncio

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from events.meta import delivery


class ConsumerGone(Exception):
    """The consumer stopped delivering: deleted by a newer owner, lost, or messages lost."""


class Feed:
    def __init__(self, nc: Client, heartbeat_s: float, ack_every: int,
                 ack_within_s: float) -> None:
        self._nc = nc
        self.subject = nc.new_inbox()
        self._heartbeat_s = heartbeat_s
        self._sub: Subscription | None = None
        self._queue: list[Msg] = []
        self._arrived = asyncio.Event()
        self._heard = 0.0  # loop time of the last message or heartbeat
        self._consumer_seq = 0  # of the last message taken: each must follow the previous
        self._ack_every, self._ack_within_s = ack_every, ack_within_s
        self._unacked: Msg | None = None  # the last message committed, not yet acked
        self._unacked_count = 0
        self._unacked_since = 0.0

    async def open(self) -> None:
        """Subscribe before the consumer exists, so its first message is not missed."""
        self._heard = asyncio.get_running_loop().time()
        # max_ack_pending bounds what is in flight; these limits only stay out of its way.
        self._sub = await self._nc.subscribe(self.subject, cb=self._on_msg,
                                             pending_msgs_limit=1_000_000,
                                             pending_bytes_limit=1024 * 1024 * 1024)

    def consumer_created(self) -> None:
        """Its heartbeats are due from now: creating it may take a while on a cluster."""
        self._heard = asyncio.get_running_loop().time()

    async def _on_msg(self, msg: Msg) -> None:
        self._heard = asyncio.get_running_loop().time()
        if not msg.headers or "Status" not in msg.headers:
            self._queue.append(msg)
            self._arrived.set()
        # else an idle heartbeat: hearing it is all it is for

    @property
    def buffered(self) -> int:
        """Messages received and not yet taken."""
        return len(self._queue)

    async def take(self, limit: int, timeout_s: float) -> list[Msg]:
        """Up to ``limit`` messages: at once if some are there, else the next within timeout.

        Raises ConsumerGone when neither a message nor a heartbeat came for three heartbeat
        intervals, or when a message was lost on the way.
        """
        loop = asyncio.get_running_loop()
        if not self._queue:
            self._arrived.clear()
            try:
                async with asyncio.timeout(timeout_s):  # unlike wait_for, makes no task
                    await self._arrived.wait()
            except TimeoutError:
                if loop.time() - self._heard > 3 * self._heartbeat_s:
                    raise ConsumerGone("no heartbeat from the consumer") from None
                return []
        msgs, self._queue = self._queue[:limit], self._queue[limit:]
        # Consumer sequences only grow on one subscription: the ends tell a gap.
        first = delivery(msgs[0].reply).consumer_seq
        last = delivery(msgs[-1].reply).consumer_seq if len(msgs) > 1 else first
        if first != self._consumer_seq + 1:
            raise ConsumerGone(f"message lost: got {first} after {self._consumer_seq}")
        if last - first != len(msgs) - 1:
            raise ConsumerGone(f"message lost: {len(msgs)} messages span {first}..{last}")
        self._consumer_seq = last
        return msgs

    async def committed(self, upto: Msg, count: int) -> None:
        """``count`` more messages, up to ``upto``, are committed: ack them, now or later."""
        now = asyncio.get_running_loop().time()
        if self._unacked is None:
            self._unacked_since = now
        self._unacked, self._unacked_count = upto, self._unacked_count + count
        if (self._unacked_count >= self._ack_every
                or now - self._unacked_since >= self._ack_within_s):
            await self.ack()

    async def ack(self) -> None:
        """Ack everything committed so far."""
        if self._unacked is not None:
            await self._unacked.ack()
            self._unacked, self._unacked_count = None, 0

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
