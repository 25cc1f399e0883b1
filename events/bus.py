"""Connecting to the bus, publishing commands, and reading a stream in order."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, NoStreamResponseError
from tenacity import stop_after_delay, wait_exponential_jitter

from events.meta import pending as pending_of
from events.pipeline import Frame, Pipeline, PubAck
from events.retry import retried
from events.subjects import CMD_STREAM, command_msg_id, command_subject
from schemas.codec import CommandError, decode_command, encode
from schemas.commands import FOLLOW_UP_PREFIX, Command
from schemas.ids import SYSTEM


def server_urls(url: str) -> list[str]:
    """``nats://a:4222,nats://b:4222``: a cluster's members, any of which will do."""
    return [part.strip() for part in url.split(",") if part.strip()]


class _Client(Client):
    """nats-py decodes every subject it receives as strict UTF-8, in its read loop: one
    stored command whose subject holds other bytes would end every subscription it
    reaches (a fold consumer's among them), each time it is redelivered. Decoded with
    surrogateescape it reaches the fold instead, which dead-letters it like any bad name.
    """

    def _build_message(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                       headers: dict[str, str] | None) -> Msg:
        return self.msg_class(subject=subject.decode(errors="surrogateescape"),
                              reply=reply.decode(), data=data, headers=headers,
                              _client=self, _sid=sid)


async def connect(url: str, name: str) -> Client:
    """A daemon's connection: reconnects forever, and says so in structured log events.

    Without callbacks nats-py prints every reconnect's traceback into the JSON logs.
    """
    # Imported here: the CLI's one-shot readers use this module (server_urls, read_stream)
    # but never this, and structlog costs their start-up ~45 ms (it imports rich).
    import structlog

    conn = structlog.get_logger().bind(connection=name)
    nc: Client

    async def error(exc: Exception) -> None:
        conn.warning("nats_error", error=f"{type(exc).__name__}: {exc}".rstrip(": "))

    async def disconnected() -> None:
        if not nc.is_closed:  # a close of our own also calls this
            conn.warning("nats_disconnected")

    async def reconnected() -> None:
        conn.info("nats_reconnected", server=str(nc.connected_url.netloc)
                  if nc.connected_url else None)

    nc = _Client()
    await nc.connect(
        server_urls(url), name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
        connect_timeout=5, allow_reconnect=True, error_cb=error,
        disconnected_cb=disconnected, reconnected_cb=reconnected,
    )
    return nc


def is_transient(exc: BaseException) -> bool:
    """Worth another try: the server is busy, restarting, or a stream leader is moving."""
    if isinstance(exc, APIError):
        return exc.code in (None, 503) or (exc.err_code or 0) in (10008,)
    return isinstance(exc, (nats.errors.TimeoutError, nats.errors.ConnectionClosedError,
                            nats.errors.NoRespondersError, NoStreamResponseError,
                            asyncio.TimeoutError))


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
    def _frame(source: str, cmd: Command) -> Frame:
        if source == SYSTEM and cmd.cmd_id.startswith(FOLLOW_UP_PREFIX):
            # Its Nats-Msg-Id could shadow a follow-up command within the dedupe window.
            raise CommandError(f"cmd_id prefix {FOLLOW_UP_PREFIX!r} is the fold's own on"
                               f" source {SYSTEM!r} at `$.cmd_id`")
        data = encode(cmd)
        decode_command(data)  # never append what the fold would reject as malformed
        return (command_subject(source, cmd.kind, cmd.id), data,
                command_msg_id(source, cmd.kind, cmd.id, cmd.cmd_id))

    async def publish(self, source: str, cmd: Command,
                      sent: Callable[[], Awaitable[None]] | None = None) -> Published:
        """Append one command; ``sent`` runs once, as soon as it is on its way."""
        [ack] = await publish_raw(self._js, [self._frame(source, cmd)], self._deadline_s, sent)
        return Published(ack.seq, ack.duplicate)

    async def publish_many(self, items: Iterable[tuple[str, Command]],
                           window: int = 2000) -> list[Published]:
        """Pipelined publishing, in order; a failed window is retried whole (dedupe allows it)."""
        frames = [self._frame(source, cmd) for source, cmd in items]
        results: list[Published] = []
        for start in range(0, len(frames), window):
            acks = await publish_raw(self._js, frames[start:start + window], self._deadline_s)
            results.extend(Published(a.seq, a.duplicate) for a in acks)
        return results


