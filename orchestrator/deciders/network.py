"""Private networks: a VXLAN segment, its addresses, and where each of its ports lives.

A network is created ``pending`` and asks the VNI registry for its VNI; granted, it is
``active``, refused, ``failed`` (and may be created again). Instances attach ports: the
network gives each an address (IPAM) and answers ``NicAddressed`` (or ``NicRefused``, with
the reason). Placement binds a port to a host; the first port on a host makes the network
span it, and the host answers with its VTEP (``HostVtep``). Every change sends each host
the full segment as that host must see it (``jobs``), and a host left with no port gets a
removal job.

A live migration binds the port to its destination first as ``incoming``: the segment
spans the destination (its bridge and VXLAN device exist before any memory moves) while
every host still reaches the port at its source. The switch binds it there for real; a
rollback binds it to its source again, which drops the incoming binding.
"""

from typing import Literal

import msgspec

from orchestrator.deciders.addressing import check_address, check_cidr, lowest_free, prefix_of
from orchestrator.deciders.base import Ctx, Decision, Event, accept, follow_ups, reject
from schemas import commands as c
from schemas.commands import REGISTRY_ID, PortOwner
from schemas.jobs import Job
from schemas.specs import NetworkSpec, RemotePort

# degraded: active, but some host's job ran out of retries (an alert, until it applies).
Status = Literal["pending", "active", "degraded", "failed", "deleted"]
_USABLE = ("active", "degraded")


class Port(msgspec.Struct, kw_only=True):
    instance: str  # the owner's id: an instance, or a balancer (whose index is a node slot)
    index: int
    mac: str
    ip: str
    host: str | None = None
    owner: PortOwner = "instance"
    incoming: str | None = None  # a live migration's destination, bound inactive


class Span(msgspec.Struct, kw_only=True):
    """A host the network spans: it has at least one bound port there."""

    vtep: str | None = None  # unknown until the host has reported its underlay
    observed_generation: int = 0  # the newest job the host has applied
    error: str | None = None


class Network(msgspec.Struct, kw_only=True):
    vni: int
    cidr: str
    mtu: int = 1500
    status: Status = "pending"
    error: str | None = None
    ports: list[Port] = []  # in the order attached
    hosts: dict[str, Span] = {}
    generation: int = 0  # bumped whenever a host's view of the segment changes
    attempts: int = 0  # re-issues of the current generation's jobs
    issued_at: int = 0  # when they were last issued: the reconciler's clock
    created_at: int = 0
    updated_at: int = 0


class Created(Event):
    vni: int
    cidr: str
    mtu: int
    at: int


class Activated(Event):
    at: int


class Refused(Event):
    reason: str
    at: int


class PortAdded(Event):
    instance: str
    index: int
    mac: str
    ip: str
    owner: PortOwner = "instance"


class PortBound(Event):
    instance: str
    host: str
    at: int
    owner: PortOwner = "instance"
    index: int | None = None  # None: every port of the owner


class PortIncoming(Event):
    """The owner's ports are expected on ``host`` (None: no more): it spans the segment."""

    instance: str
    host: str | None
    at: int


class PortRemoved(Event):
    instance: str
    at: int
    owner: PortOwner = "instance"


class Spanned(Event):
    host: str


class Unspanned(Event):
    host: str


class VtepSet(Event):
    host: str
    vtep: str
    at: int


class HostApplied(Event):
    host: str
    generation: int


class HostFailed(Event):
    host: str
    generation: int
    error: str


class Reissued(Event):
    attempt: int
    at: int


class Degraded(Event):
    reason: str
    at: int


class Deleted(Event):
    at: int


def _address_reply(network_id: str, state: Network, port: Port) -> tuple[type, dict]:
    nic = dict(network=network_id, vni=state.vni, mac=port.mac, ip=port.ip,
               prefix=prefix_of(state.cidr), mtu=state.mtu)
    kind = c.NicAddressed if port.owner == "instance" else c.LbPortAddressed
    return (kind, dict(id=port.instance, index=port.index, **nic))


def _refusal(owner: PortOwner, owner_id: str, index: int, network_id: str,
             reason: str) -> tuple[type, dict]:
    return (c.NicRefused if owner == "instance" else c.LbPortRefused, dict(
        id=owner_id, index=index, network=network_id, reason=reason))


def _owned(port: Port, owner: PortOwner, owner_id: str) -> bool:
    return port.owner == owner and port.instance == owner_id


