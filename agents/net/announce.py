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
import socket
import struct
from collections.abc import Iterable

from agents.guest_service import netns_socket
from agents.net import names
from agents.net.errors import TransientNetError
from agents.net.host import HostNet
from agents.net.rtnl import Link, mac_bytes

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


def announce(host: HostNet, ports: Iterable[Link], bindings: Iterable[tuple[str, str]]
             ) -> int:
    """Send the GARP of every (ip, mac) out of every guest port that is up; frames sent
    (also added to ``host.announced``, which the drivers count with their writes)."""
    targets = [p.name for p in ports if p.up and names.is_port_name(p.name)]
    frames = [garp_frame(ip, mac) for ip, mac in bindings]
    if not targets or not frames:
        return 0
    sent = 0
    # Made in the host's namespace (setns around socket(), no fork): the socket stays
    # there, so a port's name is looked up there. Protocol 0: it receives nothing.
    try:
        sock = netns_socket(host.netns, socket.AF_PACKET, socket.SOCK_RAW, 0)
    except OSError as exc:
        raise TransientNetError(f"announce {len(frames)} addresses: no packet socket in "
                                f"network namespace {host.netns or '(own)'}: {exc}") from exc
    with sock:
        for port in targets:
            for frame in frames:
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
