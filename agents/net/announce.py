"""Gratuitous ARP sent by a host, on behalf of a port, to its own local ports.

An address freed by a deleted instance goes to the next NIC, with another MAC. Peers that
talked to the old holder keep IP -> old MAC in their ARP cache for 10-48 s, and a GARP
from the new holder never reaches them: the bridge floods no gratuitous ARP to a
``neigh_suppress`` port, and the VXLAN port of every segment is one. So each host
announces a binding that is new to it (a remote port in a network job, a port plugged
here) to the guests behind its own ports, as Neutron does on port binding.

The frame is transmitted on each port device itself (AF_PACKET), which hands it straight
to the guest (veth peer, QEMU's tap, an LB node's end). Never into the bridge or the VXLAN
device: a frame with the holder's MAC entering either would teach the bridges that the MAC
lives here.

A Linux peer that has an entry for the address takes the new MAC from a gratuitous ARP
(it overrides, whatever arp_accept says) as STALE: its next packet goes to the new MAC and
confirms it. A peer without an entry ignores it.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from typing import NamedTuple

from agents.net import names
from agents.net.errors import NetlinkError, classify
from agents.net.host import HostNet
from agents.net.rtnl import mac_bytes

ETH_P_ARP, ETH_P_IP = 0x0806, 0x0800
ARPOP_REQUEST = 1
BROADCAST = b"\xff" * 6
MIN_FRAME = 60  # Ethernet's minimum without FCS: a tap hands the frame to QEMU as it is
_ARP = struct.Struct("!HHBBH6s4s6s4s")


def garp_frame(ip: str, mac: str) -> bytes:
    """A gratuitous ARP request (sender ip == target ip) from ``mac``, to broadcast.

    A request rather than a reply: every stack takes it (RFC 5227's announcement), and
    the target MAC is zero, as that RFC says.
    """
    sender, address = mac_bytes(mac), ipaddress.IPv4Address(ip).packed
    if len(sender) != 6:  # struct would pad a short one silently
        raise ValueError(f"{mac!r} is not a MAC address")
    arp = _ARP.pack(1, ETH_P_IP, 6, 4, ARPOP_REQUEST, sender, address, bytes(6), address)
    return (BROADCAST + sender + struct.pack("!H", ETH_P_ARP) + arp).ljust(MIN_FRAME, b"\0")


class Binding(NamedTuple):
    """An address at its MAC, and the local port it lives behind (never told of itself)."""

    ip: str
    mac: str
    port: str | None = None


def port_names(host: HostNet, bridge: int) -> list[str]:
    """The guest ports of a segment's bridge that are up: where announcements go."""
    try:
        return [name for name, up in host.rtnl.link_states(bridge).items()
                if up and names.is_port_name(name)]
    except NetlinkError as exc:
        raise classify(exc) from exc


def announce(host: HostNet, ports: Iterable[str], bindings: Iterable[Binding]) -> int:
    """Send the GARP of every binding out of every port in ``ports`` but its own; frames
    sent (also added to ``host.announced``, which the drivers count with their writes)."""
    targets = list(ports)
    frames = [(garp_frame(b.ip, b.mac), b.port) for b in bindings]
    if not targets or not frames:
        return 0
    sock = host.packet_socket()
    sent = 0
    for port in targets:
        for frame, own in frames:
            if port == own:
                continue
            try:
                sock.sendto(frame, (port, ETH_P_ARP))
            except OSError:
                # Best effort (a port that just went down or away, a tap whose QEMU
                # is not reading yet): such a peer re-probes on its own, as before.
                break
            sent += 1
    with host.lock("announced"):
        host.announced += sent
    return sent