async def same_as_stored(js: JetStreamContext, seq: int, cmd: Command) -> bool:
    """Whether the command stored at ``seq`` is ``cmd``: a duplicate of a retry, and not
    an idempotency key reused for another command (which the server drops all the same)."""
    stored = await js.get_msg(CMD_STREAM, seq)
    try:
        return decode_command(stored.data) == cmd
    except CommandError:
        return False


async def publish_raw(js: JetStreamContext, frames: Iterable[Frame], deadline_s: float = 30.0,
                      sent: Callable[[], Awaitable[None]] | None = None) -> list[PubAck]:
    """Publish encoded messages (subject, payload, msg id) in order and await every ack.

    ``sent`` runs once, right after the first try that hands the messages to the connection.
    """
    frames = list(frames)
    pipeline = Pipeline.of(js._nc)
    pending = sent

    async def once() -> None:
        nonlocal pending
        if pending is not None:
            await pending()
            pending = None

    return await retried(lambda: pipeline.publish(frames, sent=once if sent else None),
                         transient=is_transient, stop=stop_after_delay(deadline_s),
                         wait=wait_exponential_jitter(multiplier=0.05, max=2.0, jitter=0.05))


async def read_stream(js: JetStreamContext, stream: str, subject: str, *, start_seq: int = 1,
                      follow: bool = False, batch: int = 1000) -> AsyncIterator[list[Msg]]:
    """Yield a stream's messages on ``subject`` in order, with no gap, in batches.

    An ordered push consumer: the server pushes with flow control, and the client
    recreates the consumer after the last message it saw if a sequence is ever missing.
    Without ``follow`` it stops at the end of what is stored now.
    """
    batches: asyncio.Queue[list[Msg] | None] = asyncio.Queue(maxsize=16)
    pending: list[Msg] = []

    async def collect(msg: Msg) -> None:
        nonlocal pending
        pending.append(msg)
        if len(pending) >= batch or pending_of(msg.reply) == 0:
            # A full queue blocks this callback, and flow control then slows the server.
            full, pending = pending, []
            await batches.put(full)
            if not follow and pending_of(full[-1].reply) == 0:
                await batches.put(None)

    config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                            opt_start_seq=start_seq)
    sub = await js.subscribe(subject, stream=stream, cb=collect, ordered_consumer=True,
                             config=config, pending_msgs_limit=4 * batch)
    try:
        if not follow:
            info = await sub.consumer_info()
            if info.num_pending == 0 and info.delivered.consumer_seq == 0:
                return  # nothing to read: no message will ever say it was the last
        while (msgs := await batches.get()) is not None:
            yield msgs
    finally:
        await sub.unsubscribe()


async def last_seq_at(js: JetStreamContext, stream: str, when: datetime) -> int:
    """The sequence of the last message stored at or before ``when``; 0 if there is none.

    The server finds the first message after ``when`` for a consumer that starts by time.
    """
    # A time with no zone is UTC, as everywhere on the bus.
    utc = when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)
    after = utc + timedelta(microseconds=1)
    config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME,
                            opt_start_time=after.isoformat().replace("+00:00", "Z"),
                            ack_policy=AckPolicy.NONE, inactive_threshold=60.0)
    last = (await js.stream_info(stream)).state.last_seq
    sub = await js.pull_subscribe("", stream=stream, config=config)
    name = None
    try:
        info = await sub.consumer_info()
        name = info.name
        if info.num_pending == 0:
            return last
        [msg] = await sub.fetch(1, timeout=5)
        return msg.metadata.sequence.stream - 1
    finally:
        await sub.unsubscribe()
        if name is not None:  # else its inactive_threshold removes it
            with contextlib.suppress(nats.errors.Error):  # must not hide the answer
                await js.delete_consumer(stream, name)
