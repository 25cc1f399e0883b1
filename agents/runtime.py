"""The agent on one host: consume its jobs, converge, acknowledge, report, heartbeat, resync.

An agent decides nothing. A job carries the full desired spec of one entity on this host
and its generation; the agent hands it to the driver of its kind (instances to the guest
driver, networks to the segment driver), then reports ``Applied`` (or ``Failed``, in the
kind's own report commands) from its own source, and acknowledges the job. The rules are
the same for every kind: one entity at a time, generations never go back, report then ack,
retries. On start it re-reads the newest job of every entity it holds (the JOB stream
keeps one per subject), which is a full resync, and it repeats that on a timer to repair
drift and remove what is no longer wanted; stale objects are swept only after such a
complete pass. A resync gives way to the jobs delivered meanwhile, entity by entity, and
paces itself: it is busy at most a quarter of the time it runs (`RESYNC_DUTY`).

A job that comes while an older job of its entity is being applied waits for the entity's
lock, but first the driver is told (`interrupt(entity_id, spec, generation)`, optional):
an apply that takes long and that the newer job makes pointless (a live migration the
fold aborts) can then be cut short; the older apply still reports how it really ended.
"""

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from tenacity import stop_after_attempt, wait_exponential_jitter

from agents.drivers.errors import PermanentDriverError, TransientDriverError
from agents.metrics import APPLY_SECONDS, JOB_ENDS, REMOVED, RESYNC_SECONDS, ROUNDS_SKIPPED
from events.bus import Publisher, connect, is_transient, read_stream
from events.heartbeats import beat
from events.retry import retried
from events.subjects import HEARTBEAT_BUCKET, JOB_STREAM, inventory_subject, job_filter
from events.topology import ensure_topology
from schemas import commands as c
from schemas.codec import printable
from schemas.heartbeat import Heartbeat
from schemas.jobs import SPECS, Job

log = structlog.get_logger()
T = TypeVar("T")
Key = tuple[str, str]  # (kind, id)
# A job's spec type follows its kind, the third token of job.<host>.<kind>.<id>.
_DECODERS = {kind: msgspec.json.Decoder(Job[spec]) for kind, spec in SPECS.items()}  # type: ignore[valid-type]
# What an agent reports for a job of each kind: applied, failed.
HOST_KIND = "host"  # the host's own job (`HostSpec`): read by the runtime, no driver
RESYNC_JITTER = 0.2  # each wait between resyncs is 80-100 % of the interval
RESYNC_YIELD_S = 0.05  # the longest a resync's next entity waits for the jobs in flight
# The share of its time a resync spends converging. Unpaced, three agents resyncing 370
# guests each took both cores for half a second, and a membership change that came then
# waited behind them on every host (bench/network.py --part c: 154-290 ms, 56 ms without).
RESYNC_DUTY = 0.25
REPORTS: dict[str, tuple[type[c.Command], type[c.Command]]] = {
    "instance": (c.Applied, c.Failed),
    "network": (c.NetworkApplied, c.NetworkFailed),
    "lb": (c.LbApplied, c.LbFailed),
}


class Driver(Protocol):
    """What the runtime needs of a driver; it owns only the objects carrying its names."""

    blocking: bool  # its calls go to a thread

    def apply(self, entity_id: str, spec: Any, generation: int) -> str: ...
    def observe(self) -> dict[str, str]: ...  # entity -> observed, as the host holds it
    def remove(self, entity_id: str) -> bool: ...
    def generations(self) -> dict[str, int]: ...
    def close(self) -> None: ...
    # Optional: interrupt(entity_id, spec, generation) -> None, called without the entity's
    # lock when a newer job comes while an older one of that entity is being applied.


def job_kind(subject: str) -> str:
    tokens = subject.split(".")
    return tokens[2] if len(tokens) == 4 else ""


@dataclass(frozen=True, slots=True)
class AgentConfig:
    nats_url: str
    host: str
    libvirt_uri: str
    heartbeat_s: float = 1.0
    resync_s: float = 30.0
    concurrency: int = 8
    retries: int = 3  # attempts for transient driver errors before reporting Failed
    in_progress_s: float = 5.0  # how often a long apply tells JetStream it is still at it
    underlay_ip: str | None = None  # this host's VTEP address, reported in its heartbeats


