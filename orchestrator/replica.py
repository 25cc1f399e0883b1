"""An orchestrator replica: holds partition leases in PostgreSQL and runs their workers.

Every tick it heartbeats, renews its leases, stops workers whose lease was lost, gives
partitions back when it holds more than its share, and claims free or expired ones.
A SIGKILLed replica's leases expire after ``lease_s`` and the others take them over.

PostgreSQL may go away and come back (a crash, a restart): a tick that fails is logged
and tried again on the next, and workers that failed meanwhile are reclaimed. Leases are
only proven by a renewal: ``lease_s`` after the last one began, by this process's own
monotonic clock, others may own the partitions, so the workers stop then (their commits
would be fenced anyway, but they would still hold consumers, acks and outboxes). Once
the server is back, if it restarted, every worker starts again from what it has: a crash
may have lost commits it had acknowledged.
"""

import asyncio
import contextlib
import datetime
import functools
import math
import os
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import structlog
from nats.js import JetStreamContext

from events.bus import Publisher, connect
from events.subjects import CMD_STREAM
from events.topology import ensure_topology
from orchestrator.leader import Leadership
from orchestrator.liveness import Liveness
from orchestrator.partition import PartitionWorker, WorkerConfig
from orchestrator.reconciler import Reconciler, ReconcilerConfig
from orchestrator.snapshots import Schedule
from orchestrator.store import Lease, Store, create_pool
from orchestrator.strays import Strays

T = TypeVar("T")
log = structlog.get_logger()
STOP_STEP_S = 2.0  # what a step of a replica's stop may take with PostgreSQL unreachable


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    nats_url: str
    pg_dsn: str
    replica_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    partitions: int | None = None  # None: whatever the CMD stream was created with
    lease_s: float = 5.0
    tick_s: float = 1.0
    batch: int = 500
    cached: int = 50_000  # entity states per partition, see WorkerConfig
    down_after_s: float = 5.0  # silence after which a host is declared down
    reconcile: ReconcilerConfig = field(default_factory=ReconcilerConfig)
    snapshot_every_s: float | None = 3600.0  # the leader's; None: never by itself
    snapshot_keep: int = 2


async def _same_history(js: JetStreamContext, store: Store) -> None:
    """Refuse a projection folded from another CMD stream (a store lost or swapped): each
    partition would go on from a checkpoint that means nothing here, skipping commands."""
    folded = await store.folded_upto()
    stored = (await js.stream_info(CMD_STREAM)).state.last_seq
    if folded > stored:
        raise RuntimeError(
            f"the projection has folded {CMD_STREAM} up to seq {folded}, but the stream ends"
            f" at {stored}: it was folded from another store. Restore that store, or fold"
            " this one into a new database")


