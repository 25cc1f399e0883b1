"""Names of everything the dataplane owns on a host: it touches nothing that lacks them.

- a segment's bridge ``obr<vni>`` and VXLAN device ``ovx<vni>`` (decimal VNI);
- a guest port ``ot<hash><index>`` (a QEMU tap or a namespace guest's veth, host side);
- the nft tables ``orch_ports`` (family bridge) and ``orch_guests`` (family inet).

A segment's bridge also says, in its alias (IFLA_IFALIAS), which network and generation it
holds, so that a restarted agent adopts it from the kernel alone.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

BRIDGE_PREFIX = "obr"
VXLAN_PREFIX = "ovx"
PORT_PREFIX = "ot"
PORTS_TABLE = "orch_ports"  # family bridge: anti-spoofing, marks of frames to guests
GUESTS_TABLE = "orch_guests"  # family inet: stateful inbound rules, conntrack zones
VXLAN_UDP_PORT = 4789
IFNAMSIZ = 16  # with its NUL

_ALIAS_PREFIX = "orch:"
SEGMENT_ALIAS = "orch:segment"  # created for a port before its network's job came
_NETWORK_ALIAS = re.compile(r"^orch:network:([a-z0-9][a-z0-9_-]{0,62}):(\d+)(:held)?$")
_PORT_NAME = re.compile(r"^ot[0-9a-f]{10}[0-9a-f]{1,3}$")


def bridge_name(vni: int) -> str:
    return f"{BRIDGE_PREFIX}{vni}"


def vxlan_name(vni: int) -> str:
    return f"{VXLAN_PREFIX}{vni}"


def bridge_mac(vni: int) -> str:
    """The segment bridge's own address, set rather than left to the kernel: a bridge whose
    address is its ports' lowest takes a new one when a lower port joins, and the kernel
    then flushes its neighbour table, permanent entries too (every remote address: ARP
    then went unanswered until the next network job, which re-added and re-announced
    them all). It never leaves the host (the bridge has no address and sends nothing);
    locally administered, unicast, 46 bits of hash, as the guests' (schemas.ids)."""
    h = hashlib.sha256(f"bridge/{vni}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (h[0] & 0xFC | 0x02, *h[1:6]))


def vni_of(name: str) -> int | None:
    """The VNI of one of our segment links (bridge or VXLAN), None for any other name."""
    for prefix in (BRIDGE_PREFIX, VXLAN_PREFIX):
        digits = name[len(prefix):]
        if name.startswith(prefix) and digits.isdigit() and str(int(digits)) == digits:
            return int(digits)
    return None


def port_name(instance_id: str, index: int) -> str:
    """Host-side name of NIC ``index`` of an instance (<= 15 chars), the tap's or veth's.

    The same as the VM driver's ``tap_name`` has always been, so existing taps keep it.
    """
    digest = hashlib.sha256(f"{instance_id}/{index}".encode()).digest()
    return f"{PORT_PREFIX}{digest[:5].hex()}{index:x}"[:15]


def is_port_name(name: str) -> bool:
    return bool(_PORT_NAME.match(name))


@dataclass(frozen=True)
class Holder:
    """What a segment bridge's alias says: the network it holds and at which generation;
    ``held``: the network was removed here, the bridge stays for ports still attached."""

    network: str
    generation: int
    held: bool = False


def network_alias(network: str, generation: int, *, held: bool = False) -> str:
    return f"orch:network:{network}:{generation}" + (":held" if held else "")


def parse_alias(alias: str | None) -> Holder | None:
    """The holder an alias names; None for a bridge no network holds (or not ours)."""
    match = _NETWORK_ALIAS.match(alias or "")
    if match is None:
        return None
    return Holder(match[1], int(match[2]), bool(match[3]))


def is_our_alias(alias: str | None) -> bool:
    return alias is not None and alias.startswith(_ALIAS_PREFIX)


def zone_chain(zone: int) -> str:
    return f"zone_{zone}"
