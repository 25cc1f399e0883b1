"""Network driver: converges the VXLAN segments of one host to the network jobs it is given.

A job (`NetworkSpec`) is one network's segment as this host must hold it, in full: VNI,
MTU, every other member host's VTEP and every remote port's (MAC, IP, VTEP). The driver
reads the kernel (links, FDB, neighbours), compares, and writes only what differs
(`agents.net.segment`); a second apply of the same job writes nothing.

A newer generation of a segment this process converged last, still marked in the kernel
with that generation, is converged as the changes between the two jobs: only the entries of
the VTEPs, MACs and addresses that differ are read and written (`converge_changes`), so a
membership change of a network of 1,000 ports reads two or three entries instead of 2,000.
The same generation again (a resync, a redelivery), a first job after a restart, or one
after a failed apply is converged in full, reading everything: that is what repairs drift,
within the resync interval.

The segment's bridge records which network and generation it holds, in its alias
(``orch:network:<id>:<generation>``): `generations` and `observe` read it back from the
kernel, so a restarted agent adopts its segments without touching them. A removal (spec
None) deletes the VXLAN device and its entries; the bridge stays while guest ports are
attached (their instances' jobs own them), marked ``:held``, and goes once empty (a later
`remove`, or the last port's unplug).

Same shape as `VmDriver`: the agent runs its calls in a thread, one call per network at a
time; failures are TransientDriverError (retry) or PermanentDriverError.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from agents.drivers.errors import PermanentDriverError, TransientDriverError
from agents.net import names
from agents.net.errors import NetError, NetlinkError, classify
from agents.net.host import DEFAULT_TIMEOUT, HostNet
from agents.net.rtnl import Link, check_ipv4, check_mac
from agents.net.segment import (
    Remote,
    Remotes,
    Segment,
    converge_changes,
    converge_remotes,
    ensure_segment,
    guest_ports,
    read_segment,
    remove_segment,
    segment_bridges,
    set_holder,
)
from schemas.specs import NetworkSpec

Observed = Literal["up", "held", "absent"]


@contextlib.contextmanager
def _errors(what: str) -> Iterator[None]:
    try:
        yield
    except NetlinkError as exc:
        error = classify(exc)
        kind = TransientDriverError if error.transient else PermanentDriverError
        raise kind(f"{what}: {error}") from exc
    except NetError as exc:
        kind = TransientDriverError if exc.transient else PermanentDriverError
        raise kind(f"{what}: {exc}") from exc


def _mac(value: str) -> str:
    try:
        return check_mac(value)
    except ValueError as exc:
        raise PermanentDriverError(f"port mac: {exc}") from exc


def _ipv4(value: str, what: str) -> str:
    try:
        return check_ipv4(value)
    except ValueError as exc:
        raise PermanentDriverError(f"{what}: {value!r} is not an IPv4 address") from exc


@dataclass(frozen=True)
class _Converged:
    """A segment as this process last converged it, completely."""

    bridge: int  # ifindex: a segment removed and made again is another one
    vxlan: int
    generation: int
    remotes: Remotes

    def precedes(self, segment: Segment, holder: names.Holder | None, generation: int) -> bool:
        """Whether a job of ``generation`` may be converged as the changes since this one:
        it is newer (the same generation again, a resync or a redelivery, is converged in
        full: that is what repairs drift), and the kernel's segment is the one converged,
        still marked with its generation, and found whole."""
        return (generation > self.generation and holder is not None and not holder.held
                and holder.generation == self.generation and not segment.repaired
                and (segment.bridge.index, segment.vxlan.index) == (self.bridge, self.vxlan))


class NetworkDriver:
    blocking = True

    def __init__(self, underlay_ip: str, netns: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        """``underlay_ip``: this host's VTEP address; ``netns``: the host's network
        namespace (None: the agent's own)."""
        self.underlay_ip = _ipv4(underlay_ip, "underlay ip")
        self.netns = netns
        with _errors(f"network namespace {netns or '(own)'}"):
            self.host = HostNet.open(netns, timeout)
        # By network id; an apply that fails forgets its network's: the next one is in full.
        self._converged: dict[str, _Converged] = {}

    def close(self) -> None:
        self.host.close()

    def __enter__(self) -> NetworkDriver:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def writes(self) -> int:
        """Netlink writes and announcements (gratuitous ARPs) made so far in this namespace
        (the idempotency tests count them)."""
        return self.host.rtnl.writes + self.host.announced

    # -- reading ----------------------------------------------------------------------------

    def _held(self) -> dict[str, list[tuple[Link, names.Holder]]]:
        """Segment bridges by the network their alias names."""
        out: dict[str, list[tuple[Link, names.Holder]]] = {}
        for bridge in segment_bridges(self.host):
            holder = names.parse_alias(bridge.alias)
            if holder is not None:
                out.setdefault(holder.network, []).append((bridge, holder))
        return out

    def observe(self) -> dict[str, str]:
        """Every network with a segment here: "up", or "held" (removed, ports attached)."""
        with _errors("observe segments"):
            return {network: "held" if all(h.held for _, h in held) else "up"
                    for network, held in self._held().items()}

    def generations(self) -> dict[str, int]:
        """The generation last applied to every network with a segment here."""
        with _errors("observe segments"):
            return {network: max(h.generation for _, h in held)
                    for network, held in self._held().items()}

    # -- converging -------------------------------------------------------------------------

    def apply(self, network_id: str, spec: NetworkSpec | None, generation: int) -> str:
        """Converge one network's segment to ``spec`` (None: absent here); returns the
        observed state ("up", "held", "absent"). A job older than the generation the
        kernel holds (a redelivery overtaken by a newer job) changes nothing."""
        with _errors(f"network {network_id}"):
            held = self._held().get(network_id, [])
            newest = max((h.generation for _, h in held), default=None)
            if newest is not None and newest > generation:
                return "held" if all(h.held for _, h in held) else "up"
            if spec is None:
                self._converged.pop(network_id, None)
                return self._remove(network_id, held, generation)
            return self._apply(network_id, spec, generation, held)

    def _apply(self, network_id: str, spec: NetworkSpec, generation: int,
               held: list[tuple[Link, names.Holder]]) -> Observed:
        ipaddress.IPv4Network(spec.cidr, strict=False)
        last = self._converged.pop(network_id, None)  # back only once this one succeeds
        remotes = self._remotes(spec, last.remotes if last is not None else None)
        for bridge, _holder in held:  # the network moved to another VNI: the old one goes
            if names.vni_of(bridge.name) != spec.vni:
                self._remove_bridge(network_id, bridge, generation)
        with self.host.lock(("segment", spec.vni)):
            bridge, _vxlan = read_segment(self.host, spec.vni)
            holder = names.parse_alias(bridge.alias) if bridge is not None else None
            if holder is not None and holder.network != network_id and not holder.held:
                raise PermanentDriverError(
                    f"network {network_id}: VNI {spec.vni} is held here by network "
                    f"{holder.network}")
            segment = ensure_segment(self.host, spec.vni, spec.mtu, self.underlay_ip)
            if last is not None and last.precedes(segment, holder, generation):
                converge_changes(self.host, segment, last.remotes, remotes)
            else:
                converge_remotes(self.host, segment, remotes)
            # Last: the alias says the generation is applied only once it is.
            set_holder(self.host, segment.bridge, names.network_alias(network_id, generation))
        self._converged[network_id] = _Converged(segment.bridge.index, segment.vxlan.index,
                                                 generation, remotes)
        return "up"

    def _remotes(self, spec: NetworkSpec, last: Remotes | None) -> Remotes:
        """The other hosts' VTEPs and ports, checked (a port as it was last converged
        needs no second check: the fold sends most of them unchanged, job after job)."""
        own = self.underlay_ip
        # The fold lists other hosts only; this host's own ports come with their instances.
        vteps = frozenset(_ipv4(v, "vtep") for v in spec.vteps) - {own}
        ports: dict[str, Remote] = {}
        for p in spec.ports:
            known = last.ports.get(p.mac) if last is not None else None
            if known is not None and known.ip == p.ip and known.vtep == p.vtep:
                ports[p.mac] = known
            else:
                remote = Remote(_mac(p.mac), _ipv4(p.ip, "port ip"), _ipv4(p.vtep, "port vtep"))
                if remote.vtep != own:
                    ports[remote.mac] = remote
        return Remotes(vteps, ports)

    def _remove(self, network_id: str, held: list[tuple[Link, names.Holder]],
                generation: int) -> Observed:
        observed: Observed = "absent"
        for bridge, _holder in held:
            if not self._remove_bridge(network_id, bridge, generation):
                observed = "held"
        return observed

    def _remove_bridge(self, network_id: str, bridge: Link, generation: int) -> bool:
        """Remove one segment of the network; True if gone, False if held for its ports."""
        vni = names.vni_of(bridge.name)
        assert vni is not None
        with self.host.lock(("segment", vni)):
            if remove_segment(self.host, vni):
                return True
            bridge_now = self.host.rtnl.link(bridge.name)
            if bridge_now is not None:
                alias = names.network_alias(network_id, generation, held=True)
                set_holder(self.host, bridge_now, alias)
            return False

    def sweep(self) -> list[str]:
        """Remove the segment links that nothing holds: a bridge whose alias names no live
        network (made for a port whose network job never came, or held for ports that
        are gone) and that no guest port uses, and a VXLAN device without its bridge.
        Returns the links removed. Call it only after a complete resync has applied every
        wanted job (Neutron's bugs 1813703/1813714 came from sweeping earlier)."""
        removed: list[str] = []
        with _errors("sweep segments"):
            links = self.host.rtnl.links()
            bridges = {link.name: link for link in links if link.kind == "bridge"
                       and link.name.startswith(names.BRIDGE_PREFIX)
                       and names.vni_of(link.name) is not None}
            for link in links:
                vni = names.vni_of(link.name)
                if (link.kind == "vxlan" and link.name.startswith(names.VXLAN_PREFIX)
                        and vni is not None and names.bridge_name(vni) not in bridges):
                    with self.host.lock(("segment", vni)):
                        if read_segment(self.host, vni)[0] is None:
                            remove_segment(self.host, vni)
                            removed.append(link.name)
            for name, bridge in sorted(bridges.items()):
                vni = names.vni_of(name)
                assert vni is not None
                holder = names.parse_alias(bridge.alias)
                if holder is not None and not holder.held:
                    continue  # a network holds it: its job (or its removal) decides
                with self.host.lock(("segment", vni)):
                    now, _vxlan = read_segment(self.host, vni)
                    if now is None or now.alias != bridge.alias or guest_ports(self.host, now):
                        continue
                    remove_segment(self.host, vni)
                    removed.append(name)
        return removed

    def remove(self, network_id: str) -> bool:
        """Remove the network's segments here (a sweep: no job wants it); False if there
        was nothing to remove, or if its bridge must stay for attached ports."""
        with _errors(f"remove network {network_id}"):
            held = self._held().get(network_id, [])
            if not held:
                return False
            generation = max(h.generation for _, h in held)
            return self._remove(network_id, held, generation) == "absent"


__all__ = ["NetworkDriver"]