def decide(state: Network | None, cmd: c.Command, ctx: Ctx) -> Decision:
    if isinstance(cmd, c.CreateNetwork):
        if state is not None and state.status not in ("failed", "deleted"):
            if (state.vni, state.cidr, state.mtu) == (cmd.vni, cmd.cidr, cmd.mtu):
                return accept()
            return reject(f"network {cmd.id} already exists ({state.status})")
        reason = check_cidr(cmd.cidr)
        if reason is not None:
            return reject(reason)
        return accept(Created(vni=cmd.vni, cidr=cmd.cidr, mtu=cmd.mtu, at=ctx.at),
                      commands=follow_ups(ctx, (c.ReserveVni, dict(
                          id=REGISTRY_ID, vni=cmd.vni, network=cmd.id))))
    if isinstance(cmd, c.AttachPort):
        return _attach(state, cmd, ctx)
    if state is None:
        return reject(f"no network {cmd.id}")
    match cmd:
        case c.VniGranted():
            if state.status != "pending":
                return accept()
            return accept(Activated(at=ctx.at), commands=follow_ups(
                ctx, *[_address_reply(cmd.id, state, p) for p in state.ports]))
        case c.VniRefused():
            if state.status != "pending":
                return accept()
            return accept(
                Refused(reason=cmd.reason, at=ctx.at), note=cmd.reason,
                commands=follow_ups(ctx, *[_refusal(p.owner, p.instance, p.index, cmd.id,
                                                    cmd.reason) for p in state.ports]))
        case c.DeleteNetwork():
            if state.status == "deleted":
                return accept()
            if state.ports:
                names = sorted({p.instance for p in state.ports})
                shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
                return reject(f"network {cmd.id} has {len(names)} members: {shown}")
            release = [] if state.status == "failed" else [(c.ReleaseVni, dict(
                id=REGISTRY_ID, vni=state.vni, network=cmd.id))]
            return accept(Deleted(at=ctx.at), commands=follow_ups(ctx, *release))
        case c.BindPort():
            return _bind(state, cmd, ctx)
        case c.DetachPort():
            return _detach(state, cmd, ctx)
        case c.HostVtep():
            span = state.hosts.get(cmd.host)
            if span is None or span.vtep == cmd.vtep:
                return accept()
            return accept(VtepSet(host=cmd.host, vtep=cmd.vtep, at=ctx.at))
        case c.ReconcileNetwork():
            return _reconcile(state, cmd, ctx)
        case c.NetworkApplied() | c.NetworkFailed():
            return _report(state, cmd, ctx)
        case c.JoinNetwork() | c.LeaveNetwork():
            return reject(f"{type(cmd).__name__} is retired: ports attach with AttachPort")
    return reject(f"{type(cmd).__name__} does not apply to a network")


def _attach(state: Network | None, cmd: c.AttachPort, ctx: Ctx) -> Decision:
    def refuse(reason: str) -> Decision:
        return reject(reason, commands=follow_ups(ctx, _refusal(
            cmd.owner, cmd.instance, cmd.index, cmd.id, reason)))

    if state is None:
        return refuse(f"no network {cmd.id}")
    if state.status in ("failed", "deleted"):
        return refuse(f"network {cmd.id} is {state.status}"
                      + (" (being deleted)" if state.status == "deleted" else ""))
    port = next((p for p in state.ports
                 if _owned(p, cmd.owner, cmd.instance) and p.index == cmd.index), None)
    if port is not None:  # asked twice: answer the same (once active)
        replies = [_address_reply(cmd.id, state, port)] if state.status in _USABLE else []
        return accept(commands=follow_ups(ctx, *replies))
    used = {p.ip for p in state.ports}
    if any(p.mac == cmd.mac for p in state.ports):
        return refuse(f"MAC {cmd.mac} is already on network {cmd.id}")
    if cmd.ip is not None:
        reason = check_address(state.cidr, cmd.ip, used)
        if reason is not None:
            return refuse(reason)
        ip = cmd.ip
    else:
        free = lowest_free(state.cidr, used)
        if free is None:
            return refuse(f"no address left in {state.cidr}")
        ip = free
    port = Port(instance=cmd.instance, index=cmd.index, mac=cmd.mac, ip=ip, owner=cmd.owner)
    # A pending network answers once its VNI is granted.
    replies = [_address_reply(cmd.id, state, port)] if state.status in _USABLE else []
    return accept(PortAdded(instance=cmd.instance, index=cmd.index, mac=cmd.mac, ip=ip,
                            owner=cmd.owner),
                  commands=follow_ups(ctx, *replies))


