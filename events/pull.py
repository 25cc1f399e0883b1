"""Fetching from a durable pull consumer with one callback per message.

nats-py's fetch waits for every message with its own task and timeout; for the fold's
tens of thousands of messages a second that is most of the replica's time in asyncio.
Here: a no-wait request takes what is there; when nothing is, a one-message long poll
waits for the next, and a no-wait request takes what came with it.
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

    async def _request(self, batch: int, timeout_s: float | None) -> list[Msg]:
        if self._sub is None:
            self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)
        self._msgs, self._want = [], batch
        self._done = asyncio.get_running_loop().create_future()
        body = ({"batch": batch, "no_wait": True} if timeout_s is None
                else {"batch": batch, "expires": int(timeout_s * 1e9)})
        await self._nc.publish(self._api, json.dumps(body).encode(), reply=self._inbox)
        wait = 5.0 if timeout_s is None else timeout_s + 1.0
        await asyncio.wait_for(asyncio.shield(self._done), wait)
        msgs, self._msgs = self._msgs, []
        return msgs

    async def ready(self, batch: int) -> list[Msg]:
        """Up to ``batch`` messages that are there now, without waiting for more."""
        return await self._request(batch, None)

    async def fetch(self, batch: int, timeout_s: float) -> list[Msg]:
        """Up to ``batch`` messages: what is there now, else the next ones within timeout."""
        msgs = await self._request(batch, None)
        return msgs or await self.wait(batch, timeout_s)

    async def wait(self, batch: int, timeout_s: float) -> list[Msg]:
        """The next message within timeout, and up to ``batch - 1`` that came with it."""
        first = await self._request(1, timeout_s)
        if not first or batch == 1:
            return first
        return first + await self._request(batch - 1, None)

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
