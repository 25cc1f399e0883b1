"""rtnetlink as the dataplane needs it: links, FDB and neighbour entries; read and written.

Reads return small frozen records parsed from the kernel's answers; writes are `Message`s
that `NetlinkSocket.write` sends in batches. Everything is addressed by ifindex except a
link created in the same batch, which later messages of the batch name by its name.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass
from typing import NamedTuple

from agents.net.netlink import (
    _NLA,
    NETLINK_ROUTE,
    NLA_TYPE_MASK,
    NLM_F_APPEND,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    Message,
    NetlinkSocket,
    attr_list,
    attrs,
    cstr,
    get_or_none,
    nest,
    nla,
    nla_str,
    picked,
)

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
RTM_GETADDR, IFA_ADDRESS = 22, 1

IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_MASTER = 1, 3, 4, 5, 10
IFLA_LINKINFO, IFLA_IFALIAS, IFLA_AF_SPEC, IFLA_EXT_MASK = 18, 20, 26, 29
IFLA_INFO_KIND, IFLA_INFO_DATA, IFLA_INFO_SLAVE_KIND, IFLA_INFO_SLAVE_DATA = 1, 2, 4, 5
IFLA_VXLAN_ID, IFLA_VXLAN_LOCAL, IFLA_VXLAN_LEARNING, IFLA_VXLAN_PORT = 1, 4, 7, 15
IFLA_BRPORT_LEARNING, IFLA_BRPORT_NEIGH_SUPPRESS = 8, 32
IFLA_BR_MCAST_SNOOPING, IFLA_BR_NF_CALL_IPTABLES = 23, 36
IFLA_INET6_CONF, IFLA_INET6_ADDR_GEN_MODE = 2, 8
DEVCONF_DISABLE_IPV6 = 26  # its index in IFLA_INET6_CONF, an array of s32
IN6_ADDR_GEN_MODE_NONE = 1
RTEXT_FILTER_SKIP_STATS = 1 << 3
IFF_UP = 0x1

NDA_DST, NDA_LLADDR, NDA_IFINDEX, NDA_MASTER = 1, 2, 8, 9
NTF_SELF, NTF_MASTER = 0x02, 0x04
NUD_NOARP, NUD_PERMANENT = 0x40, 0x80

_IFINFO = struct.Struct("=BxHiII")
_NDMSG = struct.Struct("=BxxxiHBB")
_IFADDR = struct.Struct("=BBBBI")
_U32 = struct.Struct("=I")
_S32 = struct.Struct("=i")
_BE16 = struct.Struct("!H")
ZERO_MAC = "00:00:00:00:00:00"
# Without IPv6 the kernel refuses an IPv6 attribute: only ask for what it has.
_HAS_IPV6 = os.path.exists("/proc/sys/net/ipv6")


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def mac_str(raw: bytes) -> str:
    return raw.hex(":")


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str | None  # "bridge", "vxlan", "veth", "tun", ...
    master: int | None
    mtu: int
    up: bool
    alias: str | None
    address: str | None
    peer: int | None = None  # IFLA_LINK: a veth's peer, its index in the peer's namespace
    vni: int | None = None  # for a VXLAN device
    local: str | None = None
    udp_port: int | None = None
    learning: bool | None = None  # the VXLAN device's own learning
    port_learning: bool | None = None  # as a bridge port
    neigh_suppress: bool | None = None  # as a bridge port
    nf_call_iptables: bool | None = None  # for a bridge
    mcast_snooping: bool | None = None  # for a bridge
    ipv6_disabled: bool | None = None  # its disable_ipv6 sysctl, read by `Rtnl.link` only


class Fdb(NamedTuple):
    """One FDB entry: on the bridge (``master``) or the device's own (``dst`` for VXLAN)."""

    ifindex: int
    mac: str
    master: bool  # an entry of the bridge for this port, not of the device itself
    state: int
    dst: str | None = None


class Neighbour(NamedTuple):
    ifindex: int
    ip: str
    mac: str | None
    state: int


