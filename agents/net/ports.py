"""Plugging a guest's port into its segment: what the guest drivers call.

The port is the host side of a guest NIC, named `names.port_name(instance, index)`: a
QEMU guest's tap (libvirt creates it, bare) or a namespace guest's veth. Plugging it:

1. converges its firewall (`agents.net.firewall`) *before* the port joins the bridge, so
   no frame of the guest is ever forwarded unchecked (OVN's rule: a port is plugged once
   its flows are written); ports plugged at the same time share one nft transaction;
2. ensures its segment (bridge and VXLAN device): the instance's job may come before its
   network's job;
3. sets its MTU to the segment's, attaches it to the bridge and brings it up;
4. once attached, announces its (IP, MAC) to the other local ports (`agents.net.announce`):
   the address may be a freed one whose old holder's MAC their guests still hold.

IPv6 is turned off on the port first (the host then sends nothing of its own to the guest).

Everything is read from the kernel first and only what differs is written.
"""

from __future__ import annotations

from agents.net import names
from agents.net.announce import Binding, announce
from agents.net.errors import NetlinkError, PermanentNetError, TransientNetError, classify
from agents.net.firewall import Firewall, PortPolicy
from agents.net.host import DEFAULT_TIMEOUT, HostNet
from agents.net.netlink import Message
from agents.net.rtnl import NUD_PERMANENT, Link, check_ipv4, delete_neighbour, set_link
from agents.net.segment import ensure_segment, guest_ports, remove_segment
from schemas.specs import NicSpec, SecurityRule


def _check(port: str, nic: NicSpec) -> None:
    if not port.startswith(names.PORT_PREFIX) or not 2 < len(port) < names.IFNAMSIZ:
        raise PermanentNetError(f"port {port!r}: not a guest port name (see names.port_name)")
    try:
        check_ipv4(nic.ip)
    except ValueError as exc:
        raise PermanentNetError(f"port {port}: {nic.ip!r} is not an IPv4 address") from exc


class PortPlumbing:
    """Guest ports of one host namespace (None: this process's own)."""

    def __init__(self, netns: str | None, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.host = HostNet.open(netns, timeout)
        self.firewall = Firewall(self.host)

    def close(self) -> None:
        self.host.close()

    def __enter__(self) -> PortPlumbing:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def writes(self) -> int:
        """Netlink messages, nft commands and announcements (gratuitous ARPs) made so far
        in this namespace."""
        return self.host.rtnl.writes + self.firewall.commands + self.host.announced

    def plug(self, port: str, nic: NicSpec, rules: tuple[SecurityRule, ...],
             underlay_ip: str) -> None:
        """Attach ``port`` to the segment of ``nic`` behind its firewall; idempotent.

        TransientNetError if the port's link does not exist (yet): a guest driver plugs
        after creating it.
        """
        _check(port, nic)
        ip, mac = check_ipv4(nic.ip), nic.mac.lower()
        found = self._link(port)
        if found is None:
            raise TransientNetError(f"port {port} does not exist")
        # IPv6 off before the port joins anything; read from the link, so a plugged port
        # costs no sysctl. Outside the segment's lock: a port's first sysctl opens its file
        # on the namespace's sysctl thread, and under the lock that hop kept every other
        # plug of the segment waiting.
        if found.ipv6_disabled is False:
            self.host.sysctl(f"net.ipv6.conf.{port}.disable_ipv6", "1")
        # The firewall first: nothing of the guest is forwarded before it is in place.
        # (Outside the segment's lock, so that ports of one segment plugged at the same time
        # share an nft transaction.)
        self.firewall.converge(PortPolicy(port, names.bridge_name(nic.vni), nic.mac, nic.ip,
                                          rules))
        # Under the segment's lock: a sweep or the last port's unplug cannot remove the
        # bridge between its creation here and this port joining it.
        with self.host.lock(("segment", nic.vni)):
            segment = ensure_segment(self.host, nic.vni, nic.mtu, underlay_ip)
            link = self._link(port)
            if link is None:
                raise TransientNetError(f"port {port} vanished while being plugged")
            changes: list[Message] = []
            if link.mtu != nic.mtu:
                changes.append(set_link(port, link.index, mtu=nic.mtu))
            if link.master != segment.bridge.index:
                changes.append(set_link(port, link.index, master=segment.bridge.index))
            if not link.up:
                changes.append(set_link(port, link.index, up=True))
            self._write(changes)
            joined = link.master != segment.bridge.index
            if joined:
                self._forget_remote(segment.bridge, ip, mac)
        if joined:  # outside the lock: the frame waits for no other plug
            announce(self.host, segment.bridge, [Binding(ip, mac)])

    def unplug(self, port: str) -> bool:
        """Remove the port's firewall and detach it from its segment; a segment left
        without ports that no network holds goes too. False: nothing was there."""
        removed = self.firewall.remove(port)
        link = self._link(port)
        if link is None or link.master is None:
            return removed
        bridge = self._bridge(link.master)
        if bridge is None:
            return removed
        vni = names.vni_of(bridge.name)
        # Detach and decide under the segment's lock: a network's removal in between would
        # see this port still attached and hold the bridge, while we read it not held yet,
        # and the empty segment would stay until a sweep.
        with self.host.lock(("segment", vni)):
            self._write([set_link(port, link.index, master=0)])
            bridge = self._bridge(bridge.index)
            holder = names.parse_alias(bridge.alias) if bridge is not None else None
            if (bridge is not None and vni is not None and (holder is None or holder.held)
                    and not guest_ports(self.host, bridge)):
                remove_segment(self.host, vni)
        return True

    def plugged(self) -> set[str]:
        """Ports with firewall objects here, or attached to a segment bridge."""
        found = self.firewall.ports()
        try:
            links = self.host.rtnl.links()
        except NetlinkError as exc:
            raise classify(exc) from exc
        bridges = {link.index for link in links if link.kind == "bridge"
                   and names.vni_of(link.name) is not None}
        found |= {link.name for link in links
                  if link.master in bridges and names.is_port_name(link.name)}
        return found

    # -- helpers ----------------------------------------------------------------------------

    def _forget_remote(self, bridge: Link, ip: str, mac: str) -> None:
        """A port just joined: its address may have been another MAC's until now (reused,
        or remote). The bridge forgets a remote entry for it at another MAC (it would answer
        ARP with that one)."""
        try:
            held = self.host.rtnl.neighbour(bridge.index, ip)
        except NetlinkError as exc:
            raise classify(exc) from exc
        if held is not None and held.mac != mac and held.state & NUD_PERMANENT:
            self._write([delete_neighbour(bridge.index, ip)])

    def _link(self, name: str) -> Link | None:
        try:
            return self.host.rtnl.link(name)
        except NetlinkError as exc:
            raise classify(exc) from exc

    def _bridge(self, index: int) -> Link | None:
        try:
            for link in self.host.rtnl.links(kind="bridge"):
                if link.index == index and names.vni_of(link.name) is not None:
                    return link
        except NetlinkError as exc:
            raise classify(exc) from exc
        return None

    def _write(self, messages: list[Message]) -> None:
        if not messages:
            return
        try:
            self.host.rtnl.write(messages)
        except NetlinkError as exc:
            raise classify(exc) from exc
