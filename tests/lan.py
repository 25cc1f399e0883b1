"""A private LAN for real guests: a bridge, and a test namespace on it that pings them.

The bridge carries no address in the root namespace: the only peer the guests can reach
is the namespace the test created, and every probe is sent from inside it.
"""

import contextlib
import ipaddress
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = subprocess.run(["ip", "-4", "-o", "addr"], check=True, capture_output=True, text=True)
    return [ipaddress.ip_interface(line.split()[3]).network for line in out.stdout.splitlines()]


@dataclass(frozen=True)
class Lan:
    bridge: str
    netns: str
    net: ipaddress.IPv4Network

    def address(self, n: int) -> str:
        return str(self.net[n])

    def ping(self, address: str, attempts: int = 20) -> None:
        for _ in range(attempts):
            done = subprocess.run(["ip", "netns", "exec", self.netns, "ping", "-c1", "-W1",
                                   address], capture_output=True)
            if done.returncode == 0:
                return
            time.sleep(0.5)
        raise AssertionError(f"{address} does not answer ping on {self.bridge}")


@contextlib.contextmanager
def guest_lan() -> Iterator[Lan]:
    tag = secrets.token_hex(3)
    bridge, netns, outside, inside = f"olb{tag}", f"olns{tag}", f"olv{tag}", f"olp{tag}"
    used = _used_networks()
    while True:
        net = ipaddress.IPv4Network(f"10.213.{secrets.randbelow(256)}.0/24")
        if not any(net.overlaps(u) for u in used):
            break
    try:
        ip("link", "add", bridge, "type", "bridge")
        ip("link", "set", bridge, "up")
        ip("netns", "add", netns)
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        ip("link", "set", outside, "master", bridge, "up")
        ip("link", "set", inside, "netns", netns)
        ip("-n", netns, "addr", "add", f"{net[1]}/{net.prefixlen}", "dev", inside)
        ip("-n", netns, "link", "set", inside, "up")
        ip("-n", netns, "link", "set", "lo", "up")
        yield Lan(bridge, netns, net)
    finally:
        for cmd in (["netns", "del", netns], ["link", "del", outside], ["link", "del", bridge]):
            subprocess.run(["ip", *cmd], capture_output=True)