def _moving(port: Port, owner: PortOwner, owner_id: str, index: int | None) -> bool:
    return _owned(port, owner, owner_id) and index in (None, port.index)


def _bind(state: Network, cmd: c.BindPort, ctx: Ctx) -> Decision:
    ports = [p for p in state.ports if _moving(p, cmd.owner, cmd.instance, cmd.index)]
    if not ports:
        return reject(f"{cmd.owner} {cmd.instance} has no port"
                      + (f" {cmd.index}" if cmd.index is not None else "")
                      + f" on network {cmd.id}")
    moves = lambda p: _moving(p, cmd.owner, cmd.instance, cmd.index)  # noqa: E731
    if cmd.incoming:
        if all(p.incoming == cmd.host or p.host == cmd.host for p in ports):
            return accept()
        event: Event = PortIncoming(instance=cmd.instance, host=cmd.host, at=ctx.at)
    elif all(p.host == cmd.host and p.incoming is None for p in ports):
        return accept()
    elif all(p.host == cmd.host for p in ports):  # back to where it is: a rollback
        event = PortIncoming(instance=cmd.instance, host=None, at=ctx.at)
    else:
        event = PortBound(instance=cmd.instance, host=cmd.host, at=ctx.at, owner=cmd.owner,
                          index=cmd.index)
    after = [_rebound(p, event) if moves(p) else p for p in state.ports]
    spanned, left = _respan(state.ports, after)
    return accept(event, *spanned, *left,
                  commands=follow_ups(ctx, *_span_commands(cmd.id, spanned, left)))


def _rebound(port: Port, event: Event) -> Port:
    if isinstance(event, PortIncoming):
        return msgspec.structs.replace(port, incoming=event.host)
    assert isinstance(event, PortBound)
    return msgspec.structs.replace(port, host=event.host, incoming=None)


def _present(ports: list[Port]) -> set[str]:
    """The hosts a segment must span: where a port is bound, or expected."""
    return {h for p in ports for h in (p.host, p.incoming) if h is not None}


def _respan(before: list[Port], after: list[Port]) -> tuple[list[Spanned], list[Unspanned]]:
    was, now = _present(before), _present(after)
    return [Spanned(h) for h in sorted(now - was)], [Unspanned(h) for h in sorted(was - now)]


def _detach(state: Network, cmd: c.DetachPort, ctx: Ctx) -> Decision:
    if not any(_owned(p, cmd.owner, cmd.instance) for p in state.ports):
        return accept()  # detached already, or refused before it was attached
    _, left = _respan(state.ports, [p for p in state.ports
                                    if not _owned(p, cmd.owner, cmd.instance)])
    return accept(PortRemoved(instance=cmd.instance, at=ctx.at, owner=cmd.owner), *left,
                  commands=follow_ups(ctx, *_span_commands(cmd.id, [], left)))


def _span_commands(network_id: str, spanned: list[Spanned],
                   left: list[Unspanned]) -> list[tuple[type, dict]]:
    """Tell hosts the network spans them now (they answer with their VTEP), or no more."""
    return [*[(c.SpanNetwork, dict(id=e.host, network=network_id)) for e in spanned],
            *[(c.UnspanNetwork, dict(id=e.host, network=network_id)) for e in left]]


def _report(state: Network, cmd: c.NetworkApplied | c.NetworkFailed, ctx: Ctx) -> Decision:
    span = state.hosts.get(ctx.source)
    if span is None or cmd.generation < span.observed_generation:
        return accept()  # the host left the network since, or a newer job was applied
    if cmd.generation > state.generation:
        return reject(f"report for generation {cmd.generation} > {state.generation}")
    if isinstance(cmd, c.NetworkApplied):
        return accept(HostApplied(host=ctx.source, generation=cmd.generation))
    return accept(HostFailed(host=ctx.source, generation=cmd.generation, error=cmd.error))


def lagging(state: Network) -> list[str]:
    """The hosts that have not applied the current generation."""
    return sorted(h for h, s in state.hosts.items() if s.observed_generation < state.generation)


