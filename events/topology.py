"""The JetStream topology, created idempotently at start by every process that needs it."""

import contextlib
import os
from dataclasses import dataclass

import structlog
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
    SubjectTransform,
)
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError
from tenacity import stop_after_delay, wait_exponential_jitter

from events.bus import is_transient
from events.retry import retried
from events.subjects import (
    CMD_STREAM,
    DEFAULT_PARTITIONS,
    EVT_STREAM,
    HEARTBEAT_BUCKET,
    JOB_STREAM,
    UNPARTITIONED_FILTERS,
    cmd_partitions,
    partition_filter,
)

REPLICAS_ENV = "ORCH_STREAM_REPLICAS"
DUPLICATE_WINDOW_S = 600.0
# A fold consumer nobody has listened to for this long is deleted by the server.
FOLD_CONSUMER_ORPHANED_S = 30.0
MAX_MSG_BYTES = 1024 * 1024
# How long ensure_topology waits for a server that is away or a cluster without a leader.
TOPOLOGY_WAIT_S = 20.0
_STREAM_NAME_IN_USE = 10058  # JetStream's code: that name is taken, configured otherwise
log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class Topology:
    partitions: int


def stream_replicas() -> int | None:
    """Copies of each stream asked for in the environment: 3 on a cluster, where data
    matters; None when not asked (a new stream then has one)."""
    value = os.environ.get(REPLICAS_ENV)
    if value not in (None, "1", "3", "5"):
        raise RuntimeError(f"{REPLICAS_ENV}={value!r}: 1, 3 or 5")
    return None if value is None else int(value)


def cmd_stream_config(partitions: int, replicas: int) -> StreamConfig:
    return StreamConfig(
        name=CMD_STREAM,
        num_replicas=replicas,
        subjects=["cmd.*.*.*"],
        # Partition by entity (kind + id): one entity's commands always land in one partition.
        subject_transform=SubjectTransform(
            src="cmd.*.*.*",
            dest=f"cmd.{{{{partition({partitions},2,3)}}}}"
            ".{{wildcard(1)}}.{{wildcard(2)}}.{{wildcard(3)}}",
        ),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        duplicate_window=DUPLICATE_WINDOW_S,
        deny_delete=True,
        deny_purge=True,
        allow_direct=True,
        max_msg_size=MAX_MSG_BYTES,
        discard=DiscardPolicy.NEW,
    )


def job_stream_config(replicas: int) -> StreamConfig:
    return StreamConfig(
        name=JOB_STREAM,
        num_replicas=replicas,
        subjects=["job.>"],
        storage=StorageType.FILE,
        duplicate_window=DUPLICATE_WINDOW_S,
        # Level-triggered: only the newest desired spec of an entity on a host matters.
        max_msgs_per_subject=1,
        max_msg_size=MAX_MSG_BYTES,
    )


def evt_stream_config(replicas: int) -> StreamConfig:
    return StreamConfig(
        name=EVT_STREAM,
        num_replicas=replicas,
        subjects=["evt.>"],
        storage=StorageType.FILE,
        duplicate_window=DUPLICATE_WINDOW_S,
        max_age=30 * 24 * 3600.0,
        allow_direct=True,
        max_msg_size=MAX_MSG_BYTES,
    )


async def ensure_topology(js: JetStreamContext, partitions: int | None = None,
                          replicas: int | None = None) -> Topology:
    """Create the streams if missing; an existing CMD stream keeps its partition count.

    New streams get ``replicas`` copies (default: ``stream_replicas()``, else 1); existing
    ones keep theirs, with a warning when that is not what was asked. A server that has
    just come back, or a cluster electing a leader, is waited for a while.
    """
    return await retried(lambda: _ensure_topology(js, partitions, replicas),
                         transient=is_transient, stop=stop_after_delay(TOPOLOGY_WAIT_S),
                         wait=wait_exponential_jitter(multiplier=0.1, max=2.0, jitter=0.1))