_LINK_ATTRS = frozenset({IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_MASTER,
                         IFLA_LINKINFO, IFLA_IFALIAS, IFLA_AF_SPEC})
_INFO_ATTRS = {
    "vxlan": frozenset({IFLA_VXLAN_ID, IFLA_VXLAN_LOCAL, IFLA_VXLAN_LEARNING, IFLA_VXLAN_PORT}),
    "bridge": frozenset({IFLA_BR_NF_CALL_IPTABLES, IFLA_BR_MCAST_SNOOPING}),
}
_BRPORT_ATTRS = frozenset({IFLA_BRPORT_LEARNING, IFLA_BRPORT_NEIGH_SUPPRESS})


def _ipv6_disabled(af_spec: memoryview) -> bool | None:
    """The device's disable_ipv6, from its IFLA_AF_SPEC (None: the device has no IPv6)."""
    inet6 = attrs(af_spec).get(socket.AF_INET6)
    conf = None if inet6 is None else attrs(inet6).get(IFLA_INET6_CONF)
    if conf is None or len(conf) < 4 * (DEVCONF_DISABLE_IPV6 + 1):
        return None
    return _S32.unpack_from(conf, 4 * DEVCONF_DISABLE_IPV6)[0] != 0


def _parse_link(body: memoryview, *, ipv6: bool = False) -> Link:
    """``ipv6``: read its disable_ipv6 too (a few µs a link: not for a dump of them all)."""
    _family, _type, index, flags, _change = _IFINFO.unpack_from(body, 0)
    a = picked(body, _LINK_ATTRS, _IFINFO.size)
    kind = slave_kind = None
    info: dict[int, memoryview] = {}
    slave: dict[int, memoryview] = {}
    if IFLA_LINKINFO in a:
        li = attrs(a[IFLA_LINKINFO])
        kind = cstr(li[IFLA_INFO_KIND]) if IFLA_INFO_KIND in li else None
        slave_kind = cstr(li[IFLA_INFO_SLAVE_KIND]) if IFLA_INFO_SLAVE_KIND in li else None
        # A bridge's data and a bridge port's are ~40 attributes each: only ours are read.
        if IFLA_INFO_DATA in li and kind in _INFO_ATTRS:
            info = picked(li[IFLA_INFO_DATA], _INFO_ATTRS[kind])
        if IFLA_INFO_SLAVE_DATA in li and slave_kind == "bridge":
            slave = picked(li[IFLA_INFO_SLAVE_DATA], _BRPORT_ATTRS)
    vxlan: dict[str, object] = {}  # the kind's own settings (VXLAN or bridge)
    if kind == "vxlan":
        vxlan = {
            "vni": _U32.unpack(info[IFLA_VXLAN_ID])[0] if IFLA_VXLAN_ID in info else None,
            "local": (socket.inet_ntoa(info[IFLA_VXLAN_LOCAL])
                      if IFLA_VXLAN_LOCAL in info else None),
            "udp_port": (_BE16.unpack(info[IFLA_VXLAN_PORT])[0]
                         if IFLA_VXLAN_PORT in info else None),
            "learning": bool(info[IFLA_VXLAN_LEARNING][0]) if IFLA_VXLAN_LEARNING in info
            else None,
        }
    if kind == "bridge":
        vxlan = {
            "nf_call_iptables": (bool(info[IFLA_BR_NF_CALL_IPTABLES][0])
                                 if IFLA_BR_NF_CALL_IPTABLES in info else None),
            "mcast_snooping": (bool(info[IFLA_BR_MCAST_SNOOPING][0])
                               if IFLA_BR_MCAST_SNOOPING in info else None),
        }
    brport: dict[str, object] = {}
    if slave_kind == "bridge":
        brport = {
            "port_learning": (bool(slave[IFLA_BRPORT_LEARNING][0])
                              if IFLA_BRPORT_LEARNING in slave else None),
            "neigh_suppress": (bool(slave[IFLA_BRPORT_NEIGH_SUPPRESS][0])
                               if IFLA_BRPORT_NEIGH_SUPPRESS in slave else None),
        }
    return Link(
        index=index,
        name=cstr(a[IFLA_IFNAME]),
        kind=kind,
        master=_U32.unpack(a[IFLA_MASTER])[0] if IFLA_MASTER in a else None,
        mtu=_U32.unpack(a[IFLA_MTU])[0] if IFLA_MTU in a else 0,
        up=bool(flags & IFF_UP),
        alias=cstr(a[IFLA_IFALIAS]) if IFLA_IFALIAS in a else None,
        address=mac_str(a[IFLA_ADDRESS]) if IFLA_ADDRESS in a else None,
        peer=_U32.unpack(a[IFLA_LINK])[0] if IFLA_LINK in a else None,
        ipv6_disabled=_ipv6_disabled(a[IFLA_AF_SPEC]) if ipv6 and IFLA_AF_SPEC in a else None,
        **vxlan,  # type: ignore[arg-type]
        **brport,  # type: ignore[arg-type]
    )


