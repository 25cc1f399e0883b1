"""Gratuitous ARP sent by a host, on behalf of a port, to its own local ports.

An address freed by a deleted instance goes to the next NIC, with another MAC. Peers that
talked to the old holder keep IP -> old MAC in their ARP cache for 10-48 s, and a GARP
from the new holder never reaches them: the bridge floods no gratuitous ARP to a
``neigh_suppress`` port, and the VXLAN port of every segment is one. So each host
announces a binding that is new to it (a remote port in a network job, a port plugged
here) to the guests behind its own ports, as Neutron does on port binding.

One frame per binding, transmitted on the segment's bridge device (AF_PACKET): the bridge
floods it to every local port (veth peers, QEMU's taps, LB nodes' ends) and, a gratuitous
ARP, to none with ``neigh_suppress`` — so never into the VXLAN device. Its Ethernet source
is the bridge's own MAC, and only the ARP payload names the holder: a bridge learns from
the sources of frames entering its ports, never from what it transmits itself, so no
bridge learns that the holder's MAC lives here. (One frame out of each port instead cost
N^2 frames and a listing of the ports per pass for N ports plugged: 1.4 s of a resync of
333.) The holder's own guest gets it too, and ignores it: the sender is its own address.

A Linux peer that has an entry for the address takes the new MAC from a gratuitous ARP
(it overrides, whatever arp_accept says) as STALE: its next packet goes to the new MAC and
confirms it. A peer without an entry ignores it.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from typing import NamedTuple

from agents.net.host import HostNet
from agents.net.rtnl import Link, mac_bytes

ETH_P_ARP, ETH_P_IP = 0x0806, 0x0800
ARPOP_REQUEST = 1
BROADCAST = b"\xff" * 6
MIN_FRAME = 60  # Ethernet's minimum without FCS: a tap hands the frame to QEMU as it is
_ARP = struct.Struct("!HHBBH6s4s6s4s")


def garp_frame(ip: str, mac: str, source: str) -> bytes:
    """A gratuitous ARP request (sender ip == target ip) for ``mac``, from the Ethernet
    address ``source``, to broadcast.

    A request rather than a reply: every stack takes it (RFC 5227's announcement), and
    the target MAC is zero, as that RFC says.
    """
    sender, address, src = mac_bytes(mac), ipaddress.IPv4Address(ip).packed, mac_bytes(source)
    if len(sender) != 6 or len(src) != 6:  # struct would pad a short one silently
        raise ValueError(f"{mac!r} or {source!r} is not a MAC address")
    arp = _ARP.pack(1, ETH_P_IP, 6, 4, ARPOP_REQUEST, sender, address, bytes(6), address)
    return (BROADCAST + src + struct.pack("!H", ETH_P_ARP) + arp).ljust(MIN_FRAME, b"\0")


class Binding(NamedTuple):
    """An address at its MAC."""

    ip: str
    mac: str


def announce(host: HostNet, bridge: Link, bindings: Iterable[Binding]) -> int:
    """Send the GARP of every binding to the local ports of a segment's ``bridge``; frames
    sent (also added to ``host.announced``, which the drivers count with their writes)."""
    if bridge.address is None:
        return 0  # a bridge always has one; without it there is nothing to send from
    frames = [garp_frame(b.ip, b.mac, bridge.address) for b in bindings]
    sock = host.packet_socket()
    sent = 0
    for frame in frames:
        try:
            sock.sendto(frame, (bridge.name, ETH_P_ARP))
        except OSError:
            # Best effort (a bridge that just went down or away): its guests' peers
            # re-probe on their own, as before.
            break
        sent += 1
    with host.lock("announced"):
        host.announced += sent
    return sent
