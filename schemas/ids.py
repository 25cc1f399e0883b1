"""Identifiers that travel as NATS subject tokens, so they must be safe as tokens."""

import hashlib
import re
from typing import Annotated, Final

import msgspec

ID_PATTERN: Final = r"^[a-z0-9][a-z0-9_-]{0,62}$"
KEY_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"

# An entity id or a host name: lower-case, no dots, spaces or wildcards.
EntityId = Annotated[str, msgspec.Meta(pattern=ID_PATTERN, max_length=63)]
# An idempotency key: becomes the Nats-Msg-Id of the command.
IdemKey = Annotated[str, msgspec.Meta(pattern=KEY_PATTERN, max_length=128)]

KINDS: Final = ("host", "instance", "network", "pool", "lb", "scheduler", "registry")

# Sources that are not hosts. Any other valid id in the source position is a host (agent).
USER: Final = "user"
ADMIN: Final = "admin"
SYSTEM: Final = "system"
RESERVED_SOURCES: Final = frozenset({USER, ADMIN, SYSTEM})

_ID_RE = re.compile(ID_PATTERN)


def is_valid_id(value: str) -> bool:
    return bool(_ID_RE.match(value))


def mac_address(instance_id: str, index: int) -> str:
    """NIC ``index``'s MAC, as the fold decides it: locally administered, unicast, 46 bits
    of hash (QEMU's 52:54:00 leaves 24: two NICs of one segment collide with even odds by
    a few thousand instances). Agents older than the fold's IPAM derived the same."""
    h = hashlib.sha256(f"{instance_id}/{index}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (h[0] & 0xFC | 0x02, *h[1:6]))
