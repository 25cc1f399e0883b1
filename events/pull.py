"""Fetching from a durable pull consumer: one request per batch, one callback per message.

nats-py's fetch waits for every message with its own task and timeout, and asks twice
when the consumer is idle; for the fold's thousands of small batches a second that is
most of the replica's time in asyncio.
"""

import asyncio
import json

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription


class ConsumerGone(Exception):
    """The consumer was deleted (a newer owner replaced it) or refuses the request."""


class Puller:
    def __init__(self, nc: Client, stream: str, consumer: str) -> None:
        self._nc = nc
        self._api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._msgs: list[Msg] = []
        self._want = 0
        self._done: asyncio.Future[None] | None = None

    async def _on_msg(self, msg: Msg) -> None:
        done = self._done
        status = msg.headers.get("Status") if msg.headers else None
        if status is None:
            self._msgs.append(msg)
            if len(self._msgs) >= self._want and done is not None and not done.done():
                done.set_result(None)
        elif status in ("404", "408"):  # no messages now / the long poll expired
            if done is not None and not done.done():
                done.set_result(None)
        elif status != "100" and done is not None and not done.done():  # 100: heartbeat
            description = msg.headers.get("Description", "") if msg.headers else ""
            done.set_exception(ConsumerGone(f"{status} {description}".strip()))

    async def fetch(self, batch: int, timeout_s: float) -> list[Msg]:
        """Up to ``batch`` messages: at once if some are there, else the next within timeout.

        One request: with both no_wait and expires, the server waits for a first message
        and ends the request (404) as soon as nothing more is there.
        """
        if self._sub is None:
            self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)
        self._msgs, self._want = [], batch
        self._done = asyncio.get_running_loop().create_future()
        body = {"batch": batch, "no_wait": True, "expires": int(timeout_s * 1e9)}
        await self._nc.publish(self._api, json.dumps(body).encode(), reply=self._inbox)
        await asyncio.wait_for(asyncio.shield(self._done), timeout_s + 5.0)
        msgs, self._msgs = self._msgs, []
        return msgs

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
