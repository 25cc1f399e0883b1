"""The agent's network dataplane: VXLAN segments, guest ports and their firewalls.

- `names`: what the dataplane owns on a host (link prefixes, nft tables, the bridge alias);
- `host.HostNet`: one host network namespace (a thread inside it, its netlink sockets);
- `netlink`, `rtnl`, `nfnl`: lean netlink (batched writes, object-by-object reads);
- `segment`: a network's bridge, VXLAN device, FDB and neighbour entries;
- `firewall`: a guest port's anti-spoofing and inbound rules in nftables;
- `ports.PortPlumbing`: plug/unplug a guest port (what the guest drivers call);
- `announce`: gratuitous ARP to the local ports for an address at a new MAC.

The network driver (`agents.drivers.network`) converges segments from network jobs.
"""
