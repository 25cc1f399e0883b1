"""Jobs: the full desired state of one entity on one host, published on job.<host>.<kind>.<id>."""

import msgspec

from schemas.ids import EntityId
from schemas.specs import InstanceSpec


class Job(msgspec.Struct, frozen=True, kw_only=True):
    kind: str
    id: EntityId
    host: EntityId
    # Agents ignore a job whose generation is older than one they already applied.
    generation: int
    attempt: int = 0  # re-issues of this generation by the reconciler
    # None: the entity is no longer wanted on this host; remove it.
    spec: InstanceSpec | None
