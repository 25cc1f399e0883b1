"""Reading one entity's commands back from CMD, by its stored subject."""

import contextlib
from collections.abc import AsyncIterator

from nats.js import JetStreamContext

from events.bus import read_stream
from events.meta import delivery
from events.subjects import CMD_STREAM
from orchestrator.history import Stored


def entity_filter(kind: str, id_: str) -> str:
    """Every stored command of one entity, whatever its partition and source."""
    return f"cmd.*.*.{kind}.{id_}"


async def entity_batches(js: JetStreamContext, kind: str, id_: str,
                         start_seq: int = 1) -> AsyncIterator[list[Stored]]:
    """The entity's stored commands from ``start_seq`` to the end, in order, a batch at a
    time as the server sends them: each can be folded while the next is on its way."""
    stream = read_stream(js, CMD_STREAM, entity_filter(kind, id_), start_seq=start_seq)
    async with contextlib.aclosing(stream):
        async for msgs in stream:
            batch = []
            for msg in msgs:
                d = delivery(msg.reply)
                batch.append(Stored(d.stream_seq, d.at_ms, msg.subject, msg.data))
            yield batch


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
