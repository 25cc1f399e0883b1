"""Reading one entity's commands back from CMD, by its stored subject."""

import contextlib

from nats.js import JetStreamContext

from events.bus import read_stream
from events.meta import delivery
from events.subjects import CMD_STREAM
from orchestrator.history import Stored


def entity_filter(kind: str, id_: str) -> str:
    """Every stored command of one entity, whatever its partition and source."""
    return f"cmd.*.*.{kind}.{id_}"


async def read_entity(js: JetStreamContext, kind: str, id_: str, to_seq: int | None = None,
                      start_seq: int = 1, limit: int | None = None) -> list[Stored]:
    """The entity's stored commands from ``start_seq`` up to ``to_seq`` (None: all), in
    order; the first ``limit`` of them if given."""
    out: list[Stored] = []
    stream = read_stream(js, CMD_STREAM, entity_filter(kind, id_), start_seq=start_seq)
    async with contextlib.aclosing(stream):
        async for msgs in stream:
            for msg in msgs:
                d = delivery(msg.reply)
                if to_seq is not None and d.stream_seq > to_seq:
                    return out
                out.append(Stored(d.stream_seq, d.at_ms, msg.subject, msg.data))
                if len(out) == limit:
                    return out
    return out
