"""A partition worker: take a batch, fold it, commit it in one transaction, ack, relay.

The consumer pushes commands in stream order. A new owner's consumer starts right after
the committed checkpoint, and redeliveries (after a stall past ack_wait) are at or below
it, where they are skipped. The checkpoint, not the ack, is what counts: acks only make
room for more.
"""

import asyncio
import datetime
import itertools
import sys
import time
from dataclasses import dataclass

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from events.bus import publish_raw
from events.feed import Feed
from events.meta import delivery
from events.subjects import command_msg_id, command_subject, event_subject
from events.topology import open_fold_consumer
from orchestrator.deciders import STATE_TYPES
from orchestrator.fold import Folded, Key, fold_message, job_subject
from orchestrator.metrics import ALERTS, BATCH_SECONDS, COMMANDS, DEAD_LETTERS, INTERNAL_ERRORS
from orchestrator.store import NOTHING, Batch, Lease, Span, Store
from schemas.codec import encode, printable
from schemas.ids import SYSTEM, is_valid_id
from schemas.outcomes import Outcome

log = structlog.get_logger()
QUIET_S = 0.05  # this long without a command, and relayed outbox rows are deleted
ACK_WAIT_S = 30.0
_PACK = msgspec.msgpack.Encoder()
_DECODERS = {kind: msgspec.msgpack.Decoder(cls) for kind, cls in STATE_TYPES.items()}


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    partitions: int
    batch: int = 500
    idle_s: float = 0.5
    heartbeat_s: float = 1.0  # the consumer's; three missed and the worker gives up
    # Entity states kept between batches: the ``decoded`` most recently used as they are,
    # the others encoded (an instance in half the memory with its key, a network in a
    # third; decoded again in microseconds when next needed); past ``cached`` in all, the
    # least recently used are forgotten and read back from the projection.
    cached: int = 50_000
    decoded: int = 1_000  # the hot ones: networks, hosts, the scheduler, fresh instances


def _outbox_rows(f: Folded, outcome_json: bytes) -> list[tuple]:
    """The messages a folded command sends: its outcome, its jobs, its follow-up commands."""
    assert f.outcome is not None and f.key is not None
    rows = [(f.seq, 0, event_subject(*f.key), f"evt-{f.seq}", outcome_json)]
    for job in f.jobs:  # one network's generation goes to every host it spans
        msg_id = f"job-{job.host}-{job.kind}-{job.id}-{job.generation}-{job.attempt}"
        rows.append((f.seq, len(rows), job_subject(job), msg_id, encode(job)))
    for cmd in f.commands:
        rows.append((f.seq, len(rows), command_subject(SYSTEM, cmd.kind, cmd.id),
                     command_msg_id(SYSTEM, cmd.kind, cmd.id, cmd.cmd_id), encode(cmd)))
    return rows


