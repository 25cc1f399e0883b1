"""Desired specifications of entities: what a job carries to an agent, in full."""

from typing import Annotated, Literal

import msgspec

from schemas.ids import EntityId

Power = Literal["running", "stopped"]
Protocol = Literal["tcp", "udp"]
# maglev: a consistent table (both LB nodes pick the same backend, a leaving backend moves
# only its own flows), the default; least_conn is named so that it is refused clearly.
Strategy = Literal["maglev", "round_robin", "source_hash", "least_conn"]
Role = Literal["hypervisor", "lb"]
HostCondition = Literal["up", "down", "draining", "maintenance"]

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Vcpus = Annotated[int, msgspec.Meta(ge=1, le=256)]
HostVcpus = Annotated[int, msgspec.Meta(ge=1, le=16384)]
MemoryMiB = Annotated[int, msgspec.Meta(ge=64, le=4 * 1024 * 1024)]
Cidr = Annotated[str, msgspec.Meta(pattern=r"^\d{1,3}(\.\d{1,3}){3}/\d{1,2}$")]
IPv4 = Annotated[str, msgspec.Meta(pattern=r"^\d{1,3}(\.\d{1,3}){3}$")]
# Decided by the fold: locally administered, unicast, lower case.
Mac = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f][26ae](:[0-9a-f]{2}){5}$")]
Vni = Annotated[int, msgspec.Meta(ge=1, le=16_777_215)]
# The segment's MTU as its guests see it; the underlay needs 50 bytes more (VXLAN over IPv4).
Mtu = Annotated[int, msgspec.Meta(ge=576, le=8950)]
Image = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,254}$")]


class Nic(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    network: EntityId
    ip: IPv4 | None = None


class SecurityRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    protocol: Protocol
    port: Port
    source: Cidr = "0.0.0.0/0"


class InstanceTemplate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    vcpus: Vcpus
    memory_mib: MemoryMiB
    image: Image
    nics: tuple[Nic, ...] = ()
    rules: tuple[SecurityRule, ...] = ()


class HealthCheck(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Probed by each LB node on the target port: a TCP connect, or with ``http_path`` an
    HTTP GET of it that must answer 2xx or 3xx. ``rise`` passes in a row bring a backend
    in, ``fall`` failures in a row take it out."""

    interval_ms: Annotated[int, msgspec.Meta(ge=100, le=3_600_000)] = 2000
    timeout_ms: Annotated[int, msgspec.Meta(ge=50, le=3_600_000)] = 1000
    rise: Annotated[int, msgspec.Meta(ge=1, le=100)] = 2
    fall: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    http_path: Annotated[str, msgspec.Meta(pattern=r"^/[\x21-\x7e]{0,254}$")] | None = None


class Service(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    port: Port
    target_port: Port
    protocol: Protocol = "tcp"
    strategy: Strategy | None = None  # None: maglev; in a job, always the one decided
    health: HealthCheck = HealthCheck()


class NicSpec(msgspec.Struct, frozen=True):
    """A NIC as its host must plug it: the fold resolved its network, MAC and address."""

    network: EntityId
    vni: Vni
    mac: Mac
    ip: IPv4
    prefix: Annotated[int, msgspec.Meta(ge=8, le=30)]  # of the network's CIDR
    mtu: Mtu = 1500


class Outgoing(msgspec.Struct, frozen=True):
    """On the source's job during a live migration: move the running guest, peer to peer,
    to the libvirtd of host ``dest``, reached at its underlay ``address``; abort unless it
    has ended by ``deadline_at`` (epoch ms: a restarted agent knows it has passed)."""

    dest: EntityId
    address: IPv4
    deadline_at: Annotated[int, msgspec.Meta(ge=0)]


class InstanceSpec(msgspec.Struct, frozen=True):
    """Everything an agent needs to converge one instance, never a delta."""

    template: InstanceTemplate
    power: Power
    host: EntityId
    # Resolved, in the order of template.nics; inbound rules are template.rules.
    nics: tuple[NicSpec, ...] = ()
    # On the destination's job during a live migration: the guest is coming here. Have its
    # segments and its ports' rules ready; define and start nothing (libvirt brings it).
    incoming: bool = False
    outgoing: Outgoing | None = None  # on the source's job: send the guest away


class RemotePort(msgspec.Struct, frozen=True, array_like=True):
    """A port of the segment on another host: its MAC and address live behind ``vtep``.

    Plain strings: the network driver checks each port it converges (a job of 1,000 ports
    took 1.7 ms to decode with the patterns, 0.2 ms without, on every member host).
    """

    mac: str
    ip: str
    vtep: str


class NetworkSpec(msgspec.Struct, frozen=True):
    """One network's segment as one host must hold it, in full (never a delta).

    The host's own ports are not here: each comes with its instance's job.
    """

    vni: Vni
    cidr: Cidr
    mtu: Mtu
    vteps: tuple[IPv4, ...]  # every other host with a port on it: one flood entry each
    ports: tuple[RemotePort, ...]  # every port on those hosts, sorted by MAC


class HostSpec(msgspec.Struct, frozen=True):
    """What a host's agent must know of the host itself: that it was evacuated, when its
    instances were rebuilt elsewhere. Written in the fold's step that decides it, so an
    agent that comes back at any moment after knows: none of its instance jobs older than
    this one may run here any more (their removals may not be on its subjects yet)."""

    evacuated_at: Annotated[int, msgspec.Meta(ge=0)]


class Backend(msgspec.Struct, frozen=True):
    """A pool member behind a balancer, at its address on the pool's private network."""

    instance: EntityId
    ip: IPv4
    network: EntityId
    # The service ports on which the fold counts it healthy: only those give it new flows.
    # Every backend listed is probed, healthy or not, so that a recovery is seen.
    healthy: tuple[Port, ...] = ()


class LbSpec(msgspec.Struct, frozen=True):
    """One balancer as one of its two nodes must serve it, in full; both get the same
    services, backends and seed, so that both pick the same backend for a flow."""

    vip: IPv4
    services: tuple[Service, ...]
    backends: tuple[Backend, ...]  # sorted by instance
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]  # of the consistent table
    port: NicSpec  # this node's own port on the backends' network, fold-assigned
