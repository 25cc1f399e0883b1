"""Subject names on the bus, and the partition function the server applies to CMD.

Commands are published on ``cmd.<source>.<kind>.<id>`` and stored by the stream's subject
transform as ``cmd.<P>.<source>.<kind>.<id>`` where P = fnv1a32(kind + id) % partitions,
exactly as nats-server's ``partition()`` mapping computes it.
"""

import re
from typing import Any, Final

CMD_STREAM: Final = "CMD"
JOB_STREAM: Final = "JOB"
EVT_STREAM: Final = "EVT"
DEFAULT_PARTITIONS: Final = 8

_FNV_OFFSET: Final = 0x811C9DC5
_FNV_PRIME: Final = 0x01000193


def fnv1a32(data: bytes) -> int:
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return h


def partition_of(kind: str, id_: str, partitions: int) -> int:
    return fnv1a32((kind + id_).encode()) % partitions


# The partition count in CMD's subject transform, as events.topology writes it.
_PARTITIONS_RE = re.compile(r"partition\((\d+),")


def cmd_partitions(config: Any) -> int:
    """The partition count of CMD, from its StreamConfig's subject transform."""
    transform = config.subject_transform
    found = _PARTITIONS_RE.search(transform.dest if transform else "")
    if found is None:
        raise RuntimeError(f"stream {CMD_STREAM} exists without a partition transform")
    return int(found.group(1))


def command_subject(source: str, kind: str, id_: str) -> str:
    return f"cmd.{source}.{kind}.{id_}"


def command_msg_id(source: str, kind: str, id_: str, cmd_id: str) -> str:
    """A command's Nats-Msg-Id: its idempotency key, scoped to its source and entity.

    JetStream dedupes across the whole stream, so a bare ``cmd_id`` chosen by one client
    (``create-1``, say) would silently drop another client's command on another entity.
    """
    return f"{source}.{kind}.{id_}.{cmd_id}"


def stored_command_subject(partition: int, source: str, kind: str, id_: str) -> str:
    return f"cmd.{partition}.{source}.{kind}.{id_}"


def partition_filter(partition: int) -> str:
    return f"cmd.{partition}.>"


# The stream's transform partitions cmd.<source>.<kind>.<id> only when every token is
# literal: a publish with a wildcard token (cmd.user.instance.*, cmd.>.instance.vm1) is
# stored as it came, four tokens and no partition, where no partition's consumer looks.
UNPARTITIONED: Final = "cmd.*.*.*"
# With one filter the server matches a subject as a subset of it, and a literal `>` token
# escapes `*`; with several it matches as a subscription does, any token for a wildcard.
# The second matches nothing: a stored subject has four tokens or five.
UNPARTITIONED_FILTERS: Final = (UNPARTITIONED, "cmd.*.*.*.*.*")


def event_subject(kind: str, id_: str) -> str:
    return f"evt.{kind}.{id_}"


def job_filter(host: str) -> str:
    return f"job.{host}.>"


def inventory_subject(host: str) -> str:
    """Request-reply: what the host's hypervisor really runs, as the agent observes it."""
    return f"agent.{host}.inventory"


HEARTBEAT_BUCKET: Final = "HEARTBEATS"
