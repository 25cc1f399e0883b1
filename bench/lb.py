"""LB dataplane benchmark: an LB node's nftables against real traffic, and its table updates.

    .venv/bin/python bench/lb.py [--part a,b,c] [--seconds 3] [--backends 1000] [--updates 5]

(a) Connections per second from one client, sequential (connect, send a line, read the
    backend's answer up to its close, reset), through the VIP of an LB node (maglev table,
    DNAT and SNAT) against the same client connecting straight to the same backends in
    turn, along the same path (the client's route to the backends' network goes through
    the same node, which only routes and masquerades it). Target: ratio >= 0.8.
(b) A table update for 1,000 backends (maglev, M = 131,101 buckets): one backend leaves
    or comes back; timed are the planning (the new table and the diff against the one
    held: `nftplan.desired` + `nftplan.plan`) plus the one nft transaction. Target:
    <= 100 ms. The first full write of the table is reported too.
(c) The share of the other flows moved when 1 of N backends leaves, N = 4, 16, 64 (every
    bucket of the table is a flow class: all of them are counted), worst and mean over
    the backends that may leave.

(a) runs on a Fabric (hypervisor h1 with two namespace guests, LB node lb1, a client
namespace veth'd to lb1), (b) in the LB node's namespace. Everything is removed at exit.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents.drivers.lb import LbDriver, port_names
from agents.drivers.netns_guest import NetnsGuestDriver
from agents.drivers.network import NetworkDriver
from agents.guest_service import PORT as GUEST_PORT
from agents.lb import maglev, nftplan
from agents.net.host import HostNet
from orchestrator.fabric import Fabric, free_underlay, netns_socket
from schemas.ids import mac_address
from schemas.specs import (
    Backend,
    InstanceSpec,
    InstanceTemplate,
    LbSpec,
    NetworkSpec,
    Nic,
    NicSpec,
    RemotePort,
    SecurityRule,
    Service,
)

NET, VNI, LB = "bench-net", 4343, "bench"
SERVICE = Service(port=80, target_port=GUEST_PORT, protocol="tcp",
                  strategy="maglev")  # type: ignore[arg-type]


def sh(*argv: str) -> None:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


def one_connection(client: str, source: str, address: str, port: int) -> str:
    """One connection: a request line, the answer up to the server's FIN, then an abortive
    close (RST). Half-closing first, as before, left every client socket in TIME_WAIT:
    bind() takes ports of one parity, so after ~14,000 connections every new one searched
    a nearly exhausted range and the rate fell from ~2,700/s to ~500/s in mid-run."""
    with netns_socket(client, socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.bind((source, 0))
        sock.connect((address, port))
        sock.sendall(b"who\n")
        data = b""
        while chunk := sock.recv(200):
            data += chunk
        return data.decode()


def rate(client: str, source: str, targets: list[tuple[str, int]], seconds: float) -> float:
    """Connections per second, sequential, taking ``targets`` in turn."""
    count, failed = 0, 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        address, port = targets[(count + failed) % len(targets)]
        try:
            if one_connection(client, source, address, port):
                count += 1
        except OSError:
            failed += 1
    if failed:
        print(f"  ({failed} connections to {targets} failed)")
    return count / elapsed


@contextlib.contextmanager
def cloud() -> Iterator[tuple[Fabric, str, str, str, list[str]]]:
    """h1 with guests b1, b2 on a network, LB node lb1 serving them, a client.
    Yields (fabric, client netns, client address, VIP, the backends' addresses)."""
    with Fabric(["h1", "lb1"]) as fabric, contextlib.ExitStack() as stack:
        h1, lb1 = fabric.host("h1"), fabric.host("lb1")
        cidr = free_underlay()
        vip, client_ip = str(free_underlay()[10]), str(free_underlay()[100])
        link = free_underlay()
        client = f"{fabric.prefix}-client"
        sh("ip", "netns", "add", client)
        sh("ip", "-n", client, "link", "set", "lo", "up")
        sh("ip", "-n", client, "addr", "add", f"{client_ip}/32", "dev", "lo")
        sh("ip", "link", "add", "c0", "netns", client, "type", "veth", "peer", "name", "cl0",
           "netns", lb1.netns)
        sh("ip", "-n", client, "addr", "add", f"{link[2]}/24", "dev", "c0")
        sh("ip", "-n", client, "link", "set", "c0", "up")
        sh("ip", "-n", lb1.netns, "addr", "add", f"{link[1]}/24", "dev", "cl0")
        sh("ip", "-n", lb1.netns, "link", "set", "cl0", "up")
        sh("ip", "-n", lb1.netns, "route", "add", f"{client_ip}/32", "via", str(link[2]))
        for dst in (f"{vip}/32", str(cidr)):
            sh("ip", "-n", client, "route", "add", dst, "via", str(link[1]))
        net_h1 = stack.enter_context(contextlib.closing(NetworkDriver(h1.underlay_ip, h1.netns)))
        net_lb = stack.enter_context(contextlib.closing(NetworkDriver(lb1.underlay_ip,
                                                                      lb1.netns)))
        guests = stack.enter_context(contextlib.closing(
            NetnsGuestDriver(h1.netns, "h1", h1.underlay_ip)))
        rules = (SecurityRule("tcp", GUEST_PORT, str(cidr)),)
        members = {"b1": str(cidr[11]), "b2": str(cidr[12])}
        for n, (instance, ip) in enumerate(members.items()):
            guests.apply(instance, InstanceSpec(
                template=InstanceTemplate(vcpus=1, memory_mib=64, image="tiny",
                                          nics=(Nic(network=NET),), rules=rules),
                power="running", host="h1",
                nics=(NicSpec(network=NET, vni=VNI, mac=mac_address(instance, 0), ip=ip,
                              prefix=24),)), n + 1)
        port = NicSpec(network=NET, vni=VNI, mac=mac_address(f"lb.{LB}", 0), ip=str(cidr[201]),
                       prefix=24)
        net_h1.apply(NET, NetworkSpec(vni=VNI, cidr=str(cidr), mtu=1500,
                                      vteps=(lb1.underlay_ip,),
                                      ports=(RemotePort(port.mac, port.ip, lb1.underlay_ip),)), 1)
        net_lb.apply(NET, NetworkSpec(vni=VNI, cidr=str(cidr), mtu=1500, vteps=(h1.underlay_ip,),
                                      ports=tuple(sorted(
                                          (RemotePort(mac_address(i, 0), ip, h1.underlay_ip)
                                           for i, ip in members.items()),
                                          key=lambda p: p.mac))), 1)
        lb = stack.enter_context(contextlib.closing(LbDriver("lb1", lb1.underlay_ip,
                                                             lb1.netns)))
        lb.apply(LB, LbSpec(vip=vip, services=(SERVICE,), backends=tuple(
            Backend(instance=i, ip=ip, network=NET, healthy=(80,)) for i, ip in members.items()),
            seed=1, port=port), 1)
        # The direct path: lb1 only routes and masquerades (as it SNATs the VIP's flows).
        _, node_end = port_names(LB)
        sh("ip", "netns", "exec", lb1.netns, "nft",
           f"add table ip bench; add chain ip bench post {{ type nat hook postrouting "
           f"priority 100; }}; add rule ip bench post oifname {node_end} ct status != dnat "
           f"masquerade")
        yield fabric, client, client_ip, vip, list(members.values())


def part_a(seconds: float) -> None:
    print("(a) connections per second, one client, sequential")
    with cloud() as (_fabric, client, source, vip, backends):
        straight = [(b, GUEST_PORT) for b in backends]  # the VIP's backends, in turn
        for address, port in [*straight, (vip, 80)]:  # warm ARP and caches
            one_connection(client, source, address, port)
        direct, through = [], []
        for _ in range(3):  # interleaved: a load that changes meanwhile weighs on both
            direct.append(rate(client, source, straight, seconds))
            through.append(rate(client, source, [(vip, 80)], seconds))
        print(f"  runs (conn/s): straight {', '.join(f'{x:,.0f}' for x in direct)}   through"
              f" the VIP {', '.join(f'{x:,.0f}' for x in through)}")
        d, v = statistics.median(direct), statistics.median(through)
        print(f"  straight to the backends in turn: {d:,.0f} conn/s   through the VIP:"
              f" {v:,.0f} conn/s   ratio {v / d:.2f} (target >= 0.8; medians of 3 runs of"
              f" {seconds:g} s each, load {os.getloadavg()[0]:.2f})")


def spec_of(n: int, healthy: set[int], cidr: ipaddress.IPv4Network) -> LbSpec:
    backends = tuple(Backend(instance=f"web-{i:04d}", ip=str(cidr[10 + i]), network=NET,
                             healthy=(80,) if i in healthy else ()) for i in range(n))
    port = NicSpec(network=NET, vni=VNI, mac=mac_address("lb.b", 0), ip=str(cidr[5]),
                   prefix=cidr.prefixlen)
    return LbSpec(vip="10.255.255.1", services=(SERVICE,), backends=backends, seed=7,
                  port=port)


def part_b(n: int, updates: int) -> None:
    print(f"(b) table update, {n} backends, maglev M = {maglev.table_size(n):,}")
    cidr = ipaddress.IPv4Network("10.200.0.0/16")
    with Fabric(["lb1"]) as fabric:
        host = HostNet.open(fabric.host("lb1").netns)
        try:
            everyone = set(range(n))
            started = time.perf_counter()
            held = nftplan.desired(spec_of(n, everyone, cidr), "eth-bench")
            commands = nftplan.plan(LB, None, held, "t0")
            host.nft(commands, "initial")
            print(f"  first full write: {(time.perf_counter() - started) * 1000:.0f} ms "
                  f"({len(commands)} commands)")
            rows = []
            for k in range(updates):
                healthy = everyone - {k} if k % 2 == 0 else everyone
                t0 = time.perf_counter()
                wanted = nftplan.desired(spec_of(n, healthy, cidr), "eth-bench")
                t1 = time.perf_counter()
                commands = nftplan.plan(LB, held, wanted, f"t{k + 1}")
                t2 = time.perf_counter()
                host.nft(commands, "update")
                t3 = time.perf_counter()
                changed = sum(len(c.get("add", c.get("delete", {})).get("element", {})
                                  .get("elem", [])) for c in commands)
                rows.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0, changed))
                held = wanted
            for name, i in (("table (maglev build)", 0), ("plan (diff)", 1),
                            ("nft transaction", 2), ("total", 3)):
                values = [r[i] * 1000 for r in rows]
                print(f"  {name:22} median {statistics.median(values):6.1f} ms   "
                      f"max {max(values):6.1f} ms")
            changes = statistics.median(r[4] for r in rows)
            print(f"  map elements deleted + added per update: {changes:.0f}"
                  f"   (target: total <= 100 ms)")
        finally:
            host.close()


def part_c() -> None:
    print("(c) share of the other flows moved when 1 of N leaves (maglev)")
    for n in (4, 16, 64):
        names = [f"web-{i}" for i in range(n)]
        before = [names[i] for i in maglev.build(names, 99)]
        shares = []
        for gone in names[:: max(1, n // 16)]:
            rest = [b for b in names if b != gone]
            after = [rest[i] for i in maglev.build(rest, 99)]
            shares.append(maglev.moved(before, after, gone))
        print(f"  N = {n:2}  M = {len(before):,}   worst {max(shares) * 100:.2f} %   "
              f"mean {statistics.mean(shares) * 100:.2f} %   over {len(shares)} removals"
              f"   (target <= 2 %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", default="a,b,c")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--backends", type=int, default=1000)
    parser.add_argument("--updates", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/lb.py needs root (network namespaces)")
    parts = set(args.part.split(","))
    if "a" in parts:
        part_a(args.seconds)
    if "b" in parts:
        part_b(args.backends, args.updates)
    if "c" in parts:
        part_c()


if __name__ == "__main__":
    main()