class KeepAlive:
    """Tells JetStream a long apply is still in progress, so the job is not redelivered.

    A timer, not a task: most applies end long before the first tick.
    """

    def __init__(self, msg: Msg, every_s: float) -> None:
        self._msg, self._every_s = msg, every_s
        self._handle = asyncio.get_running_loop().call_later(every_s, self._tick)
        self._sending: asyncio.Task[None] | None = None

    def _tick(self) -> None:
        self._sending = asyncio.create_task(self._msg.in_progress())
        self._handle = asyncio.get_running_loop().call_later(self._every_s, self._tick)

    def cancel(self) -> None:
        self._handle.cancel()


@dataclass(slots=True)
class _KeyLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # holding or waiting


class KeyedLocks:
    """One lock per entity: the job loop and the resync never converge one entity at once.

    A lock lives only while somebody holds or awaits it, so a long-lived agent does not
    keep one for every entity it has ever seen.
    """

    def __init__(self) -> None:
        self._locks: dict[str, _KeyLock] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def __call__(self, key: str) -> AsyncIterator[None]:
        entry = self._locks.setdefault(key, _KeyLock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._locks[key]


class Agent:
    def __init__(self, config: AgentConfig,
                 driver_factory: Callable[[], dict[str, Driver]]) -> None:
        self.config = config
        self.host = config.host
        self.boot_id = uuid.uuid4().hex
        self._driver_factory = driver_factory
        self.drivers: dict[str, Driver] = {}  # by the kind of job each applies
        self.applied: dict[Key, int] = {}  # entity -> newest generation applied here
        self.wanted: set[Key] = set()  # entities whose newest job wants them here
        # The JOB stream seq of this host's newest evacuation (its own job): instance jobs
        # older than it are removals (`_superseded`).
        self.evacuated_seq = 0
        self.applying: dict[Key, int] = {}  # entity -> generation its driver applies now
        self.locks = KeyedLocks()
        self.slots = asyncio.Semaphore(config.concurrency)
        self.running: set[asyncio.Task[None]] = set()
        self.live = 0  # jobs from the bus delivered and not yet done
        self.quiet = asyncio.Event()  # set while live is 0: a resync's turn
        self.quiet.set()
        self.log = log.bind(host=self.host, boot_id=self.boot_id)

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        self.drivers = await asyncio.to_thread(self._driver_factory)
        nc = await connect(cfg.nats_url, name=f"agent-{self.host}")
        js = nc.jetstream()
        await ensure_topology(js)
        self.publisher = Publisher(js)
        self.js = js
        loop = asyncio.get_running_loop()
        for driver in self.drivers.values():  # drivers that observe (the LB's health checks)
            set_reporter = getattr(driver, "set_reporter", None)
            if set_reporter is not None:
                set_reporter(lambda cmd: loop.call_soon_threadsafe(self._observed, cmd))
        # What an earlier run of this agent left on the host, at which generation.
        for kind, driver in self.drivers.items():
            held = await asyncio.to_thread(driver.generations)
            self.applied.update(((kind, id_), gen) for id_, gen in held.items())
        # Copies the newest jobs say to remove (a host back after an evacuation: its
        # instances run elsewhere now) go before this host says it is up, or runs anything.
        await self._unless_transient("stale_removal", self._remove_stale(js))
        inventory = await nc.subscribe(inventory_subject(self.host), cb=self._inventory)
        tasks = [
            asyncio.create_task(self._heartbeats(js, stop)),
            asyncio.create_task(self._consume(js, stop)),
            asyncio.create_task(self._resync_loop(js, stop)),
        ]
        self.log.info("agent_started", uri=cfg.libvirt_uri, drivers=sorted(self.drivers),
                      underlay=cfg.underlay_ip, adopted=len(self.applied))
        try:
            done, _ = await asyncio.wait([asyncio.create_task(stop.wait()), *tasks],
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task in tasks and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in [*tasks, *self.running]:
                task.cancel()
            await asyncio.gather(*tasks, *self.running, return_exceptions=True)
            await inventory.unsubscribe()
            await nc.close()  # jobs cut short stay unacked: they come back, and apply is idempotent
            for driver in self.drivers.values():
                await asyncio.to_thread(driver.close)
            self.log.info("agent_stopped")

    # ---- jobs -------------------------------------------------------------------

    async def _consume(self, js: JetStreamContext, stop: asyncio.Event) -> None:
        durable = f"agent-{self.host}"
        # A new boot reads every entity's newest job again: that is the full resync.
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(JOB_STREAM, durable)
        # Pushed, not pulled: no request per wake-up. At most max_ack_pending jobs are out.
        sub = await js.subscribe(
            job_filter(self.host), stream=JOB_STREAM, durable=durable, cb=self._deliver,
            manual_ack=True, config=ConsumerConfig(
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, ack_policy=AckPolicy.EXPLICIT,
                ack_wait=30.0, max_deliver=-1, max_ack_pending=self.config.concurrency * 4))
        try:
            await stop.wait()
        finally:
            await sub.unsubscribe()

    async def _deliver(self, msg: Msg) -> None:
        self.live += 1
        self.quiet.clear()
        try:
            await self.slots.acquire()  # holding deliveries back while every slot is busy
        except BaseException:  # cancelled (the subscription closing): never handled
            self._live_done()
            raise
        task = asyncio.create_task(self._handle(msg))
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    def _decode(self, subject: str, data: bytes) -> Job | None:
        """The job, or None (logged) when no driver here takes its kind or it is malformed:
        its entity's reconciler then alerts, instead of this agent guessing."""
        kind = job_kind(subject)
        decoder = _DECODERS.get(kind)
        if decoder is None or (kind not in self.drivers and kind != HOST_KIND):
            self.log.error("job_kind_unsupported", subject=subject, kind=kind,
                           drivers=sorted(self.drivers))
            return None
        try:
            return decoder.decode(data)
        except msgspec.DecodeError as exc:
            self.log.error("bad_job", subject=subject, error=str(exc))
            return None

    async def _handle(self, msg: Msg) -> None:
        try:
            job = self._decode(msg.subject, msg.data)
            if job is None:
                await msg.term()
                return
            seq = msg.metadata.sequence.stream
            if job.kind == HOST_KIND:
                if seq > self.evacuated_seq:  # evacuated while this agent ran: drop them
                    self.evacuated_seq = seq
                    self._spawn(self._unless_transient("resync", self.resync(self.js)))
                await msg.ack()
                return
            job = self._superseded(job, seq)
            await self._interrupt(job)
            async with self.locks(f"{job.kind}/{job.id}"):
                await self._converge(job, msg)
            if not msg.is_acked:  # a stale job: nothing was reported
                await msg.ack()
        except Exception:
            # The report could not be sent (the bus away past the publish deadline, say).
            # Unacked, the job comes again after ack_wait; acked with a report that was
            # lost, it is re-issued by the reconciler.
            self.log.exception("job_failed", subject=msg.subject)
        finally:
            self.slots.release()
            self._live_done()

    def _live_done(self) -> None:
        self.live -= 1
        if not self.live:
            self.quiet.set()

    async def _converge(self, job: Job, msg: Msg | None) -> None:
        """Apply one job (from the bus, or from a resync when ``msg`` is None) and report."""
        key = (job.kind, job.id)
        entity = f"{job.kind}/{job.id}"
        source = "job" if msg else "resync"
        if job.generation < self.applied.get(key, 0):
            self.log.info("job_stale", entity=entity, generation=job.generation,
                          applied=self.applied[key])
            JOB_ENDS[source, "stale"].inc()
            return
        if job.spec is None:
            self.wanted.discard(key)
        else:
            self.wanted.add(key)
        applied, failed = REPORTS[job.kind]
        keepalive = KeepAlive(msg, self.config.in_progress_s) if msg else None
        self.applying[key] = job.generation
        try:
            with APPLY_SECONDS.time():
                observed = await self._apply(job)
        except (TransientDriverError, PermanentDriverError) as exc:
            self.log.warning("apply_failed", entity=entity, generation=job.generation,
                             attempt=job.attempt, error=str(exc))
            JOB_ENDS[source, "failed"].inc()
            await self._report(failed(
                cmd_id=f"failed-{self.host}-{job.id}-{job.generation}-{job.attempt}",
                id=job.id, generation=job.generation, error=printable(str(exc)),
                attempt=job.attempt + 1),
                msg)
            return
        finally:
            del self.applying[key]
            if keepalive:
                keepalive.cancel()
        JOB_ENDS[source, "applied"].inc()
        fresh = job.generation > self.applied.get(key, 0) or msg is not None
        self.applied[key] = job.generation
        if fresh:
            await self._report(applied(
                cmd_id=f"applied-{self.host}-{job.id}-{job.generation}-{job.attempt}",
                id=job.id, generation=job.generation, observed=observed), msg)
            self.log.debug("applied", entity=entity, generation=job.generation,
                           observed=observed)

    async def _interrupt(self, job: Job) -> None:
        """Tell the driver of a newer job for an entity whose older job it applies now
        (without waiting for the entity's lock: the point is not to wait)."""
        key = (job.kind, job.id)
        busy = self.applying.get(key)
        driver = self.drivers.get(job.kind)
        interrupt = getattr(driver, "interrupt", None)
        if busy is None or job.generation <= busy or driver is None or interrupt is None:
            return
        self.log.info("apply_interrupted", entity=f"{job.kind}/{job.id}", applying=busy,
                      generation=job.generation)
        try:
            await self._driver_call(driver, interrupt, job.id, job.spec, job.generation)
        except Exception:  # the newer job is applied anyway, once the older one ends
            self.log.exception("interrupt_failed", entity=f"{job.kind}/{job.id}")

    async def _apply(self, job: Job) -> str:
        """The driver's apply; transient errors retried with backoff."""
        retries = self.config.retries
        return await retried(
            lambda: self._driver_apply(job),
            transient=lambda exc: isinstance(exc, TransientDriverError) and retries > 1,
            stop=stop_after_attempt(retries - 1),
            wait=wait_exponential_jitter(multiplier=0.2, max=5.0, jitter=0.1))

    async def _driver_apply(self, job: Job) -> str:
        driver = self.drivers[job.kind]
        return await self._driver_call(driver, driver.apply, job.id, job.spec, job.generation)

    @staticmethod
    async def _driver_call(driver: Driver, call: Callable[..., T], *args: object) -> T:
        """A driver call, in a thread unless the driver never blocks (the hop costs more)."""
        if not driver.blocking:
            return call(*args)
        return await asyncio.to_thread(call, *args)

    async def _report(self, cmd: c.Command, job: Msg | None) -> None:
        """Report, and ack the job in the same write: one wake-up of the server, not two.

        Should the report then be lost (the server never stores it), the job is not
        delivered again; the reconciler re-issues it when no report comes.
        """
        await self.publisher.publish(self.host, cmd, sent=job.ack if job else None)

    # ---- resync -----------------------------------------------------------------

    async def _resync_loop(self, js: JetStreamContext, stop: asyncio.Event) -> None:
        while not stop.is_set():
            # Jittered down, never up (drift is repaired within the interval): agents
            # started together do not resync together, round after round.
            wait_s = self.config.resync_s * random.uniform(1 - RESYNC_JITTER, 1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait_s)
            if not stop.is_set():
                await self._unless_transient("resync", self.resync(js))

    async def _unless_transient(self, what: str, round_: Awaitable[None]) -> None:
        """A round of a periodic duty: a bus that is busy, electing a stream leader or
        reconnecting, or a driver whose daemon does not answer for now (a libvirtd
        restarting: a resync observes every driver), fails only this round, and the next
        one tries again."""
        try:
            await round_
        except Exception as exc:
            if not (is_transient(exc) or isinstance(exc, TransientDriverError)):
                raise
            self.log.warning(f"{what}_failed", error=repr(exc))
            ROUNDS_SKIPPED[what].inc()

    def _superseded(self, job: Job, seq: int) -> Job:
        """An instance job older (in the JOB stream) than this host's evacuation is a
        removal: the instance was rebuilt elsewhere, its own removal maybe not here yet."""
        if job.kind == "instance" and job.spec is not None and seq < self.evacuated_seq:
            self.log.info("evacuated_job", entity=f"instance/{job.id}", generation=job.generation)
            return msgspec.structs.replace(job, spec=None)
        return job

    async def _newest_jobs(self, js: JetStreamContext) -> list[Job]:
        """Every entity's newest job for this host, removals (and what an evacuation
        superseded) first; the host's own job sets where the evacuation stands."""
        found = [(job, m.metadata.sequence.stream)
                 async for batch in read_stream(js, JOB_STREAM, job_filter(self.host))
                 for m in batch if (job := self._decode(m.subject, m.data)) is not None]
        self.evacuated_seq = max([self.evacuated_seq, *(seq for job, seq in found
                                                        if job.kind == HOST_KIND)])
        jobs = [self._superseded(job, seq) for job, seq in found if job.kind != HOST_KIND]
        return sorted(jobs, key=lambda job: job.spec is not None)

    async def _remove_stale(self, js: JetStreamContext) -> None:
        """Apply the removals among the newest jobs of what this host still holds."""
        stale = [job for job in await self._newest_jobs(js)
                 if job.spec is None and (job.kind, job.id) in self.applied]
        for job in stale:
            async with self.locks(f"{job.kind}/{job.id}"):
                await self._converge(job, None)
        if stale:
            self.log.info("stale_removed", entities=[f"{j.kind}/{j.id}" for j in stale])

    async def resync(self, js: JetStreamContext) -> None:
        """Converge every entity to its newest job (removals first) and remove what nobody
        wants here."""
        started = time.perf_counter()
        jobs = await self._newest_jobs(js)
        for job in jobs:
            await self._yield_to_jobs()
            await self._interrupt(job)
            async with self.slots, self.locks(f"{job.kind}/{job.id}"):
                began = time.perf_counter()
                await self._converge(job, None)
                busy = time.perf_counter() - began
            await asyncio.sleep(busy * (1 - RESYNC_DUTY) / RESYNC_DUTY)
        removed = await self._remove_unwanted()
        for driver in self.drivers.values():  # after a complete pass, never before
            sweep = getattr(driver, "sweep", None)
            if sweep is not None:
                removed += await self._driver_call(driver, sweep)
        seconds = time.perf_counter() - started
        REMOVED.inc(len(removed))
        RESYNC_SECONDS.observe(seconds)
        self.log.info("resynced", jobs=len(jobs), removed=removed, seconds=round(seconds, 3))

    async def _yield_to_jobs(self) -> None:
        """Let the jobs delivered meanwhile go first: a resync repairs drift, a job is
        someone waiting (a resync of 333 guests took a second of CPU and held the host's
        namespace, and a membership change that came meanwhile waited behind it). Bounded,
        so that a steady stream of jobs slows a resync down but never stops it."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.quiet.wait(), RESYNC_YIELD_S)

    async def _remove_unwanted(self) -> list[str]:
        """Remove what each driver holds here that no job wants.

        Each under its entity's lock and checked again there: a job for it may have come
        since the driver was asked, and what it wants must stay.
        """
        removed = []
        for kind, driver in self.drivers.items():
            held = (await self._driver_call(driver, driver.observe)).keys()
            for id_ in sorted(held - {i for k, i in self.wanted if k == kind}):
                async with self.slots, self.locks(f"{kind}/{id_}"):
                    if ((kind, id_) not in self.wanted
                            and await self._driver_call(driver, driver.remove, id_)):
                        removed.append(f"{kind}/{id_}")
        return removed

    def _observed(self, cmd: c.Command) -> None:
        """Publish what a driver observed (a backend's health), from this host's source."""
        self._spawn(self._publish_observed(cmd))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    async def _publish_observed(self, cmd: c.Command) -> None:
        try:
            await self.publisher.publish(self.host, cmd)
        except Exception:
            self.log.exception("observation_lost", type=type(cmd).__name__, id=cmd.id,
                               cmd_id=cmd.cmd_id)

    # ---- heartbeats and inventory -------------------------------------------------

    async def _heartbeats(self, js: JetStreamContext, stop: asyncio.Event) -> None:
        kv = await js.key_value(HEARTBEAT_BUCKET)
        while not stop.is_set():
            heartbeat = Heartbeat(boot_id=self.boot_id, at_ms=int(time.time() * 1000),
                                  underlay=self.config.underlay_ip)
            await self._unless_transient("heartbeat", beat(kv, self.host, heartbeat))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.heartbeat_s)

    async def _inventory(self, msg: Msg) -> None:
        """What the host's guests really are, as their driver observes them."""
        driver = self.drivers.get("instance")  # an LB node has none
        observed = await self._driver_call(driver, driver.observe) if driver else {}
        await msg.respond(msgspec.json.encode(observed))
