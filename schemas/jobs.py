"""Jobs: the full desired state of one entity on one host, published on job.<host>.<kind>.<id>."""

from typing import Generic, TypeVar

import msgspec

from schemas.ids import EntityId
from schemas.specs import HostSpec, InstanceSpec, LbSpec, NetworkSpec

Spec = TypeVar("Spec", bound=InstanceSpec | NetworkSpec | LbSpec | HostSpec)


class Job(msgspec.Struct, Generic[Spec], frozen=True, kw_only=True):
    kind: str
    id: EntityId
    host: EntityId
    # Agents ignore a job whose generation is older than one they already applied.
    generation: int
    attempt: int = 0  # re-issues of this generation by the reconciler
    # None: the entity is no longer wanted on this host; remove it.
    spec: Spec | None


# The spec each kind of job carries: an agent decodes a job by its subject's kind.
SPECS: dict[str, type] = {"instance": InstanceSpec, "network": NetworkSpec, "lb": LbSpec,
                          "host": HostSpec}