class Replica:
    def __init__(self, config: ReplicaConfig) -> None:
        self.config = config
        self.id = config.replica_id
        self.workers: dict[int, tuple[Lease, asyncio.Task[None]]] = {}
        # When the last successful renewal was sent (loop.time(), a monotonic clock): every
        # lease held is proven until lease_s after it, and no longer. Then, whatever the
        # replica is doing (a tick, the leader's duties), the timer stops the workers.
        self.renewed = -math.inf
        self._unproven_at: asyncio.TimerHandle | None = None
        self.server_started: datetime.datetime | None = None  # PostgreSQL's, as last seen

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        nc = await connect(cfg.nats_url, name=f"orch-{self.id}")
        pool = await create_pool(cfg.pg_dsn, size=4)
        store = Store(pool)
        leadership = Leadership(cfg.pg_dsn, self.id, timeout_s=cfg.lease_s)
        schedule = Schedule(cfg.pg_dsn, cfg.snapshot_every_s, cfg.snapshot_keep)
        leading: asyncio.Task[None] | None = None  # the leader's duties, a round at a time
        try:
            js = nc.jetstream()
            topology = await ensure_topology(js, cfg.partitions)
            await store.migrate(topology.partitions)
            await _same_history(js, store)
            worker_cfg = WorkerConfig(partitions=topology.partitions, batch=cfg.batch,
                                      cached=cfg.cached)
            log.info("replica_started", replica=self.id, partitions=topology.partitions)
            publisher = Publisher(js)
            liveness = Liveness(js, publisher, cfg.down_after_s)
            reconciler = Reconciler(publisher, cfg.reconcile)
            strays = Strays(js, topology.partitions)
            while not stop.is_set():
                await self._tick_or_log(store, js, worker_cfg, topology.partitions)
                # The leader's duties run beside the ticks, one round at a time: inline, their
                # seconds at scale (liveness alone up to 3.4 s at 100,000 instances) put the
                # next renewal past lease_s and every partition's worker was stopped. (They
                # use the lock's connection, so it is asked again only once a round is done.)
                if (leading is None or leading.done()) and await leadership.held():
                    leading = asyncio.create_task(
                        self._lead(leadership, liveness, reconciler, strays, schedule))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), cfg.tick_s)
        finally:
            if leading is not None:
                # gather, not a suppressed await: a cancellation of the replica itself
                # meanwhile must still reach it.
                leading.cancel()
                await asyncio.gather(leading, return_exceptions=True)
            if self._unproven_at is not None:
                self._unproven_at.cancel()
            await self._stop_workers(list(self.workers))
            await _stop_step("snapshot", schedule.close())
            # PostgreSQL may be down: the leases then run out by themselves.
            await _stop_step("leave", store.leave(self.id))
            await leadership.close()
            if not await _stop_step("close_pool", pool.close()):
                pool.terminate()
            await nc.close()
            log.info("replica_stopped", replica=self.id)

    async def _tick_or_log(self, store: Store, js, worker_cfg: WorkerConfig,
                           partitions: int) -> None:
        """A tick, given a lease's time at most; a failure (PostgreSQL unreachable, say)
        is logged, and the next tick tries again."""
        try:
            async with asyncio.timeout(self.config.lease_s):
                await self._tick(store, js, worker_cfg, partitions)
        except Exception as exc:  # TimeoutError included
            log.error("tick_failed", replica=self.id, error=repr(exc),
                      renewed_s_ago=self._since_renewed())

    def _renewed(self, sent: float) -> None:
        """A renewal sent at ``sent`` succeeded: the leases are proven until lease_s later."""
        self.renewed = sent
        if self._unproven_at is not None:
            self._unproven_at.cancel()
        self._unproven_at = asyncio.get_running_loop().call_at(
            sent + self.config.lease_s, self._unproven)

    def _unproven(self) -> None:
        """No renewal for lease_s: others may own the partitions now. The workers stop (the
        next tick that reaches PostgreSQL reaps them, and claims partitions again)."""
        if self.workers:
            log.warning("leases_unproven", replica=self.id, partitions=sorted(self.workers),
                        renewed_s_ago=self._since_renewed())
        for _, task in self.workers.values():
            task.cancel()

    def _since_renewed(self) -> float | None:
        if self.renewed == -math.inf:
            return None
        return round(asyncio.get_running_loop().time() - self.renewed, 3)

    async def _tick(self, store: Store, js, worker_cfg: WorkerConfig, partitions: int) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        started = loop.time()
        pulse = await store.heartbeat(self.id, cfg.lease_s)
        for partition, (lease, task) in list(self.workers.items()):
            if task.done():
                del self.workers[partition]
                if not task.cancelled() and task.exception() is not None:
                    log.error("partition_failed", partition=partition, epoch=lease.epoch,
                              error=repr(task.exception()))
                await store.release(self.id, lease)
        if pulse.server_started != self.server_started:
            if self.server_started is not None and self.workers:
                # Its crash may have lost commits (and outbox deletions) it had acknowledged:
                # a worker would go on after them, and nothing would do them again. A new
                # one starts from what the server has.
                log.warning("postgres_restarted", replica=self.id,
                            partitions=sorted(self.workers))
                for partition in list(self.workers):
                    await self._give_back(store, partition)
            self.server_started = pulse.server_started
        sent = loop.time()
        held = await store.renew(self.id, (le for le, _ in self.workers.values()), cfg.lease_s)
        # Partitions claimed below are proven for longer: their claims are sent later.
        self._renewed(sent)
        if loop.time() - started > cfg.lease_s / 2:  # a renewal proves lease_s from `sent`
            log.warning("lease_renewal_slow", replica=self.id,
                        before_s=round(sent - started, 3), renew_s=round(loop.time() - sent, 3))
        for partition in set(self.workers) - held:
            log.warning("lease_lost", partition=partition)
            await self._stop_worker(partition)
        share = math.ceil(partitions / max(pulse.live, 1))
        for partition in sorted(self.workers, reverse=True)[: max(0, len(self.workers) - share)]:
            await self._give_back(store, partition)
            log.info("partition_released", partition=partition, share=share)
        if len(self.workers) < share:
            for lease in await store.claim(self.id, cfg.lease_s, share - len(self.workers)):
                worker = PartitionWorker(js, store, self.id, lease, worker_cfg)
                self.workers[lease.partition] = (lease, asyncio.create_task(worker.run()))

    async def _lead(self, leadership: Leadership, liveness: Liveness,
                    reconciler: Reconciler, strays: Strays, schedule: Schedule) -> None:
        """The leader's duties; a failure here is logged and retried on the next tick."""
        assert leadership.conn is not None
        now_ms = int(time.time() * 1000)  # the shell may read the clock; the fold may not
        took: dict[str, float] = {}  # each duty's seconds: they delay the next tick's renewal

        async def timed(duty: str, call: Awaitable[T]) -> T:
            started = time.perf_counter()
            try:
                return await call
            finally:
                took[duty] = time.perf_counter() - started

        try:
            for cmd in await timed("liveness", liveness.tick(leadership.conn, now_ms)):
                log.warning("host_liveness", host=cmd.id, command=type(cmd).__name__)
            for cmd in await timed("reconciler", reconciler.tick(leadership.conn, now_ms)):
                log.info("reconcile", entity=f"{cmd.kind}/{cmd.id}",
                         generation=cmd.generation)
            if count := await timed("strays", strays.tick(leadership.conn)):
                log.warning("dead_letters_unpartitioned", count=count)
            await timed("snapshots", schedule.tick(leadership.conn))
        except Exception as exc:
            log.exception("leader_duties_failed", replica=self.id, error=repr(exc))
        if sum(took.values()) > self.config.lease_s / 4:
            log.warning("leader_duties_slow", replica=self.id,
                        **{duty: round(seconds, 3) for duty, seconds in took.items()})

    async def _stop_worker(self, partition: int) -> None:
        await self._stop_workers([partition])

    async def _give_back(self, store: Store, partition: int) -> None:
        """Stop a partition's worker and release its lease, for anyone to claim at once."""
        lease = self.workers[partition][0]
        await self._stop_worker(partition)
        await store.release(self.id, lease)

    async def _stop_workers(self, partitions: list[int]) -> None:
        """Cancel these workers, forget them, and wait until they are gone. Cancelled
        meanwhile (a tick out of time), the wait ends but they still go."""
        tasks = set()
        for partition in partitions:
            _, task = self.workers.pop(partition)
            task.cancel()
            task.add_done_callback(functools.partial(_stopped, partition))
            tasks.add(task)
        if tasks:
            await asyncio.wait(tasks)


async def _stop_step(step: str, done: Awaitable[None]) -> bool:
    """A step of a replica's stop, bounded; a failure is logged, not raised: a clean stop
    stays one when PostgreSQL is down."""
    try:
        await asyncio.wait_for(done, STOP_STEP_S)
        return True
    except Exception as exc:
        log.warning("stop_step_failed", step=step, error=repr(exc))
        return False


def _stopped(partition: int, task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        # Already logged by the tick that saw it, or irrelevant now.
        log.warning("partition_stopped_with_error", partition=partition,
                    error=repr(task.exception()))
