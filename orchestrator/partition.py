"""A partition worker: fetch a batch, fold it, commit it in one transaction, ack, relay.

It fetches again only once the previous batch is committed and acked, so the consumer
hands it commands strictly in stream order and redeliveries are always at or below the
checkpoint, where they are skipped.
"""

import asyncio
import datetime
import time
from dataclasses import dataclass

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from events.bus import publish_raw
from events.meta import delivery
from events.pull import Puller
from events.subjects import CMD_STREAM, command_subject, event_subject
from events.topology import open_fold_consumer
from orchestrator.deciders import STATE_TYPES
from orchestrator.fold import Folded, Key, fold_message, job_subject
from orchestrator.metrics import ALERTS, BATCH_SECONDS, COMMANDS, DEAD_LETTERS
from orchestrator.store import Batch, Lease, Store
from schemas.codec import encode
from schemas.ids import SYSTEM

log = structlog.get_logger()
QUIET_S = 0.05  # this long without a command, and relayed outbox rows are deleted


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    partitions: int
    batch: int = 500
    idle_s: float = 0.5


def _outbox_rows(partition: int, f: Folded, outcome_json: bytes) -> list[tuple]:
    """The messages a folded command sends: its outcome, its jobs, its follow-up commands."""
    assert f.outcome is not None and f.key is not None
    rows = [(partition, f.seq, 0, event_subject(*f.key), f"evt-{f.seq}", outcome_json)]
    for job in f.jobs:
        rows.append((partition, f.seq, len(rows), job_subject(job),
                     f"job-{job.kind}-{job.id}-{job.generation}-{job.attempt}", encode(job)))
    for cmd in f.commands:
        rows.append((partition, f.seq, len(rows), command_subject(SYSTEM, cmd.kind, cmd.id),
                     cmd.cmd_id, encode(cmd)))
    return rows


class PartitionWorker:
    def __init__(self, js: JetStreamContext, store: Store, replica: str, lease: Lease,
                 config: WorkerConfig) -> None:
        self.js, self.store, self.replica, self.lease = js, store, replica, lease
        self.config = config
        self.checkpoint = lease.checkpoint
        self.states: dict[Key, object] = {}
        self.known: set[Key] = set()  # keys looked up in the store, present or not
        self.log = log.bind(partition=lease.partition, epoch=lease.epoch, replica=replica)

    async def run(self) -> None:
        p = self.lease.partition
        await self._relay_leftovers()
        name = await open_fold_consumer(self.js, p, self.lease.epoch, self.checkpoint,
                                        max_pending=self.config.batch)
        sub = Puller(self.js._nc, CMD_STREAM, name)
        self.log.info("partition_started", checkpoint=self.checkpoint)
        relayed = 0  # outbox rows up to this seq are published, and not yet deleted
        # The previous batch's outbox, still being published while this one is folded.
        relaying: asyncio.Task[int] | None = None
        try:
            while True:
                # Relayed rows wait for the next commit to delete them, unless nothing
                # comes for a moment (then they are deleted by themselves).
                pending = relaying is not None or relayed > 0
                msgs = await sub.fetch(self.config.batch,
                                       QUIET_S if pending else self.config.idle_s)
                if not msgs:
                    if relaying is not None:
                        relayed, relaying = await relaying, None
                    if relayed:
                        await self.store.delete_outbox(p, relayed)
                        relayed = 0
                    continue
                outbox = await self._fold_and_commit(msgs, relayed)
                relayed = 0  # that commit deleted them
                if relaying is not None:  # in order: batch k is out before k + 1
                    relayed, relaying = await relaying, None
                if outbox:
                    relaying = asyncio.create_task(self._relay(outbox, self.checkpoint))
        finally:
            if relaying is not None:
                relaying.cancel()
            await sub.close()

    async def _relay(self, outbox: list[tuple], upto: int) -> int:
        await publish_raw(self.js, ((s, d, m) for _, _, _, s, m, d in outbox))
        return upto

    async def _relay_leftovers(self) -> None:
        """A previous owner may have committed rows it never published: publish them now."""
        rows = await self.store.pending_outbox(self.lease.partition)
        if rows:
            await publish_raw(self.js, ((r["subject"], r["payload"], r["msg_id"]) for r in rows))
            await self.store.delete_outbox(self.lease.partition, rows[-1]["seq"])
            self.log.info("outbox_relayed", count=len(rows))

    async def _load(self, msgs: list[Msg]) -> None:
        wanted: list[Key] = []
        for msg in msgs:
            tokens = msg.subject.split(".")
            if len(tokens) == 5:
                key = (tokens[3], tokens[4])
                if key not in self.known and tokens[3] in STATE_TYPES:
                    wanted.append(key)
                    self.known.add(key)
        if wanted:
            for key, raw in (await self.store.load_states(wanted)).items():
                self.states[key] = msgspec.json.decode(raw, type=STATE_TYPES[key[0]])

    async def _fold_and_commit(self, msgs: list[Msg], relayed: int) -> list[tuple]:
        started = time.perf_counter()
        p, partitions = self.lease.partition, self.config.partitions
        await self._load(msgs)
        batch = Batch([], [], [], [], self.checkpoint, relayed_upto=relayed)
        folded: list[Folded] = []
        changed: dict[Key, int] = {}
        bad: list[Msg] = []
        for msg in msgs:
            d = delivery(msg.reply)
            if d.stream_seq <= batch.checkpoint:
                continue  # a redelivery of something already committed
            f = fold_message(self.states, msg.subject, msg.data, d.stream_seq, d.at_ms,
                             partitions)
            batch.checkpoint = d.stream_seq
            if f.dead_letter is not None:
                bad.append(msg)
                batch.dead_letters.append((f.seq, msg.subject, f.dead_letter, msg.data,
                                           _timestamp(d.timestamp_ns)))
                self.log.warning("dead_letter", seq=f.seq, subject=msg.subject,
                                 reason=f.dead_letter)
            if f.outcome is None or f.key is None:
                continue
            folded.append(f)
            outcome_json = encode(f.outcome)
            batch.history.append((f.seq, f.key[0], f.key[1], outcome_json))
            batch.outbox.extend(_outbox_rows(p, f, outcome_json))
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
            self.known.clear()
            raise
        self.checkpoint = batch.checkpoint
        # The consumer acks all: a term (for the unusable) or an ack covers what precedes it.
        for msg in bad:
            await msg.term()
        if not bad or bad[-1] is not msgs[-1]:
            await msgs[-1].ack()
        self._account(folded, len(batch.dead_letters), time.perf_counter() - started)
        return batch.outbox

    def _account(self, folded: list[Folded], dead: int, seconds: float) -> None:
        """Metrics and alerts, for what is now committed."""
        BATCH_SECONDS.observe(seconds)
        DEAD_LETTERS.inc(dead)
        for f in folded:
            assert f.outcome is not None
            COMMANDS.labels(f.outcome.kind, "accepted" if f.outcome.accepted else "rejected").inc()
            if "Degraded" in f.outcome.events:
                ALERTS.labels(f.outcome.kind).inc()
                self.log.error("alert", entity=f"{f.outcome.kind}/{f.outcome.id}", seq=f.seq,
                               reason="retries ran out: entity degraded")


def _timestamp(ns: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC)
