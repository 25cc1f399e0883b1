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
    Mac,
    MemoryMiB,
    Mtu,
    Port,
    Power,
    Role,
    SecurityRule,
    Service,
    Vcpus,
    Vni,
)

# Who may send a command: a source class, not a source name. "host" means any agent.
SourceClass = Literal["user", "admin", "system", "host"]
PEOPLE: tuple[SourceClass, ...] = ("user", "admin")

# Who a network's port belongs to: an instance's NIC, or a balancer's node.
PortOwner = Literal["instance", "lb"]
# A counter the fold compares and stores: PostgreSQL and JetStream count in 64 bits.
Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Attempt = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
# Free text (an agent's error, a boot id): stored in jsonb, which has no NUL character.
Text = Annotated[str, msgspec.Meta(pattern=r"^[^\x00]*$")]


class Command(msgspec.Struct, tag_field="type", kw_only=True, frozen=True,
              forbid_unknown_fields=True):
    """Strict: a field it does not know is refused (a typo must not pass for a default)."""

    cmd_id: IdemKey
    id: EntityId
    v: int = 1

    kind: ClassVar[str]
    sources: ClassVar[tuple[SourceClass, ...]] = PEOPLE
    version: ClassVar[int] = 1


# ---- hosts ------------------------------------------------------------------


class RegisterHost(Command, tag=True, kw_only=True):
    """v2: the host's role. LB nodes carry balancers; only hypervisors carry instances."""

    kind = "host"
    sources = ("admin",)
    version = 2
    v: int = 2
    vcpus: HostVcpus
    memory_mib: MemoryMiB
    role: Role = "hypervisor"


class SetHostCondition(Command, tag=True, kw_only=True):
    """Admin action: drain a host or put it in maintenance, or bring it back up."""

    kind = "host"
    sources = ("admin", "system")  # the system: a drained host goes into maintenance
    condition: Literal["up", "draining", "maintenance"]


class HostDown(Command, tag=True, kw_only=True):
    kind = "host"
    sources = ("system",)
    boot_id: Text = ""


class HostUp(Command, tag=True, kw_only=True):
    """A host heard from again, or anew: v2 carries the underlay (VTEP) address it reported."""

    kind = "host"
    sources = ("system",)
    version = 2
    v: int = 2
    boot_id: Text = ""
    underlay: IPv4 | None = None


class EvacuateHost(Command, tag=True, kw_only=True):
    """Rebuild a down host's instances elsewhere, cold, each as a new generation; its own
    jobs say removal, so its agent destroys the stale copies when it returns. From the
    system: the host has been down longer than the replica's ``--evacuate-after``."""

    kind = "host"
    sources = ("admin", "system")


class SpanNetwork(Command, tag=True, kw_only=True):
    """A network has a port on this host now: the host answers with its VTEP."""

    kind = "host"
    sources = ("system",)
    network: EntityId


class UnspanNetwork(Command, tag=True, kw_only=True):
    kind = "host"
    sources = ("system",)
    network: EntityId


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


class SetRules(Command, tag=True, kw_only=True):
    """Replace an instance's inbound rules: what its NICs accept, besides replies."""

    kind = "instance"
    rules: tuple[SecurityRule, ...]


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
    reason: Text


class Applied(Command, tag=True, kw_only=True):
    """An agent's report that it converged an entity to a generation."""

    kind = "instance"
    sources = ("host",)
    generation: Count
    observed: Text


class Failed(Command, tag=True, kw_only=True):
    kind = "instance"
    sources = ("host",)
    generation: Count
    error: Text
    attempt: Attempt = 1


class MigrateInstance(Command, tag=True, kw_only=True):
    """Move a running instance live to another hypervisor (``to``, or the scheduler's
    choice, never its own host). From the system: a drain, which waits for capacity."""

    kind = "instance"
    sources = ("admin", "system")
    to: EntityId | None = None
    deadline_ms: Annotated[int, msgspec.Meta(ge=1000, le=3_600_000)] = 120_000


class AbortMigration(Command, tag=True, kw_only=True):
    """Roll the migration back: at once before memory moves; after, once the source says
    whether libvirt still could abort it (the guest runs where libvirt says)."""

    kind = "instance"
    sources = ("admin", "system")
    reason: Text = ""


class MigrationReserved(Command, tag=True, kw_only=True):
    """The scheduler reserved the destination: its capacity is held until the move ends."""

    kind = "instance"
    sources = ("system",)
    ticket: Count  # the migration asked (its MigrateInstance's seq): answers to an
    # older one are told apart
    host: EntityId
    address: IPv4  # the destination's underlay: where the source's libvirtd sends the guest


