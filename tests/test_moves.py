"""Moving guests between hosts end to end: `orch migrate` and `orch drain` on 3 namespaced
hosts with their agents (`--guests netns`, whose migration is a real move of the guest's
namespace and ports), proven by connections to each guest on its new host and by what each
host's kernel holds. (Live migration of QEMU guests between two libvirtds: test_vm_migrate
and test_qemu_migrate.)
"""

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from agents.net import names
from orchestrator.embedded import PostgresServer
from orchestrator.queries import decode_outcome
from tests.conftest import eventually
from tests.fabric import Fabric, unavailable
from tests.test_networks import Cloud, Guest, open_cloud, tcp

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))

CIDR = "10.60.0.0/24"
VNI = 300
RULES = [{"protocol": "tcp", "port": 8080, "source": CIDR}]
DRAINED = 10  # guests on h1 besides the one migrated by hand
EVACUATE_AFTER_S = 3.0
ORCH = [sys.executable, "-m", "orchestrator.cli"]


@pytest.fixture(scope="module")
def fabric() -> Iterator[Fabric]:
    with Fabric(3) as made:
        yield made


@pytest.fixture(scope="module")
async def cloud(postgres: PostgresServer, fabric: Fabric,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cloud]:
    async with open_cloud(postgres, fabric, tmp_path_factory.mktemp("moves"),
                          "--evacuate-after", str(EVACUATE_AFTER_S)) as world:
        yield world


def orch(cloud: Cloud, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ORCH, *args], env=cloud.env.environ(), capture_output=True,
                          text=True, timeout=timeout)


async def condition(cloud: Cloud, host: str, value: str) -> None:
    await cloud.send("admin", type="SetHostCondition", id=host, condition=value)


async def create(cloud: Cloud, id_: str) -> None:
    await cloud.send("user", type="CreateInstance", id=id_, template=dict(
        vcpus=1, memory_mib=64, image="tiny", nics=[dict(network="m")], rules=RULES))


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True).stdout
    return {n["name"] for n in json.loads(out or "[]")}


def links(netns: str) -> set[str]:
    out = subprocess.run(["ip", "-n", netns, "-j", "link", "show"], capture_output=True,
                         text=True, check=True).stdout
    return {link["ifname"] for link in json.loads(out)}


def fdb_vtep(netns: str, mac: str) -> str | None:
    """Where a host's VXLAN device sends frames for ``mac``."""
    out = subprocess.run(["bridge", "-n", netns, "fdb", "show", "dev", names.vxlan_name(VNI)],
                         capture_output=True, text=True).stdout
    return next((line.split(" dst ")[1].split()[0] for line in out.splitlines()
                 if line.startswith(mac) and " dst " in line), None)


@pytest.fixture(scope="module")
async def placed(cloud: Cloud) -> dict[str, Any]:
    """A probe guest on h2, and 1 + DRAINED guests on h1 (the other hosts held in
    maintenance while they are placed)."""
    await cloud.send("user", type="CreateNetwork", id="m", vni=VNI, cidr=CIDR)
    await condition(cloud, "h1", "maintenance")
    await condition(cloud, "h3", "maintenance")
    await create(cloud, "probe")
    await cloud.settle()
    await condition(cloud, "h1", "up")
    await condition(cloud, "h2", "maintenance")
    for k in range(DRAINED + 1):
        await create(cloud, f"m{k}")
    await cloud.settle(timeout=120)
    await condition(cloud, "h2", "up")
    await condition(cloud, "h3", "up")
    await cloud.settle()
    probe = await cloud.guest("probe")
    members = [await cloud.guest(f"m{k}") for k in range(DRAINED + 1)]
    assert probe.host == "h2" and {g.host for g in members} == {"h1"}
    assert all(tcp(probe, g.ip) == g.id for g in members)
    return {"probe": probe, "members": members}


