"""Pipelined JetStream publishing: many messages out, then all their acks awaited together.

nats-py's publish_async parses every ack with json and a dataclass and guards each publish
with a timed semaphore; for the relay's thousands of messages a second that overhead is
most of the cost. Here the acks arrive on one wildcard inbox and msgspec decodes them.
"""

import asyncio
import itertools
import weakref
from collections.abc import Awaitable, Callable, Sequence

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import APIError

Frame = tuple[str, bytes, str]  # subject, payload, Nats-Msg-Id


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_ack = msgspec.json.Decoder(PubAck)
_pipelines: weakref.WeakKeyDictionary[Client, "Pipeline"] = weakref.WeakKeyDictionary()


class Pipeline:
    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox()
        self._tokens = itertools.count()
        self._waiting: dict[str, asyncio.Future[PubAck]] = {}
        self._started = False

    @classmethod
    def of(cls, nc: Client) -> "Pipeline":
        """One pipeline (and one ack subscription) per connection."""
        pipeline = _pipelines.get(nc)
        if pipeline is None:
            pipeline = _pipelines[nc] = cls(nc)
        return pipeline

    async def _on_ack(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject.rpartition(".")[2], None)
        if future is None or future.done():
            return
        if not msg.data:  # a status message: no stream answers for the subject (yet)
            status = (msg.headers or {}).get("Status", "503")
            future.set_exception(APIError(code=int(status), description="no responders"))
            return
        ack = _ack.decode(msg.data)
        if ack.error is not None:
            future.set_exception(APIError(code=ack.error.code, err_code=ack.error.err_code,
                                          description=ack.error.description))
        else:
            future.set_result(ack)

    async def publish(self, frames: Sequence[Frame], timeout_s: float = 10.0,
                      sent: Callable[[], Awaitable[None]] | None = None) -> list[PubAck]:
        """Publish every frame in order; return their acks, or raise the first failure.

        ``sent`` runs once the frames are handed to the connection, before their acks are
        awaited: what it publishes leaves in the same write.
        """
        if not self._started:
            await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_ack)
            self._started = True
        loop = asyncio.get_running_loop()
        tokens, futures = [], []
        try:
            for subject, data, msg_id in frames:
                token = str(next(self._tokens))
                future = self._waiting[token] = loop.create_future()
                tokens.append(token)
                futures.append(future)
                await self._nc.publish(subject, data, reply=f"{self._prefix}.{token}",
                                       headers={"Nats-Msg-Id": msg_id})
            if sent is not None:
                await sent()
            return await asyncio.wait_for(asyncio.gather(*futures), timeout_s)
        finally:
            for token in tokens:
                self._waiting.pop(token, None)
