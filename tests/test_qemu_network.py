"""Two real QEMU guests (TCG) on two hosts, on one private network: ping and TCP over VXLAN.

The hosts are network namespaces of a `Fabric`, each with its own libvirtd
(`tests.libvirt_hosts`), so a guest's tap lands in its host's namespace, where that host's
agent (`--netns`, `--underlay-ip`) plugs it into the segment bridge behind its firewall.
The scheduler places the two guests (equal hosts, most free memory first: one on each).

The proof is guest to guest, with packets only the guests send: the test types commands
on each guest's serial console (libvirt's console stream, the guest's busybox shell) and
reads their output from the console log. Each guest pings the other and fetches the
other's TCP service (busybox nc on port 8080, answering its instance id). Nothing of the
test is on the segment: every packet crosses host A's bridge, VXLAN over the underlay, and
host B's bridge.

Then: a tap taken off its bridge by hand is plugged again by the agent's resync, and
deleting the guests removes their domains and each host's segment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import msgspec
import pytest

from agents.drivers.vm import DEFAULT_CONSOLE_DIR, domain_name
from agents.guest import SERVICE_PORT
from agents.net import names
from events.bus import Publisher
from orchestrator.fabric import Fabric, unavailable
from schemas.codec import command_from_dict
from tests.conftest import Env, Processes, eventually
from tests.libvirt_hosts import HostLibvirtd, alive, host_libvirtds
from tests.test_qemu_system import booted

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))

CIDR = "10.61.0.0/24"
VNI = 610
RULES = [{"protocol": "tcp", "port": SERVICE_PORT, "source": CIDR}]


# Teardown runs in reverse: agents and replica stop first (no agent recreates a guest
# meanwhile), then every daemon with its guests, then the hosts, then the console logs.
@pytest.fixture
def guest_ids() -> Iterator[list[str]]:
    """Instance ids of this test (unique: the console dir is shared); logs removed after."""
    ids = [f"q{secrets.token_hex(3)}" for _ in range(2)]
    try:
        yield ids
    finally:
        for instance_id in ids:
            (DEFAULT_CONSOLE_DIR / f"{instance_id}.log").unlink(missing_ok=True)


@pytest.fixture
def fabric(guest_ids: list[str]) -> Iterator[Fabric]:
    with Fabric(2) as made:
        yield made


@pytest.fixture
def daemons(fabric: Fabric, tmp_path: Path) -> Iterator[dict[str, HostLibvirtd]]:
    with host_libvirtds(fabric, tmp_path / "libvirt") as started:
        yield started


@pytest.fixture
def processes(daemons: dict[str, HostLibvirtd], tmp_path: Path) -> Iterator[Processes]:
    """conftest's, but set up after (so stopped before) the daemons."""
    procs = Processes(tmp_path, dict(os.environ))
    try:
        yield procs
    finally:
        procs.stop(grace_s=10.0)


