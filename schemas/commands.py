"""Commands: every action, from users, admins, hosts or the orchestrator itself.

A command travels on ``cmd.<source>.<kind>.<id>``. Its body names its type (``type``),
its schema version (``v``), its idempotency key (``cmd_id``, which dedupes per source and
entity) and the entity it addresses (``id``, which must match the subject).
"""

from typing import Annotated, ClassVar, Literal

import msgspec

from schemas.ids import EntityId, IdemKey
from schemas.specs import (
    Cidr,
    HostCondition,
    HostVcpus,
    InstanceTemplate,
    IPv4,
    MemoryMiB,
    Power,
    Service,
    Vcpus,
)

# Who may send a command: a source class, not a source name. "host" means any agent.
SourceClass = Literal["user", "admin", "system", "host"]
PEOPLE: tuple[SourceClass, ...] = ("user", "admin")


class Command(msgspec.Struct, tag_field="type", kw_only=True, frozen=True):
    cmd_id: IdemKey
    id: EntityId
    v: int = 1

    kind: ClassVar[str]
    sources: ClassVar[tuple[SourceClass, ...]] = PEOPLE
    version: ClassVar[int] = 1


# ---- hosts ------------------------------------------------------------------


class RegisterHost(Command, tag=True, kw_only=True):
    kind = "host"
    sources = ("admin",)
    vcpus: HostVcpus
    memory_mib: MemoryMiB


class SetHostCondition(Command, tag=True, kw_only=True):
    """Admin action: drain a host or put it in maintenance, or bring it back up."""

    kind = "host"
    sources = ("admin",)
    condition: Literal["up", "draining", "maintenance"]


class HostDown(Command, tag=True, kw_only=True):
    kind = "host"
    sources = ("system",)
    boot_id: str = ""


class HostUp(Command, tag=True, kw_only=True):
    kind = "host"
    sources = ("system",)
    boot_id: str = ""


# ---- instances --------------------------------------------------------------


class CreateInstance(Command, tag=True, kw_only=True):
    kind = "instance"
    sources = (*PEOPLE, "system")  # pools create their members
    version = 2
    v: int = 2
    template: InstanceTemplate
    power: Power = "running"
    pool: EntityId | None = None


class StartInstance(Command, tag=True, kw_only=True):
    kind = "instance"


class StopInstance(Command, tag=True, kw_only=True):
    kind = "instance"


class DeleteInstance(Command, tag=True, kw_only=True):
    kind = "instance"
    sources = (*PEOPLE, "system")


class Placed(Command, tag=True, kw_only=True):
    kind = "instance"
    sources = ("system",)
    host: EntityId


class PlacementFailed(Command, tag=True, kw_only=True):
    kind = "instance"
    sources = ("system",)
    reason: str


class Applied(Command, tag=True, kw_only=True):
    """An agent's report that it converged an entity to a generation."""

    kind = "instance"
    sources = ("host",)
    generation: Annotated[int, msgspec.Meta(ge=0)]
    observed: str


class Failed(Command, tag=True, kw_only=True):
    kind = "instance"
    sources = ("host",)
    generation: Annotated[int, msgspec.Meta(ge=0)]
    error: str
    attempt: Annotated[int, msgspec.Meta(ge=1)] = 1


class Reconcile(Command, tag=True, kw_only=True):
    """The reconciler's tick for an instance whose job is overdue: re-issue, or degrade."""

    kind = "instance"
    sources = ("system",)
    generation: Annotated[int, msgspec.Meta(ge=0)]
    max_attempts: Annotated[int, msgspec.Meta(ge=0)]


# ---- private networks -------------------------------------------------------


class CreateNetwork(Command, tag=True, kw_only=True):
    kind = "network"
    vni: Annotated[int, msgspec.Meta(ge=1, le=16_777_215)]
    cidr: Cidr


class DeleteNetwork(Command, tag=True, kw_only=True):
    kind = "network"


class JoinNetwork(Command, tag=True, kw_only=True):
    kind = "network"
    sources = ("system",)
    instance: EntityId


class LeaveNetwork(Command, tag=True, kw_only=True):
    kind = "network"
    sources = ("system",)
    instance: EntityId


# ---- instance pools ---------------------------------------------------------


class CreatePool(Command, tag=True, kw_only=True):
    kind = "pool"
    template: InstanceTemplate
    size: Annotated[int, msgspec.Meta(ge=0, le=1000)]


class ScalePool(Command, tag=True, kw_only=True):
    kind = "pool"
    size: Annotated[int, msgspec.Meta(ge=0, le=1000)]


class DeletePool(Command, tag=True, kw_only=True):
    kind = "pool"


class AttachBalancer(Command, tag=True, kw_only=True):
    kind = "pool"
    sources = ("system",)
    lb: EntityId


class DetachBalancer(Command, tag=True, kw_only=True):
    kind = "pool"
    sources = ("system",)
    lb: EntityId


# ---- load balancers ---------------------------------------------------------


class CreateLoadBalancer(Command, tag=True, kw_only=True):
    kind = "lb"
    vip: IPv4
    pool: EntityId
    services: Annotated[tuple[Service, ...], msgspec.Meta(min_length=1)]


class DeleteLoadBalancer(Command, tag=True, kw_only=True):
    kind = "lb"


class PoolMembers(Command, tag=True, kw_only=True):
    kind = "lb"
    sources = ("system",)
    members: tuple[EntityId, ...]


# ---- the scheduler: one entity that owns placement, so it is folded in order --


class HostCapacity(Command, tag=True, kw_only=True):
    kind = "scheduler"
    sources = ("system",)
    host: EntityId
    vcpus: HostVcpus
    memory_mib: MemoryMiB
    condition: HostCondition


class Place(Command, tag=True, kw_only=True):
    kind = "scheduler"
    sources = ("system",)
    instance: EntityId
    vcpus: Vcpus
    memory_mib: MemoryMiB


class Release(Command, tag=True, kw_only=True):
    kind = "scheduler"
    sources = ("system",)
    instance: EntityId


AnyCommand = (
    RegisterHost
    | SetHostCondition
    | HostDown
    | HostUp
    | CreateInstance
    | StartInstance
    | StopInstance
    | DeleteInstance
    | Placed
    | PlacementFailed
    | Applied
    | Failed
    | Reconcile
    | CreateNetwork
    | DeleteNetwork
    | JoinNetwork
    | LeaveNetwork
    | CreatePool
    | ScalePool
    | DeletePool
    | AttachBalancer
    | DetachBalancer
    | CreateLoadBalancer
    | DeleteLoadBalancer
    | PoolMembers
    | HostCapacity
    | Place
    | Release
)

COMMAND_TYPES: dict[str, type[Command]] = {
    cls.__name__: cls for cls in AnyCommand.__args__  # type: ignore[attr-defined]
}
SCHEDULER_ID = "default"
# Idempotency keys of the commands the fold itself sends: fx-<stream seq>-<n>.
FOLLOW_UP_PREFIX = "fx-"
