"""An orchestrator replica: holds partition leases in PostgreSQL and runs their workers.

Every tick it heartbeats, renews its leases, stops workers whose lease was lost, gives
partitions back when it holds more than its share, and claims free or expired ones.
A SIGKILLed replica's leases expire after ``lease_s`` and the others take them over.
"""

import asyncio
import contextlib
import math
import os
import socket
import time
from dataclasses import dataclass, field

import structlog
from nats.js import JetStreamContext

from events.bus import Publisher, connect
from events.subjects import CMD_STREAM
from events.topology import ensure_topology
from orchestrator.leader import Leadership
from orchestrator.liveness import Liveness
from orchestrator.partition import PartitionWorker, WorkerConfig
from orchestrator.reconciler import Reconciler, ReconcilerConfig
from orchestrator.store import Lease, Store, create_pool

log = structlog.get_logger()


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

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        nc = await connect(cfg.nats_url, name=f"orch-{self.id}")
        pool = await create_pool(cfg.pg_dsn, size=4)
        store = Store(pool)
        leadership = Leadership(cfg.pg_dsn, self.id)
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
            while not stop.is_set():
                await self._tick(store, js, worker_cfg, topology.partitions)
                if await leadership.held():
                    await self._lead(leadership, liveness, reconciler)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), cfg.tick_s)
        finally:
            for partition in list(self.workers):
                await self._stop_worker(partition)
            await store.leave(self.id)
            await leadership.close()
            await pool.close()
            await nc.close()
            log.info("replica_stopped", replica=self.id)

    async def _tick(self, store: Store, js, worker_cfg: WorkerConfig, partitions: int) -> None:
        cfg = self.config
        live = await store.heartbeat(self.id, cfg.lease_s)
        for partition, (lease, task) in list(self.workers.items()):
            if task.done():
                del self.workers[partition]
                if not task.cancelled() and task.exception() is not None:
                    log.error("partition_failed", partition=partition, epoch=lease.epoch,
                              error=repr(task.exception()))
                await store.release(self.id, lease)
        held = await store.renew(self.id, (le for le, _ in self.workers.values()), cfg.lease_s)
        for partition in set(self.workers) - held:
            log.warning("lease_lost", partition=partition)
            await self._stop_worker(partition)
        share = math.ceil(partitions / max(live, 1))
        for partition in sorted(self.workers, reverse=True)[: max(0, len(self.workers) - share)]:
            lease = self.workers[partition][0]
            await self._stop_worker(partition)
            await store.release(self.id, lease)
            log.info("partition_released", partition=partition, share=share)
        if len(self.workers) < share:
            for lease in await store.claim(self.id, cfg.lease_s, share - len(self.workers)):
                worker = PartitionWorker(js, store, self.id, lease, worker_cfg)
                self.workers[lease.partition] = (lease, asyncio.create_task(worker.run()))

    async def _lead(self, leadership: Leadership, liveness: Liveness,
                    reconciler: Reconciler) -> None:
        """The leader's duties; a failure here is logged and retried on the next tick."""
        assert leadership.conn is not None
        now_ms = int(time.time() * 1000)  # the shell may read the clock; the fold may not
        try:
            for cmd in await liveness.tick(leadership.conn, now_ms):
                log.warning("host_liveness", host=cmd.id, command=type(cmd).__name__)
            for cmd in await reconciler.tick(leadership.conn, now_ms):
                log.info("reconcile", entity=f"instance/{cmd.id}", generation=cmd.generation)
        except Exception as exc:
            log.error("leader_duties_failed", replica=self.id, error=repr(exc))

    async def _stop_worker(self, partition: int) -> None:
        _, task = self.workers.pop(partition)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # already logged by the tick that saw it, or irrelevant now
            log.warning("partition_stopped_with_error", partition=partition, error=repr(exc))
