"""A private network's segment on one host: bridge ``obr<vni>`` and VXLAN ``ovx<vni>``, its
forwarding entries to the other hosts, and neighbour entries for the remote addresses.

- Head-end replication: one all-zero-MAC entry per remote VTEP on the VXLAN device, so
  broadcast and unknown unicast reach every other host of the segment.
- A remote MAC: one entry on the VXLAN device saying which VTEP it lives behind, and a
  static entry of the bridge sending it to the VXLAN port. The VXLAN port does not learn
  (so a frame from another host cannot move a MAC), and the bridge entry is what ARP
  suppression needs to answer for the MAC.
- ARP suppression (``neigh_suppress`` on the VXLAN port) with a permanent neighbour entry
  per remote address on the bridge: the bridge answers a guest's ARP request for a remote
  address itself, and the request does not cross VXLAN. A request for an address that
  has no entry still crosses, as before.
- An address new here, or at another MAC (reused after its instance was deleted), is
  announced to the local ports (`agents.net.announce`) once its entry is written: the
  guests that talked to the old holder take the new MAC at once.

Converging reads the kernel (links, FDB, neighbours), compares with what is wanted, and
writes only the differences, in one batch. Removals are keyed by (MAC, VTEP) as read: the
kernel ignores a removal of (MAC, old VTEP) once the MAC points at another VTEP. Between
two jobs of a segment this process converged (`converge_changes`), only the entries of what
the jobs differ in are read, one by one, and written.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from agents.net import names
from agents.net.announce import Binding, announce
from agents.net.errors import NetlinkError, PermanentNetError, classify
from agents.net.host import HostNet
from agents.net.netlink import Message
from agents.net.rtnl import (
    GONE,
    NUD_NOARP,
    NUD_PERMANENT,
    ZERO_MAC,
    Link,
    Neighbour,
    add_bridge_fdb,
    add_flood,
    bridge_settings_ok,
    check_ipv4,
    create_bridge,
    create_vxlan,
    delete_bridge_fdb,
    delete_link,
    delete_neighbour,
    delete_vxlan_fdb,
    set_bridge,
    set_bridge_port,
    set_link,
    set_neighbour,
    set_remote_mac,
)

# Up to this many remote MACs without the bridge's entry are looked up one by one; more
# (a segment converged from empty) are read from one dump of the bridge's whole FDB.
_LOOKUPS_MAX = 32


@dataclass(frozen=True)
class Segment:
    vni: int
    bridge: Link
    vxlan: Link
    repaired: bool = False  # ensure_segment had to create or correct something


@dataclass(frozen=True)
class Remote:
    """A port of the segment on another host (the job's RemotePort, checked)."""

    mac: str
    ip: str
    vtep: str


@dataclass(frozen=True)
class Remotes:
    """What a segment holds of the other hosts: their VTEPs, and their ports by MAC."""

    vteps: frozenset[str]
    ports: dict[str, Remote]


def _write(host: HostNet, messages: list[Message], *, ignore: frozenset[int] = GONE) -> int:
    try:
        host.rtnl.write(messages, ignore=ignore)
    except NetlinkError as exc:
        raise classify(exc) from exc
    return len(messages)


def _read(host: HostNet, vni: int) -> tuple[Link | None, Link | None]:
    try:
        return host.rtnl.link(names.bridge_name(vni)), host.rtnl.link(names.vxlan_name(vni))
    except NetlinkError as exc:
        raise classify(exc) from exc


def _vxlan_ok(link: Link, vni: int, underlay_ip: str) -> bool:
    return (link.kind == "vxlan" and link.vni == vni and link.local == underlay_ip
            and link.udp_port == names.VXLAN_UDP_PORT and link.learning is False)


def ensure_segment(host: HostNet, vni: int, mtu: int, underlay_ip: str) -> Segment:
    """The segment's bridge and VXLAN device, created or corrected as needed; idempotent.

    Both the network driver and the port plumbing call it: an instance's job may come
    before its network's job, and a guest's port needs the bridge to exist.
    """
    underlay_ip = check_ipv4(underlay_ip)
    bridge_name, vxlan_name = names.bridge_name(vni), names.vxlan_name(vni)
    with host.lock(("segment", vni)):
        bridge, vxlan = _read(host, vni)
        if bridge is not None and bridge.kind != "bridge":
            raise PermanentNetError(f"{bridge_name} exists and is not a bridge")
        create: list[Message] = []
        if bridge is None:
            create.append(create_bridge(bridge_name, mtu, names.bridge_mac(vni)))
        if vxlan is not None and not _vxlan_ok(vxlan, vni, underlay_ip):
            create.append(delete_link(vxlan_name, vxlan.index))  # ours by its name: redo it
            vxlan = None
        if vxlan is None:
            create.append(create_vxlan(vxlan_name, vni, underlay_ip, mtu,
                                       names.VXLAN_UDP_PORT))
        if create:
            try:
                host.rtnl.write(create, ignore=GONE)
            except NetlinkError as exc:
                if exc.errno == errno.EEXIST and "VNI" in str(exc):
                    raise PermanentNetError(f"{exc}: another device in this namespace uses "
                                            f"VNI {vni} on port {names.VXLAN_UDP_PORT}"
                                            ) from exc
                raise classify(exc) from exc
            new_bridge, new_vxlan = bridge is None, vxlan is None
            bridge, vxlan = _read(host, vni)
            if bridge is None or vxlan is None:
                raise PermanentNetError(f"segment {vni}: created links are gone")
        else:
            new_bridge = new_vxlan = False
        assert bridge is not None and vxlan is not None
        config: list[Message] = []
        if vxlan.mtu != mtu:
            config.append(set_link(vxlan_name, vxlan.index, mtu=mtu))
        if new_vxlan:
            config.append(set_link(vxlan_name, vxlan.index, no_ipv6=True))
        if vxlan.master != bridge.index:
            config.append(set_link(vxlan_name, vxlan.index, master=bridge.index))
        if vxlan.master != bridge.index or vxlan.port_learning or not vxlan.neigh_suppress:
            config.append(set_bridge_port(vxlan_name, vxlan.index, learning=False,
                                          neigh_suppress=True))
        if not vxlan.up:
            config.append(set_link(vxlan_name, vxlan.index, up=True))
        if bridge.mtu != mtu:
            config.append(set_link(bridge_name, bridge.index, mtu=mtu))
        if bridge.address != names.bridge_mac(vni):  # made by an older agent
            config.append(set_link(bridge_name, bridge.index, address=names.bridge_mac(vni)))
        if not bridge_settings_ok(bridge):
            config.append(set_bridge(bridge_name, bridge.index))
        if not names.is_our_alias(bridge.alias):
            config.append(set_link(bridge_name, bridge.index, alias=names.SEGMENT_ALIAS))
        if new_bridge:
            config.append(set_link(bridge_name, bridge.index, no_ipv6=True))
        if not bridge.up:
            config.append(set_link(bridge_name, bridge.index, up=True))
        if config:
            _write(host, config, ignore=frozenset())
            bridge, vxlan = _read(host, vni)
            if bridge is None or vxlan is None:
                raise PermanentNetError(f"segment {vni}: links vanished while configured")
        # The bridge is L2 for the guests only. The host answered ARP on it for addresses
        # of its other links (an LB node's port): a guest then sent the node's replies to
        # the bridge itself, which delivered them to the host's own stack, in the
        # segment's conntrack zone, where the node's NAT never saw them.
        host.sysctl(f"net.ipv4.conf.{bridge_name}.arp_ignore", "1")
        return Segment(vni, bridge, vxlan, repaired=bool(create or config))


def read_segment(host: HostNet, vni: int) -> tuple[Link | None, Link | None]:
    """The segment's bridge and VXLAN device as they are (None: absent)."""
    return _read(host, vni)


def set_holder(host: HostNet, bridge: Link, alias: str) -> int:
    """Record on the bridge which network and generation it holds; the writes made."""
    if bridge.alias == alias:
        return 0
    return _write(host, [set_link(bridge.name, bridge.index, alias=alias)],
                  ignore=frozenset())


def converge_remotes(host: HostNet, segment: Segment, remotes: Remotes) -> int:
    """Make the segment's flood, FDB and neighbour entries exactly these, and announce each
    address new here or at another MAC to the local ports; the writes and frames sent."""
    vx, br = segment.vxlan.index, segment.bridge.index
    flood_wanted, wanted = remotes.vteps, remotes.ports
    try:
        fdb = host.rtnl.fdb(br, vx)
        neighbours = host.rtnl.neighbours(br)
    except NetlinkError as exc:
        raise classify(exc) from exc
    flood: set[str] = set()
    remote: dict[str, list[str]] = {}  # mac -> the VTEPs the VXLAN device has for it
    static: set[str] = set()  # MACs the bridge sends to the VXLAN port
    for entry in fdb:
        if entry.ifindex != vx:  # a kernel that ignores the dump's filter
            continue
        if not entry.master:
            if entry.dst is None:
                continue
            if entry.mac == ZERO_MAC:
                flood.add(entry.dst)
            else:
                remote.setdefault(entry.mac, []).append(entry.dst)
        elif entry.state & NUD_NOARP and not entry.state & NUD_PERMANENT:
            static.add(entry.mac)  # (PERMANENT: the port's own address, the bridge's)
    writes: list[Message] = []
    writes += [add_flood(vx, vtep) for vtep in sorted(flood_wanted - flood)]
    writes += [delete_vxlan_fdb(vx, ZERO_MAC, vtep) for vtep in sorted(flood - flood_wanted)]
    for mac, dsts in sorted(remote.items()):
        port = wanted.get(mac)
        for dst in dsts:
            if port is None or (dst != port.vtep and len(dsts) > 1):
                writes.append(delete_vxlan_fdb(vx, mac, dst))
    local = _local_macs(host, br, vx, wanted.keys() - static)
    for mac, port in sorted(wanted.items()):
        if port.vtep not in remote.get(mac, ()):
            # Absent, or pointing elsewhere: repointed in place, never removed and re-added.
            writes.append(set_remote_mac(vx, mac, port.vtep))
        if mac not in static and mac not in local:
            # A MAC the bridge has on a local port is here now (a guest that moved in):
            # its local entry wins over a job that still says it is remote.
            writes.append(add_bridge_fdb(vx, mac))
    writes += [delete_bridge_fdb(vx, mac) for mac in sorted(static - wanted.keys())]
    ips = {p.ip: p.mac for p in wanted.values()}
    have = {n.ip: n for n in neighbours}
    news: list[Binding] = []  # bindings this host did not hold: to announce
    for ip in sorted(ips.keys() | have.keys()):
        _address(br, ip, ips.get(ip), have.get(ip), writes, news)
    return _written(host, segment, writes, news)


def converge_changes(host: HostNet, segment: Segment, before: Remotes,
                     after: Remotes) -> int:
    """What `converge_remotes` does, for a segment that held ``before`` when it was last
    converged (by this process, fully or by changes) and must now hold ``after``: only the
    entries of the VTEPs, MACs and addresses that differ between the two are read and
    written, so a membership change costs the same whatever the size of the network. The
    others are trusted as they were; the next full convergence checks them all (a resync,
    which applies the generation the segment holds again)."""
    vx, br = segment.vxlan.index, segment.bridge.index
    writes = [add_flood(vx, vtep) for vtep in sorted(after.vteps - before.vteps)]
    writes += [delete_vxlan_fdb(vx, ZERO_MAC, vtep)
               for vtep in sorted(before.vteps - after.vteps)]
    for mac in sorted(before.ports.keys() - after.ports.keys()):
        # (The bridge's entry goes only if it is the VXLAN port's: a MAC that moved in
        # here keeps its local one.)
        writes += [delete_vxlan_fdb(vx, mac, before.ports[mac].vtep),
                   delete_bridge_fdb(vx, mac)]
    added = after.ports.keys() - before.ports.keys()
    for mac in sorted(after.ports):
        old = before.ports.get(mac)
        if old is None or old.vtep != after.ports[mac].vtep:
            writes.append(set_remote_mac(vx, mac, after.ports[mac].vtep))
    local = _local_macs(host, br, vx, added)
    writes += [add_bridge_fdb(vx, mac) for mac in sorted(added - local)]
    ips_before = {p.ip: p.mac for p in before.ports.values()}
    ips_after = {p.ip: p.mac for p in after.ports.values()}
    news: list[Binding] = []
    for ip in sorted(ips_before.keys() | ips_after.keys()):
        if ips_after.get(ip) == ips_before.get(ip):
            continue
        try:
            held = host.rtnl.neighbour(br, ip)
        except NetlinkError as exc:
            raise classify(exc) from exc
        _address(br, ip, ips_after.get(ip), held, writes, news)
    return _written(host, segment, writes, news)


def _address(bridge: int, ip: str, mac: str | None, held: Neighbour | None,
             writes: list[Message], news: list[Binding]) -> None:
    """The neighbour entry of a remote address (``mac`` None: not wanted), given the one
    the bridge holds: ours are the permanent ones, the kernel's own (multicast, NOARP) are
    left alone. An address new here, or at another MAC, is to be announced."""
    if mac is None:
        if held is not None and held.state & NUD_PERMANENT:
            writes.append(delete_neighbour(bridge, ip))
        return
    if held is None or held.mac != mac or not held.state & NUD_PERMANENT:
        writes.append(set_neighbour(bridge, ip, mac))
    if held is None or held.mac != mac:
        news.append(Binding(ip, mac))


def _written(host: HostNet, segment: Segment, writes: list[Message],
             news: list[Binding]) -> int:
    """Write, then announce: a guest that re-asks for an address is answered with the new
    MAC (a reused address's peers here still hold the old holder's); the writes and frames
    sent."""
    made = _write(host, writes) if writes else 0
    if news:
        made += announce(host, segment.bridge, news)
    return made


def _local_macs(host: HostNet, bridge: int, vx: int, macs: set[str]) -> set[str]:
    """Those of ``macs`` that the bridge has on a port other than the VXLAN device: a
    guest here."""
    try:
        if len(macs) <= _LOOKUPS_MAX:
            return {mac for mac in macs if host.rtnl.bridge_port_of(bridge, mac) not in (None, vx)}
        return {e.mac for e in host.rtnl.fdb(bridge, 0) if e.master and e.ifindex != vx} & macs
    except NetlinkError as exc:
        raise classify(exc) from exc


def guest_ports(host: HostNet, segment_bridge: Link) -> list[Link]:
    """The links attached to a segment's bridge other than its VXLAN device."""
    try:
        links = host.rtnl.links(master=segment_bridge.index)
    except NetlinkError as exc:
        raise classify(exc) from exc
    vni = names.vni_of(segment_bridge.name)
    return [link for link in links if vni is None or link.name != names.vxlan_name(vni)]


def remove_segment(host: HostNet, vni: int) -> bool:
    """Remove the segment: its VXLAN device (and so every entry on it), its neighbour
    entries, and its bridge unless guest ports are still attached. True: all gone."""
    with host.lock(("segment", vni)):
        bridge, vxlan = _read(host, vni)
        writes: list[Message] = []
        if vxlan is not None:
            writes.append(delete_link(vxlan.name, vxlan.index))
        if bridge is None:
            if writes:
                _write(host, writes)
            return True
        if bridge.kind != "bridge":
            raise PermanentNetError(f"{bridge.name} exists and is not a bridge")
        attached = guest_ports(host, bridge)
        if not attached:
            writes.append(delete_link(bridge.name, bridge.index))
        else:
            try:
                neighbours = host.rtnl.neighbours(bridge.index)
            except NetlinkError as exc:
                raise classify(exc) from exc
            writes += [delete_neighbour(bridge.index, n.ip) for n in neighbours
                       if n.state & NUD_PERMANENT]
        if writes:
            _write(host, writes)
        return not attached


def segment_bridges(host: HostNet) -> list[Link]:
    """Every segment bridge of this namespace (``obr<vni>``)."""
    try:
        bridges = host.rtnl.links(kind="bridge")
    except NetlinkError as exc:
        raise classify(exc) from exc
    return [b for b in bridges
            if b.name.startswith(names.BRIDGE_PREFIX) and names.vni_of(b.name) is not None]