async def test_a_migrated_guest_answers_on_its_new_host_and_leaves_nothing_behind(
        cloud: Cloud, placed: dict[str, Any]) -> None:
    probe: Guest = placed["probe"]
    g: Guest = placed["members"][0]
    done = await asyncio.to_thread(orch, cloud, "migrate", f"instance/{g.id}", "--to", "h3",
                                   "--wait", "--timeout", "60")
    assert done.returncode == 0, done.stdout + done.stderr
    # Its phases, as they happened, then the end.
    for step in ("MigrateInstance", "MigrationReserved", "Applied", "moved to h3"):
        assert step in done.stdout, done.stdout
    await cloud.settle()
    moved = await cloud.guest(g.id)
    assert moved.host == "h3" and (moved.ip, moved.mac) == (g.ip, g.mac)
    assert tcp(probe, moved.ip) == g.id
    # The source holds nothing of it: no namespace, no port; the destination has both.
    names_now = netns_names()
    assert g.netns not in names_now and moved.netns in names_now
    port = names.port_name(g.id, 0)
    assert port not in links(cloud.fabric["h1"].netns)
    assert port in links(cloud.fabric["h3"].netns)
    # The other member host forwards its MAC to the new VTEP.
    assert fdb_vtep(cloud.fabric["h2"].netns, g.mac) == cloud.fabric["h3"].underlay_ip


async def test_bad_migrations_are_refused_with_the_reason(
        cloud: Cloud, placed: dict[str, Any]) -> None:
    g: Guest = placed["members"][1]
    for to, why in (("h1", "on h1 already"), ("nope", "no host nope")):
        done = await asyncio.to_thread(orch, cloud, "migrate", f"instance/{g.id}", "--to", to,
                                       "--wait", "--timeout", "30")
        assert done.returncode == 1 and why in done.stdout + done.stderr, (
            done.stdout + done.stderr)
    done = await asyncio.to_thread(orch, cloud, "drain", "nope")
    assert done.returncode == 1 and "no host nope" in done.stderr
    assert (await cloud.guest(g.id)).host == "h1"


async def test_a_drain_moves_every_guest_off_within_the_limit_then_maintenance(
        cloud: Cloud, placed: dict[str, Any]) -> None:
    probe: Guest = placed["probe"]
    await cloud.send("admin", type="SetMigrationLimit", id="default", limit=2)
    done = await asyncio.to_thread(orch, cloud, "drain", "h1", "--wait", "--timeout", "120")
    assert done.returncode == 0, done.stdout + done.stderr
    host = await cloud.state("host", "h1")
    assert host is not None and host["condition"] == "maintenance"
    await cloud.settle()
    for g in placed["members"][1:]:
        moved = await cloud.guest(g.id)
        assert moved.host in ("h2", "h3") and tcp(probe, moved.ip) == g.id, moved
    prefix = f"{cloud.fabric['h1'].netns}."
    assert not [n for n in netns_names() if n.startswith(prefix)], "a guest left on h1"
    # Never more than the limit at once, and the limit used: from the scheduler's log.
    rows = await cloud.pg.fetch("SELECT outcome FROM history WHERE kind = 'scheduler'"
                                " ORDER BY seq")
    running = most = 0
    for row in rows:
        for event in decode_outcome(row["outcome"]).events:
            running += {"MoveStarted": 1, "MoveEnded": -1}.get(event, 0)
            most = max(most, running)
    assert most == 2 and running == 0


def underlay(cloud: Cloud, host: str, up: bool) -> None:
    """Cut a host off the underlay, or plug it back: frozen, it reaches nobody."""
    subprocess.run(["ip", "-n", cloud.fabric.fabric_netns, "link", "set",
                    f"ul{cloud.fabric[host].index}", "up" if up else "down"], check=True)