def _neigh_attrs(body: memoryview) -> tuple[bytes | None, bytes | None]:
    """NDA_LLADDR and NDA_DST of a neighbour message (a hot loop: no dict per entry)."""
    lladdr = dst = None
    offset, end = _NDMSG.size, len(body)
    while offset + 4 <= end:
        size, kind = _NLA.unpack_from(body, offset)
        if size < 4:
            break
        kind &= NLA_TYPE_MASK
        if kind == NDA_LLADDR:
            lladdr = bytes(body[offset + 4:offset + size])
        elif kind == NDA_DST:
            dst = bytes(body[offset + 4:offset + size])
        offset += (size + 3) & ~3
    return lladdr, dst


def _ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return _IFINFO.pack(socket.AF_UNSPEC, 0, index, flags, change)


_SKIP_STATS = nla(IFLA_EXT_MASK, _U32.pack(RTEXT_FILTER_SKIP_STATS))


class Rtnl(NetlinkSocket):
    """An rtnetlink socket (strict checking, so that dumps are filtered by the kernel)."""

    def __init__(self, timeout: float) -> None:
        super().__init__(NETLINK_ROUTE, timeout, strict=True)

    # -- reading ----------------------------------------------------------------------------

    def link(self, name: str) -> Link | None:
        answer = get_or_none(self, RTM_GETLINK, _ifinfo() + nla_str(IFLA_IFNAME, name)
                             + _SKIP_STATS, f"get link {name}")
        return _parse_link(answer[0][1], ipv6=True) if answer else None

    def links(self, *, master: int | None = None, kind: str | None = None) -> list[Link]:
        """Every link, or those enslaved to ``master``, or those of ``kind``."""
        query = _ifinfo() + _SKIP_STATS
        if master is not None:
            query += nla(IFLA_MASTER, _U32.pack(master))
        if kind is not None:
            query += nest(IFLA_LINKINFO, nla_str(IFLA_INFO_KIND, kind))
        what = "list links" + (f" of master {master}" if master is not None else "")
        return [_parse_link(body) for _kind, body in self.dump(RTM_GETLINK, query, what)]

    def link_states(self) -> dict[str, bool]:
        """Whether each link is up, by name: what observing guests needs, read without
        parsing the rest of each link."""
        query = _ifinfo() + _SKIP_STATS
        out = {}
        for _kind, body in self.dump(RTM_GETLINK, query, "list link states"):
            flags = _IFINFO.unpack_from(body, 0)[3]
            for kind, value in attr_list(body, _IFINFO.size):
                if kind == IFLA_IFNAME:  # the kernel writes it first
                    out[cstr(value)] = bool(flags & IFF_UP)
                    break
        return out

    def addresses(self, ifindex: int) -> set[tuple[str, int]]:
        """The IPv4 (address, prefix length) of one device."""
        query = _IFADDR.pack(socket.AF_INET, 0, 0, 0, ifindex)
        out = set()
        for _kind, body in self.dump(RTM_GETADDR, query, f"list addresses of {ifindex}"):
            _family, prefixlen, _flags, _scope, index = _IFADDR.unpack_from(body, 0)
            address = attrs(body, _IFADDR.size).get(IFA_ADDRESS)
            if index == ifindex and address is not None and len(address) == 4:
                out.add((socket.inet_ntoa(address), prefixlen))
        return out

    def neighbour(self, ifindex: int, ip: str) -> Neighbour | None:
        """The IPv4 neighbour entry of ``ip`` on one device, if any (a get, not a dump)."""
        query = (_NDMSG.pack(socket.AF_INET, ifindex, 0, 0, 0)
                 + nla(NDA_DST, socket.inet_aton(ip)))
        answer = get_or_none(self, RTM_GETNEIGH, query, f"get neighbour {ip} on {ifindex}")
        if not answer:
            return None
        body = answer[0][1]
        _family, index, state, _flags, _type = _NDMSG.unpack_from(body, 0)
        lladdr, _dst = _neigh_attrs(body)
        return Neighbour(index, ip, lladdr.hex(":") if lladdr else None, state)

    def fdb(self, bridge: int, port: int) -> list[Fdb]:
        """The FDB entries of one port of a bridge (0: of every port): the bridge's for it,
        and the port's own (a VXLAN device's, with their ``dst``). Filtered by the kernel:
        the other ports' entries (a local port's own address, its multicast ones) are not
        even sent."""
        query = (_NDMSG.pack(socket.AF_BRIDGE, port, 0, 0, 0)
                 + nla(NDA_MASTER, _U32.pack(bridge)))
        out = []
        for _kind, body in self.dump(RTM_GETNEIGH, query, f"list fdb of port {port}"):
            _family, ifindex, state, flags, _type = _NDMSG.unpack_from(body, 0)
            lladdr, dst = _neigh_attrs(body)
            if lladdr is not None:
                out.append(Fdb(ifindex, lladdr.hex(":"), not flags & NTF_SELF, state,
                               socket.inet_ntoa(dst) if dst and len(dst) == 4 else None))
        return out

    def bridge_port_of(self, bridge: int, mac: str) -> int | None:
        """The port on which the bridge has ``mac`` (learned or static), if it has it (a
        get, not a dump)."""
        query = (_NDMSG.pack(socket.AF_BRIDGE, 0, 0, 0, 0) + nla(NDA_MASTER, _U32.pack(bridge))
                 + nla(NDA_LLADDR, mac_bytes(mac)))
        answer = get_or_none(self, RTM_GETNEIGH, query, f"get fdb {mac} of bridge {bridge}")
        return _NDMSG.unpack_from(answer[0][1], 0)[1] if answer else None

    def neighbours(self, ifindex: int) -> list[Neighbour]:
        """The IPv4 neighbour entries of one device."""
        query = _NDMSG.pack(socket.AF_INET, 0, 0, 0, 0) + nla(NDA_IFINDEX, _U32.pack(ifindex))
        out = []
        for _kind, body in self.dump(RTM_GETNEIGH, query, f"list neighbours of {ifindex}"):
            _family, index, state, _flags, _type = _NDMSG.unpack_from(body, 0)
            lladdr, dst = _neigh_attrs(body)
            if dst is not None and len(dst) == 4 and index == ifindex:
                out.append(Neighbour(index, socket.inet_ntoa(dst),
                                     lladdr.hex(":") if lladdr else None, state))
        return out


