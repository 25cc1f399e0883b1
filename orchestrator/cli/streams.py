"""What the timeline verbs read from the log beside the projection: what each command of an
entity changed, folded again, and outcomes as EVT stores them, for --follow."""

from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext

from events.subjects import EVT_STREAM
from orchestrator import queries
from orchestrator.history import Change, EntityFold, Step, diff
from orchestrator.logreader import fed
from schemas.outcomes import Outcome


class Changes:
    """What each command of one entity changed, from its commands folded again in order."""

    def __init__(self, js: JetStreamContext, kind: str, id_: str, partitions: int) -> None:
        self.js = js
        self.fold = EntityFold((kind, id_), partitions)
        self.steps: dict[int, Step] = {}

    async def read(self) -> None:
        """Everything stored after what was read so far, folded as it comes."""
        async for step in fed(self.js, self.fold):
            self.steps[step.folded.seq] = step

    async def of(self, outcome: Outcome) -> list[Change]:
        if outcome.seq > self.fold.read_upto:  # a followed outcome: read on
            await self.read()
        step = self.steps.pop(outcome.seq, None)
        if step is None or not step.folded.changed:
            return []
        return diff(step.before, step.after)


async def follow_outcomes(nc: Client, subject: str, after_seq: int,
                          emit: Callable[[Outcome], Awaitable[None]]) -> None:
    """Outcomes published on EVT after ``after_seq`` (a relay may repeat one: skip it)."""
    from events.bus import read_stream  # here: it imports structlog, which tail --diff needs not

    last = after_seq
    async for msgs in read_stream(nc.jetstream(), EVT_STREAM, subject, follow=True):
        for msg in msgs:
            try:
                outcome = queries.decode_outcome(msg.data)
            except msgspec.DecodeError:
                continue  # not an outcome: nothing a timeline can show
            if outcome.seq > last:
                last = outcome.seq
                await emit(outcome)


async def follow_events(js: JetStreamContext, subject: str, start_seq: int,
                        emit: Callable[[Outcome], Awaitable[None]]) -> None:
    """Every outcome EVT stores on ``subject`` from ``start_seq`` on, as it comes."""
    from events.bus import read_stream

    async for msgs in read_stream(js, EVT_STREAM, subject, start_seq=start_seq, follow=True):
        for msg in msgs:
            try:
                outcome = queries.decode_outcome(msg.data)
            except msgspec.DecodeError:
                continue
            await emit(outcome)
