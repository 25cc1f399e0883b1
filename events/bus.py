"""Connecting to the bus, publishing commands, and reading a stream in order."""

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import nats
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, NoStreamResponseError
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)

from events.meta import delivery
from events.subjects import command_subject
from schemas.codec import decode_command, encode
from schemas.commands import Command

log = structlog.get_logger()


async def connect(url: str, name: str) -> Client:
    return await nats.connect(
        url, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
        connect_timeout=5, allow_reconnect=True,
    )


def _transient(exc: BaseException) -> bool:
    """Worth another try: the server is busy, restarting, or a stream leader is moving."""
    if isinstance(exc, APIError):
        return exc.code in (None, 503) or (exc.err_code or 0) in (10008,)
    return isinstance(exc, (nats.errors.TimeoutError, nats.errors.ConnectionClosedError,
                            nats.errors.NoRespondersError, NoStreamResponseError,
                            asyncio.TimeoutError))


def _retrying(deadline_s: float) -> AsyncRetrying:
    return AsyncRetrying(
        retry=retry_if_exception(_transient),
        wait=wait_exponential_jitter(multiplier=0.05, max=2.0, jitter=0.05),
        stop=stop_after_delay(deadline_s),
        reraise=True,
    )


@dataclass(frozen=True, slots=True)
class Published:
    seq: int
    duplicate: bool


class Publisher:
    """Appends commands to CMD: validated, deduplicated by cmd_id, retried while transient."""

    def __init__(self, js: JetStreamContext, deadline_s: float = 30.0) -> None:
        self._js = js
        self._deadline_s = deadline_s

    @staticmethod
    def _frame(source: str, cmd: Command) -> tuple[str, bytes, dict[str, str]]:
        data = encode(cmd)
        decode_command(data)  # never append what the fold would reject as malformed
        return command_subject(source, cmd.kind, cmd.id), data, {"Nats-Msg-Id": cmd.cmd_id}

    async def publish(self, source: str, cmd: Command) -> Published:
        subject, data, headers = self._frame(source, cmd)
        async for attempt in _retrying(self._deadline_s):
            with attempt:
                ack = await self._js.publish(subject, data, headers=headers, timeout=5)
        return Published(ack.seq, bool(ack.duplicate))

    async def publish_many(self, items: Iterable[tuple[str, Command]],
                           window: int = 2000) -> list[Published]:
        """Pipelined publishing, in order; a failed window is retried whole (dedupe allows it)."""
        frames = [self._frame(source, cmd) for source, cmd in items]
        results: list[Published] = []
        for start in range(0, len(frames), window):
            chunk = frames[start:start + window]
            async for attempt in _retrying(self._deadline_s):
                with attempt:
                    futures = [await self._js.publish_async(s, d, headers=h) for s, d, h in chunk]
                    acks = await asyncio.gather(*futures)
            results.extend(Published(a.seq, bool(a.duplicate)) for a in acks)
        return results


async def publish_raw(js: JetStreamContext, frames: Iterable[tuple[str, bytes, str]],
                      deadline_s: float = 30.0) -> int:
    """Publish already-encoded messages (subject, payload, msg id) and wait for every ack."""
    count = 0
    frames = list(frames)
    async for attempt in _retrying(deadline_s):
        with attempt:
            futures = [
                await js.publish_async(s, d, headers={"Nats-Msg-Id": m}) for s, d, m in frames
            ]
            await asyncio.gather(*futures)
            count = len(futures)
    return count


async def read_stream(js: JetStreamContext, stream: str, subject: str, *, start_seq: int = 1,
                      follow: bool = False, batch: int = 1000,
                      idle_s: float = 1.0) -> AsyncIterator[list[Msg]]:
    """Yield a stream's messages on ``subject`` in order, with no gap, in batches.

    Without ``follow`` it stops at the end of what is stored now. A gap in consumer
    sequences (a message lost in transit) restarts the read after the last one yielded.
    """
    next_seq = start_seq
    while True:
        config = ConsumerConfig(
            filter_subject=subject, ack_policy=AckPolicy.NONE, mem_storage=True,
            inactive_threshold=30.0,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=next_seq,
        )
        sub = await js.pull_subscribe(subject, stream=stream, config=config)
        try:
            expected = 1
            if not follow and (await sub.consumer_info()).num_pending == 0:
                return
            while True:
                try:
                    msgs = await sub.fetch(batch, timeout=idle_s)
                except nats.errors.TimeoutError:
                    continue
                gap = False
                for i, msg in enumerate(msgs):
                    d = delivery(msg.reply)
                    if d.consumer_seq != expected:
                        msgs, gap = msgs[:i], True
                        break
                    expected += 1
                    next_seq = d.stream_seq + 1
                if msgs:
                    yield msgs
                if gap:
                    log.warning("read_gap", stream=stream, subject=subject, resume=next_seq)
                    break
                if not follow and msgs and delivery(msgs[-1].reply).pending == 0:
                    return
        finally:
            await sub.unsubscribe()