# -- writing --------------------------------------------------------------------------------

def _by(index: int | None, name: str | None) -> tuple[bytes, bytes]:
    """An ifinfomsg addressing a link by index, or by name (one created in the same batch)."""
    if index:
        return _ifinfo(index), b""
    assert name is not None
    return _ifinfo(), nla_str(IFLA_IFNAME, name)


# A segment bridge's own settings: its IPv4 goes through br_netfilter whatever the
# namespace's sysctl says, and it does no multicast snooping (so it joins no group and
# sends no IGMP report of its own into the segment; multicast floods, as VXLAN head-end
# replication does anyway).
_BRIDGE_DATA = nest(IFLA_INFO_DATA, nla(IFLA_BR_NF_CALL_IPTABLES, b"\1"),
                    nla(IFLA_BR_MCAST_SNOOPING, b"\0"))


def bridge_settings_ok(link: Link) -> bool:
    return link.nf_call_iptables is True and link.mcast_snooping is False


def create_bridge(name: str, mtu: int, address: str) -> Message:
    return Message(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL,
                   _ifinfo() + nla_str(IFLA_IFNAME, name) + nla(IFLA_MTU, _U32.pack(mtu))
                   + nla(IFLA_ADDRESS, mac_bytes(address))
                   + nest(IFLA_LINKINFO, nla_str(IFLA_INFO_KIND, "bridge"), _BRIDGE_DATA),
                   f"create bridge {name} address {address}")