class MigrationRefused(Command, tag=True, kw_only=True):
    kind = "instance"
    sources = ("system",)
    ticket: Count
    reason: Text


class MigrationQueued(Command, tag=True, kw_only=True):
    """Asked, not started yet: too many migrations at once on a host, or (a drain) no room."""

    kind = "instance"
    sources = ("system",)
    ticket: Count
    reason: Text


class Rehome(Command, tag=True, kw_only=True):
    """Its host was evacuated: the scheduler gave it ``host`` instead, where it starts anew
    (None: no host has room yet; it waits, and ``reason`` says so)."""

    kind = "instance"
    sources = ("system",)
    host: EntityId | None
    reason: Text


class MigrationProgress(Command, tag=True, kw_only=True):
    """The source agent's view of a running migration, from libvirt's job statistics."""

    kind = "instance"
    sources = ("host",)
    generation: Count
    processed_mib: Count
    remaining_mib: Count


class Reconcile(Command, tag=True, kw_only=True):
    """The reconciler's tick for an instance whose job is overdue: re-issue, or degrade."""

    kind = "instance"
    sources = ("system",)
    generation: Count
    max_attempts: Count


# ---- private networks -------------------------------------------------------


class CreateNetwork(Command, tag=True, kw_only=True):
    kind = "network"
    vni: Vni
    cidr: Cidr
    mtu: Mtu = 1500


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


NicIndex = Annotated[int, msgspec.Meta(ge=0, le=63)]


class AttachPort(Command, tag=True, kw_only=True):
    """An instance's NIC asks its network for an address (the one it names, or any).

    A balancer's node asks the same for its port (``owner`` lb, ``instance`` the balancer,
    ``index`` the node's slot), and is answered with ``LbPortAddressed``.
    """

    kind = "network"
    sources = ("system",)
    instance: EntityId
    index: NicIndex
    mac: Mac
    ip: IPv4 | None = None
    owner: PortOwner = "instance"


class BindPort(Command, tag=True, kw_only=True):
    """Placement put the instance on a host: its ports live there now (with ``index``, only
    that one: a balancer's two ports live on two nodes). ``incoming``: a live migration's
    destination, bound inactive (the segment spans it, its traffic still goes to the
    source) until a binding without it moves the port, or one to its old host cancels."""

    kind = "network"
    sources = ("system",)
    instance: EntityId
    host: EntityId
    owner: PortOwner = "instance"
    index: NicIndex | None = None
    incoming: bool = False


class DetachPort(Command, tag=True, kw_only=True):
    kind = "network"
    sources = ("system",)
    instance: EntityId
    owner: PortOwner = "instance"


class VniGranted(Command, tag=True, kw_only=True):
    kind = "network"
    sources = ("system",)


class VniRefused(Command, tag=True, kw_only=True):
    kind = "network"
    sources = ("system",)
    reason: Text


class HostVtep(Command, tag=True, kw_only=True):
    """Where a host the network spans is reached on the underlay."""

    kind = "network"
    sources = ("system",)
    host: EntityId
    vtep: IPv4


class NetworkApplied(Command, tag=True, kw_only=True):
    """An agent's report that its host holds the network's segment at a generation."""

    kind = "network"
    sources = ("host",)
    generation: Count
    observed: Text


class NetworkFailed(Command, tag=True, kw_only=True):
    kind = "network"
    sources = ("host",)
    generation: Count
    error: Text
    attempt: Attempt = 1


class ReconcileNetwork(Command, tag=True, kw_only=True):
    """The reconciler's tick for a network some host has not applied: re-issue, or degrade."""

    kind = "network"
    sources = ("system",)
    generation: Count
    max_attempts: Count


class NicAddressed(Command, tag=True, kw_only=True):
    """A network's answer to AttachPort: the NIC as the instance's host must plug it."""

    kind = "instance"
    sources = ("system",)
    index: NicIndex
    network: EntityId
    vni: Vni
    mac: Mac
    ip: IPv4
    prefix: Annotated[int, msgspec.Meta(ge=8, le=30)]
    mtu: Mtu


class MemberDrained(Command, tag=True, kw_only=True):
    """The pool's balancers no longer send the instance anything: it may stop, or go."""

    kind = "instance"
    sources = ("system",)


class NicRefused(Command, tag=True, kw_only=True):
    kind = "instance"
    sources = ("system",)
    index: NicIndex
    network: EntityId
    reason: Text


# ---- the VNI registry: one entity owns every VNI, so two networks never share one --


class ReserveVni(Command, tag=True, kw_only=True):
    kind = "registry"
    sources = ("system",)
    vni: Vni
    network: EntityId