def _reconcile(state: Network, cmd: c.ReconcileNetwork, ctx: Ctx) -> Decision:
    late = lagging(state)
    if cmd.generation != state.generation or not late or state.status != "active":
        return accept()  # converged meanwhile, a newer generation is on its way, or alerted
    if state.attempts >= cmd.max_attempts:
        errors = sorted({e for h in late if (e := state.hosts[h].error)})
        reason = (f"hosts {', '.join(late)} did not apply generation {state.generation}"
                  + (f": {'; '.join(errors)}" if errors else ""))
        return accept(Degraded(reason=reason, at=ctx.at), note=reason)
    return accept(Reissued(attempt=state.attempts + 1, at=ctx.at))


def evolve(state: Network | None, event: Event) -> Network:
    if isinstance(event, Created):
        if state is not None and state.status in ("failed", "deleted"):
            # Created again: the same entity, a fresh start. Generations only grow, so an
            # agent never takes the new segment's jobs for stale ones.
            return Network(vni=event.vni, cidr=event.cidr, mtu=event.mtu,
                           generation=state.generation, created_at=event.at,
                           updated_at=event.at)
        return Network(vni=event.vni, cidr=event.cidr, mtu=event.mtu, created_at=event.at,
                       updated_at=event.at)
    assert state is not None
    match event:
        case Activated():
            state.status, state.updated_at = "active", event.at
        case Refused():
            state.status, state.error, state.updated_at = "failed", event.reason, event.at
            state.ports = []
        case PortAdded():
            state.ports.append(Port(instance=event.instance, index=event.index, mac=event.mac,
                                    ip=event.ip, owner=event.owner))
        case PortBound():
            for port in state.ports:
                if _moving(port, event.owner, event.instance, event.index):
                    port.host, port.incoming = event.host, None
            _new_generation(state, event.at)
        case PortIncoming():
            for port in state.ports:
                if _owned(port, "instance", event.instance):
                    port.incoming = event.host
            _new_generation(state, event.at)
        case PortRemoved():
            bound = any(p.host or p.incoming for p in state.ports
                        if _owned(p, event.owner, event.instance))
            state.ports = [p for p in state.ports if not _owned(p, event.owner, event.instance)]
            if bound:  # an unbound port was in no host's view
                _new_generation(state, event.at)
        case Spanned():
            state.hosts[event.host] = Span()
        case Unspanned():
            del state.hosts[event.host]
        case VtepSet():
            state.hosts[event.host].vtep = event.vtep
            _new_generation(state, event.at)
        case HostApplied():
            span = state.hosts[event.host]
            span.observed_generation, span.error = event.generation, None
            if state.status == "degraded" and not lagging(state):  # late, but converged
                state.status, state.error = "active", None
        case Reissued():
            state.attempts, state.issued_at = event.attempt, event.at
        case Degraded():
            state.status, state.error = "degraded", event.reason
        case HostFailed():
            state.hosts[event.host].error = event.error
        case Deleted():
            state.status, state.updated_at = "deleted", event.at
    return state


def _new_generation(state: Network, at: int) -> None:
    state.generation += 1
    state.attempts, state.issued_at = 0, at
    if state.status == "degraded":  # a new generation gets its retries anew
        state.status, state.error = "active", None


def host_spec(state: Network, host: str) -> NetworkSpec:
    """The segment as ``host`` must hold it: every other host's VTEP and port."""
    vteps = {h: s.vtep for h, s in state.hosts.items() if h != host and s.vtep}
    ports = sorted((RemotePort(mac=p.mac, ip=p.ip, vtep=vteps[p.host])
                    for p in state.ports if p.host in vteps), key=lambda r: r.mac)
    return NetworkSpec(vni=state.vni, cidr=state.cidr, mtu=state.mtu,
                       vteps=tuple(sorted(set(vteps.values()))), ports=tuple(ports))


def jobs(kind: str, id: str, before_generation: int, state: Network,
         events: list[Event]) -> list[Job]:
    """Every spanned host's full segment when any host's view changed, and a removal job
    for each host the change left without a port; re-issued, to the hosts still late."""
    if state.generation == before_generation:
        if not any(isinstance(e, Reissued) for e in events):
            return []
        return [Job(kind=kind, id=id, host=h, generation=state.generation,
                    attempt=state.attempts, spec=host_spec(state, h)) for h in lagging(state)]
    out = [Job(kind=kind, id=id, host=h, generation=state.generation,
               spec=host_spec(state, h)) for h in sorted(state.hosts)]
    out.extend(Job(kind=kind, id=id, host=e.host, generation=state.generation, spec=None)
               for e in events if isinstance(e, Unspanned))
    return out
