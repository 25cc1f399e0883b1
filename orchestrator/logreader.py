"""Reading one entity's commands back from CMD, by its stored subject.

A history of 10,000 commands is read in ~0.1 s: a pull consumer asked for a chunk at a
time, a few chunks ahead, whose messages reach the reader raw. Through nats-py's own
subscription each message cost ~20 us of this process (its headers parsed, a Msg built,
queued and sequence-checked for an ordered consumer), more than the server took to send it.
"""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import asyncpg
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from events.meta import delivery
from events.subjects import CMD_STREAM, cmd_partitions, partition_of
from orchestrator import snapshots
from orchestrator.history import EntityFold, Step, Stored

CHUNK = 2000  # messages per pull request, and per batch handed on
AHEAD = 2  # pull requests outstanding: the server never waits for the next one
STALL_S = 10.0  # no message for this long: the server or the connection is gone
CONSUMER_ORPHANED_S = 30.0  # the server deletes a consumer a crashed reader left

# What a subscription given to LogClient.take_raw receives: subject, reply, data, headers.
RawSink = Callable[[bytes, bytes, bytes, bytes], None]


class LogClient(Client):
    """nats-py's client, where a subscription may take its messages as the parser gives
    them: no Msg, no header parsing, no queue. The subscription must stay open meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self._raw: dict[int, RawSink] = {}

    def take_raw(self, sid: int, sink: RawSink | None) -> None:
        if sink is None:
            self._raw.pop(sid, None)
        else:
            self._raw[sid] = sink

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes) -> None:
        sink = self._raw.get(sid)
        if sink is None:
            await super()._process_msg(sid, subject, reply, data, headers)
        else:
            sink(subject, reply, data, headers)


@dataclass(frozen=True, slots=True)
class Log:
    partitions: int
    first_seq: int
    last_seq: int


async def log_info(js: JetStreamContext) -> Log:
    """CMD as it is now, read without creating anything. (events.topology's
    ensure_topology creates what is missing, in four round trips, and importing it costs a
    verb ~70 ms: structlog, rich and tenacity.)"""
    try:
        info = await js.stream_info(CMD_STREAM)
    except NotFoundError:
        raise LookupError(f"no {CMD_STREAM} stream on this server: nothing was published"
                          " yet") from None
    return Log(cmd_partitions(info.config), info.state.first_seq, info.state.last_seq)


def entity_filter(kind: str, id_: str) -> str:
    """Every stored command of one entity, whatever its partition and source."""
    return f"cmd.*.*.{kind}.{id_}"


class _Chunks:
    """Collects a pull consumer's deliveries into batches, checking that none is missing."""

    def __init__(self, total: int) -> None:
        self.total = total  # what the consumer had to deliver when created
        self.received = 0
        self.queue: asyncio.Queue[list[Stored] | BaseException | None] = asyncio.Queue()
        self._batch: list[Stored] = []

    def take(self, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        if not reply:  # a status (no data: 408, 409), for the pull request
            status = headers.split(b"\r\n", 1)[0].decode(errors="replace")
            self.queue.put_nowait(RuntimeError(f"reading {CMD_STREAM}: {status}"))
            return
        tokens = reply.split(b".")
        if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<n>.<sseq>.<cseq>.<ts>.<pending>
            seq, cseq, at_ms, pending = (int(tokens[5]), int(tokens[6]),
                                         int(tokens[7]) // 1_000_000, int(tokens[8]))
        else:  # with a domain
            d = delivery(reply.decode())
            seq, cseq, at_ms, pending = d.stream_seq, d.consumer_seq, d.at_ms, d.pending
        self.received += 1
        if cseq != self.received:
            self.queue.put_nowait(RuntimeError(
                f"reading {CMD_STREAM}: delivery {cseq} where {self.received} was due"))
            return
        self._batch.append(Stored(seq, at_ms, subject.decode(errors="surrogateescape"), data))
        last = pending == 0 or self.received == self.total
        if last or len(self._batch) == CHUNK:
            self.queue.put_nowait(self._batch)
            self._batch = []
        if last:
            self.queue.put_nowait(None)


async def entity_batches(js: JetStreamContext, kind: str, id_: str,
                         start_seq: int = 1) -> AsyncIterator[list[Stored]]:
    """The entity's stored commands from ``start_seq`` to the end of what is stored now, in
    order, a batch at a time as the server sends them: each can be folded while the next is
    on its way. ``js`` must be of a LogClient's connection."""
    nc = js._nc
    assert isinstance(nc, LogClient), "entity_batches reads through a LogClient"
    info = await js.add_consumer(CMD_STREAM, ConsumerConfig(
        filter_subject=entity_filter(kind, id_), deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start_seq, ack_policy=AckPolicy.NONE, mem_storage=True,
        inactive_threshold=CONSUMER_ORPHANED_S))
    chunks = _Chunks(info.num_pending)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    nc.take_raw(sub._id, chunks.take)
    next_request = f"$JS.API.CONSUMER.MSG.NEXT.{CMD_STREAM}.{info.name}"
    requested = 0

    async def ask() -> None:
        nonlocal requested
        size = min(CHUNK, chunks.total - requested)
        if size > 0:
            await nc.publish(next_request, json.dumps({"batch": size}).encode(), reply=inbox)
            requested += size

    try:
        for _ in range(AHEAD):
            await ask()
        while chunks.total:
            try:
                got = await asyncio.wait_for(chunks.queue.get(), STALL_S)
            except TimeoutError:
                raise RuntimeError(f"reading {CMD_STREAM}: nothing for {STALL_S:g} s") from None
            if got is None:
                return
            if isinstance(got, BaseException):
                raise got
            await ask()
            yield got
    finally:
        nc.take_raw(sub._id, None)
        with contextlib.suppress(Exception):  # the answer stands; the server cleans up
            await sub.unsubscribe()
            await js.delete_consumer(CMD_STREAM, info.name)


async def read_entity(js: JetStreamContext, kind: str, id_: str, to_seq: int | None = None,
                      start_seq: int = 1, limit: int | None = None) -> list[Stored]:
    """The entity's stored commands from ``start_seq`` up to ``to_seq`` (None: all), in
    order; the first ``limit`` of them if given."""
    out: list[Stored] = []
    batches = entity_batches(js, kind, id_, start_seq)
    async with contextlib.aclosing(batches):
        async for batch in batches:
            for m in batch:
                if to_seq is not None and m.seq > to_seq:
                    return out
                out.append(m)
                if len(out) == limit:
                    return out
    return out


async def resumed_fold(conn: asyncpg.Connection, kind: str, id_: str, partitions: int,
                       upto: int, states: bool = True) -> EntityFold:
    """The entity's fold, unfed, as of the snapshot of the current code whose checkpoint of
    its partition is the latest at or before ``upto``; without one, from its beginning."""
    fold = EntityFold((kind, id_), partitions, states)
    start = await snapshots.entity_start(conn, kind, id_, partition_of(kind, id_, partitions),
                                         partitions, upto)
    if start is not None:
        fold.resume(start.checkpoint, start.state, start.last_seq)
    return fold


async def fed(js: JetStreamContext, fold: EntityFold,
              to_seq: int | None = None) -> AsyncIterator[Step]:
    """Feed ``fold`` its entity's commands after those it was fed, up to ``to_seq`` (None:
    all stored now), each batch while CMD sends the next; its steps."""
    if to_seq is not None and to_seq <= fold.read_upto:
        return
    kind, id_ = fold.key
    batches = entity_batches(js, kind, id_, fold.read_upto + 1)
    async with contextlib.aclosing(batches):
        async for batch in batches:
            past = to_seq is not None and batch[-1].seq > to_seq
            for step in fold.feed(m for m in batch if not past or m.seq <= to_seq):
                yield step
            if past:
                return