def set_bridge(name: str, index: int) -> Message:
    return Message(RTM_NEWLINK, 0, _ifinfo(index) + nest(
        IFLA_LINKINFO, nla_str(IFLA_INFO_KIND, "bridge"), _BRIDGE_DATA),
        f"set bridge {name} nf_call_iptables 1 mcast_snooping 0")


def create_vxlan(name: str, vni: int, local: str, mtu: int, udp_port: int) -> Message:
    data = nest(IFLA_INFO_DATA,
                nla(IFLA_VXLAN_ID, _U32.pack(vni)),
                nla(IFLA_VXLAN_LOCAL, socket.inet_aton(local)),
                nla(IFLA_VXLAN_PORT, _BE16.pack(udp_port)),
                nla(IFLA_VXLAN_LEARNING, b"\0"))
    return Message(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL,
                   _ifinfo() + nla_str(IFLA_IFNAME, name) + nla(IFLA_MTU, _U32.pack(mtu))
                   + nest(IFLA_LINKINFO, nla_str(IFLA_INFO_KIND, "vxlan"), data),
                   f"create vxlan {name} id {vni} local {local}")


def set_link(name: str, index: int | None = None, *, mtu: int | None = None,
             master: int | None = None, alias: str | None = None, no_ipv6: bool = False,
             address: str | None = None, up: bool | None = None) -> Message:
    """Change a link's settings. ``no_ipv6``: no IPv6 link-local address (addrgenmode
    none), so the host sends nothing of its own into a segment; give it before ``up``."""
    head, by_name = _by(index, name)
    if up is not None:
        head = _IFINFO.pack(socket.AF_UNSPEC, 0, index or 0, IFF_UP if up else 0, IFF_UP)
    body = by_name
    changes = []
    if mtu is not None:
        body += nla(IFLA_MTU, _U32.pack(mtu))
        changes.append(f"mtu {mtu}")
    if master is not None:
        body += nla(IFLA_MASTER, _U32.pack(master))
        changes.append(f"master {master}")
    if alias is not None:
        body += nla(IFLA_IFALIAS, alias.encode())
        changes.append(f"alias {alias}")
    if address is not None:
        body += nla(IFLA_ADDRESS, mac_bytes(address))
        changes.append(f"address {address}")
    if no_ipv6 and _HAS_IPV6:
        body += nest(IFLA_AF_SPEC, nest(socket.AF_INET6, nla(IFLA_INET6_ADDR_GEN_MODE,
                                                             bytes([IN6_ADDR_GEN_MODE_NONE]))))
        changes.append("addrgenmode none")
    if up is not None:
        changes.append("up" if up else "down")
    return Message(RTM_NEWLINK, 0, head + body, f"set {name} {' '.join(changes)}")


def set_bridge_port(name: str, index: int | None, *, learning: bool,
                    neigh_suppress: bool) -> Message:
    head, by_name = _by(index, name)
    slave = nest(IFLA_INFO_SLAVE_DATA,
                 nla(IFLA_BRPORT_LEARNING, bytes([learning])),
                 nla(IFLA_BRPORT_NEIGH_SUPPRESS, bytes([neigh_suppress])))
    return Message(RTM_NEWLINK, 0,
                   head + by_name + nest(IFLA_LINKINFO, nla_str(IFLA_INFO_SLAVE_KIND, "bridge"),
                                         slave),
                   f"set bridge port {name} learning {'on' if learning else 'off'} "
                   f"neigh_suppress {'on' if neigh_suppress else 'off'}")