class ReleaseVni(Command, tag=True, kw_only=True):
    kind = "registry"
    sources = ("system",)
    vni: Vni
    network: EntityId


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


class MemberState(Command, tag=True, kw_only=True):
    """A member tells its pool whether it should get traffic (placed, running, addressed,
    not degraded) and whether it is leaving (stopping or deleted: its pool's balancers let
    go of it first, and the pool answers MemberDrained)."""

    kind = "pool"
    sources = ("system",)
    instance: EntityId
    serving: bool
    leaving: bool = False
    ip: IPv4 | None = None  # on the pool's network (its first NIC)


class BalancerDrained(Command, tag=True, kw_only=True):
    """Every node of a balancer applied a job without the instance."""

    kind = "pool"
    sources = ("system",)
    lb: EntityId
    instance: EntityId


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
    """v2: a service without a strategy gets the consistent table (v1's default was
    round_robin, which the upcaster writes out)."""

    kind = "lb"
    version = 2
    v: int = 2
    vip: IPv4
    pool: EntityId
    services: Annotated[tuple[Service, ...], msgspec.Meta(min_length=1, max_length=64)]
    # Connection draining: how long a leaving member keeps its established flows once no
    # node sends it new ones, before it may stop or go.
    drain_ms: Annotated[int, msgspec.Meta(ge=0, le=3_600_000)] = 1000


class DeleteLoadBalancer(Command, tag=True, kw_only=True):
    kind = "lb"


class PoolMembers(Command, tag=True, kw_only=True):
    """Retired: pools send their serving members with their addresses (PoolBackends)."""

    kind = "lb"
    sources = ("system",)
    members: tuple[EntityId, ...]


