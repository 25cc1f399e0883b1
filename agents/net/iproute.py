"""pyroute2's IPRoute in a network namespace, without the fork it makes for one.

``IPRoute(netns=...)`` forks a helper process to open the socket there. A fork of the agent
inherits its event loop's signal wakeup fd, and the helper is ended with SIGTERM: its
handler writes 15 into that fd, and the agent's loop took it for its own SIGTERM and
stopped. Here the calling thread opens the socket in the namespace (setns around
socket(), ~2 ms) and IPRoute uses it.
"""

import socket

from pyroute2 import IPRoute

from agents.guest_service import netns_socket

NETLINK_ROUTE = 0


def iproute_in(netns: str | None) -> IPRoute:
    sock = netns_socket(netns, socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE)
    return IPRoute(fileno=sock.detach())