async def test_a_dead_host_is_evacuated_and_destroys_its_stale_copies_when_it_returns(
        cloud: Cloud, placed: dict[str, Any]) -> None:
    probe: Guest = placed["probe"]
    await cloud.send("admin", type="SetHostCondition", id="h1", condition="up")
    await cloud.settle()
    for k in range(3):
        await create(cloud, f"e{k}")  # h1 is the emptiest now
    await cloud.settle()
    dying = [await cloud.guest(f"e{k}") for k in range(3)]
    assert {g.host for g in dying} == {"h1"}
    # The host dies: its agent SIGKILLed, its underlay cut; its guests stay as they were.
    cloud.kill_agent("h1")
    underlay(cloud, "h1", up=False)
    try:
        async def rebuilt() -> bool:
            states = [await cloud.state("instance", g.id) for g in dying]
            return all(s and s["host"] != "h1" and s["observed"] == "running"
                       and s["observed_generation"] == s["generation"] for s in states)

        await eventually(rebuilt, timeout=60, interval=0.2)
        for g in dying:
            moved = await cloud.guest(g.id)
            assert tcp(probe, moved.ip) == g.id, moved
        stale = {g.netns for g in dying}
        assert stale <= netns_names(), "the dead host's guests are frozen, not removed"
    finally:
        underlay(cloud, "h1", up=True)
    cloud.agent("h1")

    async def cleaned() -> bool:
        return not stale & netns_names()

    async def back_up() -> bool:
        host = await cloud.state("host", "h1")
        return host is not None and host["condition"] == "up"

    await eventually(cleaned, timeout=60, interval=0.2)
    await eventually(back_up, timeout=60, interval=0.2)
    await cloud.settle()
    # One copy each, on the new host; and the returning agent removed before it started.
    for g in dying:
        moved = await cloud.guest(g.id)
        assert moved.host != "h1" and tcp(probe, moved.ip) == g.id
    # Its agent removed them before it even said it was back: before its HostUp.
    rows = await cloud.pg.fetch("SELECT outcome FROM history WHERE (kind = 'host' AND id = 'h1')"
                                " OR outcome->>'source' = 'h1' ORDER BY seq")
    log = [decode_outcome(r["outcome"]) for r in rows]
    evacuated = max(o.seq for o in log if "Evacuated" in o.events)
    back = min(o.seq for o in log if o.type == "HostUp" and o.seq > evacuated)
    removed = [o.seq for o in log if o.seq > evacuated and o.type == "Applied"]
    assert len(removed) == len(dying) and max(removed) < back, (removed, back)


async def test_a_drain_with_no_room_anywhere_waits_as_an_alert_until_room_comes(
        cloud: Cloud, placed: dict[str, Any]) -> None:
    await condition(cloud, "h1", "maintenance")
    await condition(cloud, "h3", "maintenance")
    await cloud.settle()
    on_h2 = [r["id"] for r in await cloud.pg.fetch(
        "SELECT id FROM entities WHERE kind = 'instance' AND state->>'host' = 'h2'"
        " AND state->>'status' = 'placed'")]
    assert on_h2
    await condition(cloud, "h2", "draining")

    async def alerted() -> str | None:
        done = await asyncio.to_thread(orch, cloud, "alerts")
        return done.stdout if "cannot leave draining host h2" in done.stdout else None

    shown = await eventually(alerted, timeout=30, interval=0.5)
    assert "no other host has" in shown
    await condition(cloud, "h1", "up")  # room: the drain goes on

    async def drained() -> bool:
        host = await cloud.state("host", "h2")
        return host is not None and host["condition"] == "maintenance"

    await eventually(drained, timeout=60, interval=0.2)
    await cloud.settle()
    for id_ in on_h2:
        assert (await cloud.guest(id_)).host == "h1"
    done = await asyncio.to_thread(orch, cloud, "alerts")
    assert "cannot leave" not in done.stdout, done.stdout
    await condition(cloud, "h2", "up")
    await condition(cloud, "h3", "up")


async def test_replay_reproduces_the_projection_after_the_moves(
        cloud: Cloud, placed: dict[str, Any]) -> None:
    await cloud.settle()
    done = await asyncio.to_thread(orch, cloud, "replay", "--verify", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