def delete_link(name: str, index: int) -> Message:
    return Message(RTM_DELLINK, 0, _ifinfo(index), f"delete link {name}")


def _fdb(kind: int, flags: int, ifindex: int, mac: str, *, master: bool,
         dst: str | None, what: str) -> Message:
    # A bridge entry is static (NOARP), never PERMANENT: that would make the MAC local to
    # the bridge, and frames for it would be delivered to the host instead of forwarded.
    state = NUD_NOARP if master else NUD_NOARP | NUD_PERMANENT
    body = (_NDMSG.pack(socket.AF_BRIDGE, ifindex, state, NTF_MASTER if master else NTF_SELF, 0)
            + nla(NDA_LLADDR, mac_bytes(mac)))
    if dst is not None:
        body += nla(NDA_DST, socket.inet_aton(dst))
    return Message(kind, flags, body, what)


def add_flood(ifindex: int, vtep: str) -> Message:
    """Head-end replication to one remote VTEP: one more all-zero entry (append)."""
    return _fdb(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_APPEND, ifindex, ZERO_MAC, master=False,
                dst=vtep, what=f"add flood entry to {vtep}")


def set_remote_mac(ifindex: int, mac: str, vtep: str) -> Message:
    """Where a remote MAC lives: created, or repointed in place (replace)."""
    return _fdb(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, ifindex, mac, master=False,
                dst=vtep, what=f"point {mac} at {vtep}")


def delete_vxlan_fdb(ifindex: int, mac: str, vtep: str) -> Message:
    """Remove (mac, vtep): the kernel ignores it once the MAC points elsewhere."""
    return _fdb(RTM_DELNEIGH, 0, ifindex, mac, master=False, dst=vtep,
                what=f"remove {mac} at {vtep}")


def add_bridge_fdb(port: int, mac: str) -> Message:
    """A static entry of the bridge sending ``mac`` to one port (the VXLAN device)."""
    return _fdb(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, port, mac, master=True, dst=None,
                what=f"forward {mac} to port {port}")


def delete_bridge_fdb(port: int, mac: str) -> Message:
    """Remove the bridge's entry of ``mac`` on this port (not if it moved to another)."""
    return _fdb(RTM_DELNEIGH, 0, port, mac, master=True, dst=None,
                what=f"remove bridge entry {mac} on port {port}")


def set_neighbour(ifindex: int, ip: str, mac: str) -> Message:
    body = (_NDMSG.pack(socket.AF_INET, ifindex, NUD_PERMANENT, 0, 0)
            + nla(NDA_DST, socket.inet_aton(ip)) + nla(NDA_LLADDR, mac_bytes(mac)))
    return Message(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, body, f"neighbour {ip} is {mac}")


def delete_neighbour(ifindex: int, ip: str) -> Message:
    body = _NDMSG.pack(socket.AF_INET, ifindex, 0, 0, 0) + nla(NDA_DST, socket.inet_aton(ip))
    return Message(RTM_DELNEIGH, 0, body, f"remove neighbour {ip}")


# Deleting what is already gone is what was wanted.
GONE = frozenset({errno.ENOENT, errno.ENODEV})


def check_mac(value: str) -> str:
    """A MAC as six colon-separated hex octets, normalised to lower case; ValueError
    otherwise."""
    try:
        raw = bytes.fromhex(value.replace(":", ""))
    except (ValueError, AttributeError):
        raw = b""
    if len(raw) != 6 or len(value) != 17 or value[2::3] != ":::::":
        raise ValueError(f"{value!r} is not a MAC address")
    return mac_str(raw)


def check_ipv4(value: str) -> str:
    """A dotted IPv4 address, normalised; ValueError otherwise. In C (inet_pton takes a
    strict dotted quad, as ipaddress does): ipaddress.IPv4Address was 40 % of applying a
    network job of 1,000 ports."""
    try:
        return socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, value))
    except (OSError, TypeError) as exc:
        raise ValueError(f"{value!r} does not appear to be an IPv4 address") from exc