class PartitionWorker:
    def __init__(self, js: JetStreamContext, store: Store, replica: str, lease: Lease,
                 config: WorkerConfig) -> None:
        self.js, self.store, self.replica, self.lease = js, store, replica, lease
        self.config = config
        self.checkpoint = lease.checkpoint
        # Both least recently used first.
        self.states: dict[Key, object] = {}
        self.encoded: dict[Key, bytes] = {}
        self.log = log.bind(partition=lease.partition, epoch=lease.epoch, replica=replica)

    async def run(self) -> None:
        p = self.lease.partition
        await self._relay_leftovers()
        # Up to two batches in flight; acked once one is committed, so the next is always
        # free to come. Acks come well within ack_wait even when commands trickle in.
        feed = Feed(self.js._nc, self.config.heartbeat_s, ack_every=self.config.batch,
                    ack_within_s=ACK_WAIT_S / 6)
        # Outbox rows in this span of seqs are published, and not yet deleted.
        relayed = NOTHING
        # The previous batch's outbox, still being published while this one is folded.
        relaying: asyncio.Task[Span] | None = None
        try:
            # Inside the try: a consumer that fails to open (a cluster electing its leader,
            # say) must not leave the feed's subscription, and its interest, behind.
            await feed.open()
            await open_fold_consumer(self.js, p, self.lease.epoch, self.checkpoint,
                                     feed.subject, self.config.heartbeat_s,
                                     max_pending=2 * self.config.batch, ack_wait_s=ACK_WAIT_S)
            feed.consumer_created()
            self.log.info("partition_started", checkpoint=self.checkpoint)
            while True:
                # Relayed rows wait for the next commit to delete them, unless nothing
                # comes for a moment (then they are deleted by themselves).
                pending = relaying is not None or relayed != NOTHING
                msgs = await feed.take(self.config.batch,
                                       QUIET_S if pending else self.config.idle_s)
                if not msgs:
                    await feed.ack()
                    if relaying is not None:
                        relayed, relaying = relayed.join(await relaying), None
                    if relayed != NOTHING:
                        await self.store.delete_outbox(p, relayed)
                        relayed = NOTHING
                    continue
                after = self.checkpoint
                outbox = await self._fold_and_commit(msgs, relayed)
                relayed = NOTHING  # that commit deleted them
                await feed.committed(msgs[-1], len(msgs))
                if relaying is not None:  # in order: batch k is out before k + 1
                    relayed, relaying = await relaying, None
                if outbox:
                    relaying = asyncio.create_task(
                        self._relay(outbox, Span(after, self.checkpoint)))
        finally:
            if relaying is not None:
                relaying.cancel()
            await feed.close()

    async def _relay(self, outbox: list[tuple], span: Span) -> Span:
        await publish_raw(self.js, ((s, d, m) for _, _, s, m, d in outbox))
        return span

    async def _relay_leftovers(self) -> None:
        """A previous owner may have committed rows it never published: publish them now."""
        rows = await self.store.pending_outbox(self.lease.partition)
        if rows:
            await publish_raw(self.js, ((r["subject"], r["payload"], r["msg_id"]) for r in rows))
            await self.store.delete_outbox(self.lease.partition, Span(0, rows[-1]["seq"]))
            self.log.info("outbox_relayed", count=len(rows))

    async def _load(self, msgs: list[Msg]) -> None:
        wanted: dict[Key, None] = {}
        for msg in msgs:
            tokens = msg.subject.split(".")
            if len(tokens) != 5:
                continue
            # The kind interned: every cached state's key holds one, 100,000 copies otherwise.
            key = (sys.intern(tokens[3]), tokens[4])
            if (state := self.states.pop(key, None)) is not None:
                self.states[key] = state  # the most recently used now
            elif (raw := self.encoded.pop(key, None)) is not None:
                self.states[key] = _DECODERS[key[0]].decode(raw)
            # A name the fold refuses (any bytes may reach us) is never looked up.
            elif tokens[3] in STATE_TYPES and is_valid_id(key[1]):
                wanted[key] = None
        if wanted:
            for key, raw in (await self.store.load_states(list(wanted))).items():
                self.states[key] = msgspec.json.decode(raw, type=STATE_TYPES[key[0]])

    async def _fold_and_commit(self, msgs: list[Msg], relayed: Span) -> list[tuple]:
        started = time.perf_counter()
        partitions = self.config.partitions
        await self._load(msgs)
        batch = Batch([], [], [], [], self.checkpoint, relayed=relayed)
        # Only the outcomes are kept for the accounting: a Folded holds its jobs, and a
        # port bound on a network spanning 100 hosts emits 100 of them (~17 KB), which for
        # the batches of every partition in flight came to ~20 MB at 100,000 instances.
        outcomes: list[Outcome] = []
        bugs: list[Folded] = []  # messages the fold raised on
        changed: dict[Key, int] = {}
        for msg in msgs:
            d = delivery(msg.reply)
            if d.stream_seq <= batch.checkpoint:
                continue  # a redelivery of something already committed
            f = fold_message(self.states, msg.subject, msg.data, d.stream_seq, d.at_ms,
                             partitions)
            batch.checkpoint = d.stream_seq
            if f.dead_letter is not None:
                batch.dead_letters.append((f.seq, printable(msg.subject), f.dead_letter, msg.data,
                                           _timestamp(d.timestamp_ns)))
                self.log.warning("dead_letter", seq=f.seq, subject=printable(msg.subject),
                                 reason=f.dead_letter)
                if f.internal_error:
                    bugs.append(f)
            if f.outcome is None or f.key is None:
                continue
            outcomes.append(f.outcome)
            outcome_json = encode(f.outcome)
            batch.history.append((f.seq, f.key[0], f.key[1], outcome_json))
            batch.outbox.extend(_outbox_rows(f, outcome_json))
            if f.changed:
                changed[f.key] = f.seq
            if not f.outcome.accepted and f.dead_letter is None:
                self.log.info("rejected", seq=f.seq, cmd_id=f.outcome.cmd_id,
                              entity=f"{f.key[0]}/{f.key[1]}", reason=f.outcome.reason)
        batch.entities = [(k, i, encode(self.states[(k, i)]), seq)
                          for (k, i), seq in changed.items()]
        try:
            await self.store.commit(self.replica, self.lease, self.checkpoint, batch)
        except BaseException:
            # The states were folded in place: they are only true once committed.
            self.states.clear()
            self.encoded.clear()
            raise
        self.checkpoint = batch.checkpoint
        self._account(outcomes, len(batch.dead_letters), bugs, time.perf_counter() - started)
        self._trim()
        return batch.outbox

    def _trim(self) -> None:
        """Encode the states used longest ago, and forget the oldest of those: the
        projection has them, as committed."""
        cfg = self.config
        over = len(self.states) - min(cfg.decoded, cfg.cached)
        for key in list(itertools.islice(self.states, max(over, 0))):
            self.encoded[key] = _PACK.encode(self.states.pop(key))
        over = len(self.states) + len(self.encoded) - cfg.cached
        for key in list(itertools.islice(self.encoded, max(over, 0))):
            del self.encoded[key]

    def _account(self, outcomes: list[Outcome], dead: int, bugs: list[Folded],
                 seconds: float) -> None:
        """Metrics and alerts, for what is now committed."""
        BATCH_SECONDS.observe(seconds)
        DEAD_LETTERS.inc(dead)
        for f in bugs:  # rejected as an internal error: the partition went on, a bug remains
            kind, id_ = f.key or ("?", "?")
            INTERNAL_ERRORS.labels(kind).inc()
            self.log.error("alert", entity=f"{kind}/{id_}", seq=f.seq, reason=f.dead_letter)
        for o in outcomes:
            COMMANDS.labels(o.kind, "accepted" if o.accepted else "rejected").inc()
            if "Degraded" in o.events:
                ALERTS.labels(o.kind).inc()
                self.log.error("alert", entity=f"{o.kind}/{o.id}", seq=o.seq,
                               reason="retries ran out: entity degraded")


def _timestamp(ns: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC)