async def _ensure_topology(js: JetStreamContext, partitions: int | None,
                           replicas: int | None) -> Topology:
    asked = replicas or stream_replicas()
    replicas = asked or 1
    try:
        info = await js.stream_info(CMD_STREAM)
    except NotFoundError:
        info = await _add_stream(js, cmd_stream_config(partitions or DEFAULT_PARTITIONS,
                                                      replicas))
    existing = cmd_partitions(info.config)
    if partitions is not None and partitions != existing:
        raise RuntimeError(f"stream {CMD_STREAM} has {existing} partitions, not {partitions}")
    if asked is not None and info.config.num_replicas != asked:
        log.warning("stream_replicas_differ", stream=CMD_STREAM,
                    replicas=info.config.num_replicas, asked=asked)
    for config in (job_stream_config(replicas), evt_stream_config(replicas)):
        try:
            await js.stream_info(config.name)
        except NotFoundError:
            await _add_stream(js, config)
    try:
        await js.key_value(HEARTBEAT_BUCKET)
    except BucketNotFoundError:
        # Keys of hosts gone for a day disappear; liveness itself reads the beat times.
        await js.create_key_value(KeyValueConfig(
            bucket=HEARTBEAT_BUCKET, history=1, ttl=24 * 3600.0, storage=StorageType.FILE,
            replicas=replicas))
    return Topology(partitions=existing)


async def _add_stream(js: JetStreamContext, config: StreamConfig) -> StreamInfo:
    """Create a stream; if another process just created it, take theirs."""
    try:
        return await js.add_stream(config)
    except BadRequestError as exc:
        if exc.err_code != _STREAM_NAME_IN_USE:
            raise
        assert config.name is not None
        return await js.stream_info(config.name)


def fold_consumer_name(partition: int, epoch: int) -> str:
    return f"fold-{partition}-e{epoch}"


async def open_fold_consumer(js: JetStreamContext, partition: int, epoch: int,
                             after_seq: int, deliver_subject: str, heartbeat_s: float,
                             max_pending: int, ack_wait_s: float = 30.0) -> None:
    """The consumer of one partition for one ownership epoch, pushing to deliver_subject.

    It starts right after the partition's checkpoint; the checkpoint, not the consumer, is
    the position, so its state is kept in memory only. The previous epoch's consumer (and
    an earlier run of this one) is deleted first, so a stale owner usually stops receiving
    (and then hearing heartbeats) at once. One more epochs behind keeps its consumer until
    its replica, unable to renew the lease, stops it; the server then deletes the consumer
    nobody listens to. Either way PostgreSQL fences its commits. Deleted by name: listing
    consumers on a cluster waits seconds for the ones still being created.
    """
    name = fold_consumer_name(partition, epoch)
    for stale in range(max(1, epoch - 1), epoch + 1):
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(CMD_STREAM, fold_consumer_name(partition, stale))
    start = (
        dict(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after_seq + 1)
        if after_seq
        else dict(deliver_policy=DeliverPolicy.ALL)
    )
    await js.add_consumer(
        CMD_STREAM,
        ConsumerConfig(
            durable_name=name,
            deliver_subject=deliver_subject,
            filter_subject=partition_filter(partition),
            # An ack covers everything before it: the worker acks what it has committed.
            ack_policy=AckPolicy.ALL,
            ack_wait=ack_wait_s,
            max_deliver=-1,
            max_ack_pending=max_pending,
            idle_heartbeat=heartbeat_s,
            inactive_threshold=FOLD_CONSUMER_ORPHANED_S,
            mem_storage=True,
            **start,
        ),
    )


UNPARTITIONED_CONSUMER = "unpartitioned"


async def open_unpartitioned_consumer(js: JetStreamContext) -> str:
    """The durable pull consumer of what the stream stored unpartitioned, which no fold
    consumer takes (events.subjects.UNPARTITIONED); returns its name. Its reader folds
    each message (fold_message makes it a dead letter) and acks it once committed: then
    every stored message is folded or dead-lettered.

    Not a second filter of partition 0's consumer: a consumer of several filters costs the
    server, for each message it delivers, in proportion to the subjects stored (seconds
    per thousand messages over ten thousand entities), and nothing for the messages it
    does not match. This one delivers only what was published wrong.
    """
    await js.add_consumer(CMD_STREAM, ConsumerConfig(
        durable_name=UNPARTITIONED_CONSUMER, filter_subjects=list(UNPARTITIONED_FILTERS),
        ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, max_deliver=-1))
    return UNPARTITIONED_CONSUMER