class Member(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """A pool member that should get traffic, at its address on the pool's network."""

    instance: EntityId
    ip: IPv4


class PoolBackends(Command, tag=True, kw_only=True):
    """A pool's answer to AttachBalancer, and its news whenever its serving set changes:
    the whole set (never a delta), on the network of its template's first NIC."""

    kind = "lb"
    sources = ("system",)
    network: EntityId | None  # None: the template has no NIC, nothing can be reached
    backends: tuple[Member, ...]


class PoolRefused(Command, tag=True, kw_only=True):
    kind = "lb"
    sources = ("system",)
    reason: Text


class BalancerPlaced(Command, tag=True, kw_only=True):
    """The scheduler's answer: the LB nodes that serve the balancer now (two, or fewer
    with the reason it waits)."""

    kind = "lb"
    sources = ("system",)
    nodes: Annotated[tuple[EntityId, ...], msgspec.Meta(max_length=2)]
    reason: Text = ""


class LbPortAddressed(Command, tag=True, kw_only=True):
    """A network's answer to a balancer's AttachPort: the node's port in that slot."""

    kind = "lb"
    sources = ("system",)
    index: NicIndex
    # The fields of NicAddressed (a NicSpec's, flat: a command refuses unknown fields).
    network: EntityId
    vni: Vni
    mac: Mac
    ip: IPv4
    prefix: Annotated[int, msgspec.Meta(ge=8, le=30)]
    mtu: Mtu


class LbPortRefused(Command, tag=True, kw_only=True):
    kind = "lb"
    sources = ("system",)
    index: NicIndex
    network: EntityId
    reason: Text


class LbApplied(Command, tag=True, kw_only=True):
    """An LB node's report that it serves the balancer at a generation (or, for a
    removal, that it holds nothing of it any more)."""

    kind = "lb"
    sources = ("host",)
    generation: Count
    observed: Text


class LbFailed(Command, tag=True, kw_only=True):
    kind = "lb"
    sources = ("host",)
    generation: Count
    error: Text
    attempt: Attempt = 1


class DrainTick(Command, tag=True, kw_only=True):
    """The reconciler's tick for a balancer whose leaving members' drain time is up."""

    kind = "lb"
    sources = ("system",)


class ReconcileLb(Command, tag=True, kw_only=True):
    """The reconciler's tick for a balancer a node has not applied: re-issue, or alert."""

    kind = "lb"
    sources = ("system",)
    generation: Count
    max_attempts: Count


class BackendHealth(Command, tag=True, kw_only=True):
    """An LB node saw a backend's service cross its rise or fall threshold."""

    kind = "lb"
    sources = ("host",)
    instance: EntityId
    port: Port  # the service's port (not the target port)
    healthy: bool
    generation: Count  # of the job the node was probing under
    detail: Text = ""  # what the last probe saw, e.g. "connection refused"


# ---- the scheduler: one entity that owns placement, so it is folded in order --


class HostCapacity(Command, tag=True, kw_only=True):
    kind = "scheduler"
    sources = ("system",)
    host: EntityId
    vcpus: HostVcpus
    memory_mib: MemoryMiB
    condition: HostCondition
    underlay: IPv4 | None = None  # where migrations reach it; None until its agent says


class ReserveMove(Command, tag=True, kw_only=True):
    """An instance asks to move off ``source``: reserve a destination (``to``, or the best
    fit), within the limit of migrations at once per host. ``wait`` (a drain): queue
    while no host has room, instead of refusing."""

    kind = "scheduler"
    sources = ("system",)
    ticket: Count  # the migration asking: its MigrateInstance's seq
    instance: EntityId
    source: EntityId
    to: EntityId | None = None
    vcpus: Vcpus
    memory_mib: MemoryMiB
    wait: bool = False
    # Hosts that have not yet removed an earlier copy of it: a job there now would take
    # the place of that removal on the host's subject, and the copy would live on.
    avoid: tuple[EntityId, ...] = ()


class MoveSwitched(Command, tag=True, kw_only=True):
    """The guest runs on the destination now: its allocation is there, and the source's
    capacity stays held until the source has cleaned up (EndMove)."""

    kind = "scheduler"
    sources = ("system",)
    instance: EntityId
    ticket: Count


class EndMove(Command, tag=True, kw_only=True):
    """The move is over: ``moved``, the instance lives on the destination and the source's
    capacity goes; else the destination's reservation goes."""

    kind = "scheduler"
    sources = ("system",)
    ticket: Count  # only the move of that migration ends
    instance: EntityId
    moved: bool


class Evacuate(Command, tag=True, kw_only=True):
    """Give every instance of a down host another host (as placement does, waiting for
    room if there is none)."""

    kind = "scheduler"
    sources = ("system",)
    host: EntityId


class SetMigrationLimit(Command, tag=True, kw_only=True):
    """At most ``limit`` migrations at once out of any host, and into any host."""

    kind = "scheduler"
    sources = ("admin",)
    limit: Annotated[int, msgspec.Meta(ge=1, le=64)]


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


class LbNode(Command, tag=True, kw_only=True):
    """An LB node's condition, from its host: only an up node serves balancers."""

    kind = "scheduler"
    sources = ("system",)
    host: EntityId
    condition: HostCondition


class PlaceBalancer(Command, tag=True, kw_only=True):
    kind = "scheduler"
    sources = ("system",)
    lb: EntityId


class ReleaseBalancer(Command, tag=True, kw_only=True):
    kind = "scheduler"
    sources = ("system",)
    lb: EntityId


AnyCommand = (
    RegisterHost
    | SetHostCondition
    | HostDown
    | HostUp
    | CreateInstance
    | StartInstance
    | StopInstance
    | SetRules
    | DeleteInstance
    | Placed
    | PlacementFailed
    | Applied
    | Failed
    | MigrateInstance
    | AbortMigration
    | MigrationReserved
    | MigrationRefused
    | MigrationQueued
    | MigrationProgress
    | Rehome
    | Reconcile
    | CreateNetwork
    | DeleteNetwork
    | JoinNetwork
    | LeaveNetwork
    | AttachPort
    | BindPort
    | DetachPort
    | VniGranted
    | VniRefused
    | HostVtep
    | NetworkApplied
    | NetworkFailed
    | ReconcileNetwork
    | NicAddressed
    | NicRefused
    | MemberDrained
    | ReserveVni
    | ReleaseVni
    | EvacuateHost
    | SpanNetwork
    | UnspanNetwork
    | CreatePool
    | ScalePool
    | DeletePool
    | MemberState
    | BalancerDrained
    | AttachBalancer
    | DetachBalancer
    | CreateLoadBalancer
    | DeleteLoadBalancer
    | PoolMembers
    | PoolBackends
    | PoolRefused
    | BalancerPlaced
    | LbPortAddressed
    | LbPortRefused
    | LbApplied
    | LbFailed
    | BackendHealth
    | ReconcileLb
    | DrainTick
    | HostCapacity
    | ReserveMove
    | MoveSwitched
    | EndMove
    | SetMigrationLimit
    | Evacuate
    | Place
    | Release
    | LbNode
    | PlaceBalancer
    | ReleaseBalancer
)

COMMAND_TYPES: dict[str, type[Command]] = {
    cls.__name__: cls for cls in AnyCommand.__args__  # type: ignore[attr-defined]
}
SCHEDULER_ID = "default"
REGISTRY_ID = "vnis"
# Idempotency keys of the commands the fold itself sends: fx-<stream seq>-<n>.
FOLLOW_UP_PREFIX = "fx-"