class Console:
    """A guest's serial console: commands typed through libvirt's console stream, their
    output read back from the console log."""

    def __init__(self, daemon: HostLibvirtd, instance_id: str) -> None:
        self.log = DEFAULT_CONSOLE_DIR / f"{instance_id}.log"
        self.conn = daemon.connect()
        dom = self.conn.lookupByName(domain_name(instance_id))
        self.stream = self.conn.newStream(0)
        dom.openConsole(None, self.stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        self.n = 0

    def close(self) -> None:
        for close in (self.stream.abort, self.conn.close):
            with contextlib.suppress(libvirt.libvirtError):
                close()

    def run(self, command: str, timeout_s: float = 20.0) -> str:
        """Run a shell command in the guest; its output (one line, at most 400 chars).

        The result line is tagged `R<n>=`; the echo of the typed line shows `R<n>""=`,
        so only the real output matches.
        """
        self.n += 1
        tag = f"R{self.n}{secrets.token_hex(2)}"
        self.stream.send(f'echo "{tag}""=$( {command} 2>&1 | tr "\\n" " " | cut -c1-400)"\n'
                         .encode())
        pattern = re.compile(rf"{tag}=(.*)")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = pattern.search(self.log.read_text(errors="replace"))
            if match:
                return match.group(1).strip()
            time.sleep(0.1)
        raise AssertionError(f"no answer to {command!r} within {timeout_s}s: "
                             f"{self.log.read_text(errors='replace')[-1500:]}")


async def test_two_qemu_guests_on_two_hosts_ping_and_reach_each_others_service(
        env: Env, js, pg, processes: Processes, fabric: Fabric,
        daemons: dict[str, HostLibvirtd], guest_ids: list[str]) -> None:
    for h in fabric.hosts:
        print(f"\nlibvirtd of {h.name} ready in {daemons[h.name].started_s:.2f}s")
    processes.orch("orchestrator", "--id", "r1", "--deadline", "3600", env=env.environ(),
                   name="r1")
    pub = Publisher(js)
    # Equal hosts: the scheduler puts the second guest where the first is not.
    await pub.publish_many([("admin", command_from_dict(dict(
        type="RegisterHost", cmd_id=f"reg-{h.name}", id=h.name, vcpus=8, memory_mib=4096)))
        for h in fabric.hosts])
    for h in fabric.hosts:
        processes.orch("agent", "--host", h.name, "--libvirt", daemons[h.name].uri,
                       "--netns", h.netns, "--underlay-ip", h.underlay_ip, "--resync", "3",
                       "--heartbeat", "0.5", env=env.environ(), name=f"agent-{h.name}")
    await eventually(lambda: pg.fetchval(
        "SELECT count(*) = 2 FROM entities WHERE kind = 'host'"
        " AND state->>'underlay' IS NOT NULL"), timeout=60)
    await pub.publish_many([("user", command_from_dict(dict(
        type="CreateNetwork", cmd_id="net", id="net", vni=VNI, cidr=CIDR)))])
    started = time.monotonic()
    await pub.publish_many([("user", command_from_dict(dict(
        type="CreateInstance", cmd_id=f"create-{g}", id=g, template=dict(
            vcpus=1, memory_mib=192, image="tiny", nics=[dict(network="net")],
            rules=RULES))))
        for g in guest_ids])

    async def placed() -> dict[str, dict] | None:
        rows = await pg.fetch("SELECT id, state FROM entities WHERE kind = 'instance'")
        states = {r["id"]: msgspec.json.decode(r["state"]) for r in rows}
        if len(states) == 2 and all(s["host"] for s in states.values()):
            return states
        return None

    states = await eventually(placed, timeout=30)
    hosts = {g: states[g]["host"] for g in guest_ids}
    ips = {g: states[g]["nics"][0]["ip"] for g in guest_ids}
    assert set(hosts.values()) == {"h1", "h2"}, hosts
    for g in guest_ids:
        seconds = await asyncio.to_thread(booted, g, started)
        uptime = re.search(r"kernel uptime ([\d.]+)s",
                           (DEFAULT_CONSOLE_DIR / f"{g}.log").read_text(errors="replace"))
        print(f"{g} on {hosts[g]} ({ips[g]}): command -> console marker in {seconds:.2f}s"
              f" (guest kernel uptime then {uptime and uptime.group(1)}s)")
    await eventually(lambda: pg.fetchval(
        "SELECT count(*) = 2 FROM entities WHERE kind = 'instance'"
        " AND state->>'observed' = 'running'"), timeout=30)

    consoles = {g: Console(daemons[hosts[g]], g) for g in guest_ids}
    try:
        for src, dst in (guest_ids, guest_ids[::-1]):
            console = consoles[src]
            # The first packets may wait for ARP across the segment: a few tries at most.
            out = await asyncio.to_thread(
                console.run, f"ping -c 5 -i 0.2 -W 2 {ips[dst]} | tail -n 2")
            assert " 0% packet loss" in out, (src, dst, out)
            rtt = re.search(r"min/avg/max = ([\d.]+)/([\d.]+)/([\d.]+)", out)
            assert rtt, out
            print(f"ping {src}@{hosts[src]} -> {dst}@{hosts[dst]}: {out}")
            answer = await asyncio.to_thread(
                console.run, f"nc -w 3 {ips[dst]} {SERVICE_PORT} </dev/null")
            assert answer == dst, (src, dst, answer)
            print(f"tcp {src} -> {dst}:{SERVICE_PORT}: {answer!r}")
        # Each guest's tap is on its host's segment bridge (the guest driver plugged it).
        bridge = names.bridge_name(VNI)
        for g in guest_ids:
            links = fabric.exec(fabric[hosts[g]].netns, "ip", "-o", "link", "show",
                                names.port_name(g, 0)).stdout
            assert f"master {bridge} " in links, links
        # Drift: a tap taken off its bridge by hand is plugged again by the next resync
        # (every resync applies every job, and plugging writes only what differs).
        victim = guest_ids[0]
        netns, port = fabric[hosts[victim]].netns, names.port_name(victim, 0)
        fabric.exec(netns, "ip", "link", "set", port, "nomaster")

        async def replugged() -> bool:
            out = fabric.exec(netns, "ip", "-o", "link", "show", port).stdout
            return f"master {bridge} " in out

        await eventually(replugged, timeout=15)
        out = await asyncio.to_thread(consoles[guest_ids[1]].run,
                                      f"nc -w 3 {ips[victim]} {SERVICE_PORT} </dev/null")
        assert out == victim, out
    finally:
        for console in consoles.values():
            console.close()

    # Deleting both: their domains go, and so does the segment on each host (no member
    # is left there).
    await pub.publish_many([("user", command_from_dict(dict(
        type="DeleteInstance", cmd_id=f"delete-{g}", id=g))) for g in guest_ids])

    async def gone() -> bool:
        for h in fabric.hosts:
            conn = daemons[h.name].connect()
            try:
                if conn.listAllDomains(0):
                    return False
            finally:
                conn.close()
            if bridge in fabric.links(h.netns) or names.vxlan_name(VNI) in fabric.links(
                    h.netns):
                return False
        return True

    await eventually(gone, timeout=30)
    await eventually(lambda: pg.fetchval(
        "SELECT count(*) = 2 FROM entities WHERE kind = 'instance'"
        " AND state->>'observed' = 'absent'"), timeout=30)


def test_a_host_libvirtd_is_private_to_its_host_and_leaves_nothing_behind(
        tmp_path: Path) -> None:
    with Fabric(1) as fabric:
        h = fabric.hosts[0]
        daemon = HostLibvirtd(h.netns, h.underlay_ip, tmp_path / "libvirtd")
        with daemon:
            conn = daemon.connect()
            try:
                # Its own identity, not the machine's libvirtd's.
                assert ET.fromstring(conn.getCapabilities()
                                     ).findtext("./host/uuid") == daemon.host_uuid
            finally:
                conn.close()
            # Listening on the underlay, inside the host's namespace only.
            assert fabric.exec(h.netns, "virsh", "-c", daemon.tcp_uri, "uri").stdout.strip() \
                == daemon.tcp_uri
            pids = daemon.processes()
            assert daemon.proc is not None and daemon.proc.pid in pids
        assert not [p for p in pids if alive(p)]
        assert not daemon.root.exists()
