"""Real QEMU guests (TCG) through the whole system: command -> fold -> job -> agent ->
libvirt -> guest console -> ping from a test namespace; drift repaired by the resync."""

import asyncio
import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import msgspec
import pytest

from agents.drivers.vm import DEFAULT_CONSOLE_DIR, VmDriver, domain_name
from agents.guest import READY_MARKER
from events.bus import Publisher
from schemas.codec import command_from_dict
from schemas.specs import InstanceSpec, InstanceTemplate
from tests.conftest import Env, Processes, eventually
from tests.lan import Lan, guest_lan
from tests.test_vm_driver import QEMU_URI, _force_remove, qemu_only

pytestmark = qemu_only
BOOT_TIMEOUT = 90.0


@pytest.fixture
def lan() -> Iterator[Lan]:
    with guest_lan() as lan:
        yield lan


@pytest.fixture
def guests() -> Iterator[list[str]]:
    """Instance ids of this test: whatever happens, no domain of theirs survives it."""
    ids: list[str] = []
    try:
        yield ids
    finally:
        for instance_id in ids:
            _force_remove(instance_id)
            (DEFAULT_CONSOLE_DIR / f"{instance_id}.log").unlink(missing_ok=True)


def domain_state(instance_id: str) -> tuple[str, int]:
    """Power state and libvirt's id of the running domain (a new one at every start)."""
    conn = libvirt.open(QEMU_URI)
    try:
        dom = conn.lookupByName(domain_name(instance_id))
        return ("running", dom.ID()) if dom.isActive() else ("stopped", -1)
    except libvirt.libvirtError:
        return "absent", -1
    finally:
        conn.close()


def booted(instance_id: str, since: float) -> float:
    log = DEFAULT_CONSOLE_DIR / f"{instance_id}.log"
    marker = f"{READY_MARKER} {instance_id}"
    while time.monotonic() - since < BOOT_TIMEOUT:
        if log.exists() and marker in log.read_text(errors="replace"):
            return time.monotonic() - since
        time.sleep(0.1)
    raise AssertionError(f"no {marker!r} within {BOOT_TIMEOUT}s: {_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-1500:] if log.exists() else "(no console log)"


async def test_real_guests_boot_answer_ping_are_repaired_and_removed(
        env: Env, js, pg, processes: Processes, lan: Lan, guests: list[str]) -> None:
    host = f"hq{secrets.token_hex(2)}"
    processes.orch("orchestrator", "--id", "r1", env=env.environ(), name="r1")
    agent_args = ("agent", "--host", host, "--libvirt", QEMU_URI, "--bridge", lan.bridge,
                  "--resync", "3")
    agent = processes.orch(*agent_args, env=env.environ(), name="agent")
    pub = Publisher(js)
    await pub.publish_many([
        ("admin", command_from_dict(dict(type="RegisterHost", cmd_id="reg", id=host, vcpus=8,
                                         memory_mib=8192))),
        ("user", command_from_dict(dict(type="CreateNetwork", cmd_id="lan", id="lan", vni=42,
                                        cidr=str(lan.net)))),
    ])
    await eventually(lambda: pg.fetchval(
        "SELECT count(*) = 1 FROM history WHERE kind = 'scheduler'"))
    guests += [f"g{secrets.token_hex(3)}" for _ in range(2)]
    addresses = dict(zip(guests, (lan.address(11), lan.address(12)), strict=True))
    started = time.monotonic()
    await pub.publish_many([("user", command_from_dict(dict(
        type="CreateInstance", cmd_id=f"create-{g}", id=g, template=dict(
            vcpus=1, memory_mib=128, image="tiny", nics=[dict(network="lan", ip=ip)]))))
        for g, ip in addresses.items()])

    for guest, address in addresses.items():
        print(f"\n{guest}: command -> console marker in {booted(guest, started):.2f}s")
        lan.ping(address)
    await eventually(lambda: pg.fetchval(
        "SELECT count(*) = 2 FROM entities WHERE kind = 'instance'"
        " AND state->>'observed' = 'running'"), timeout=30)

    # SIGKILL the agent and start it again: its new boot resyncs every job, and it adopts
    # the running guests instead of applying them again (they keep their domain ids).
    before = {g: domain_state(g) for g in addresses}
    os.killpg(agent.pid, signal.SIGKILL)
    agent.wait()
    processes.orch(*agent_args, env=env.environ(), name="agent-again")
    # The first boot's HostUp recorded its boot id; the new boot brings a second one.
    await eventually(lambda: pg.fetchval(
        "SELECT count(*) = 2 FROM history WHERE kind = 'host'"
        " AND outcome->>'type' = 'HostUp' AND outcome->'events' ? 'ConditionSet'"), timeout=30)
    await asyncio.sleep(4)  # one more resync period: nothing must restart meanwhile
    assert {g: domain_state(g) for g in addresses} == before

    # Drift: a guest destroyed behind the agent's back is running again after a resync ...
    victim = guests[0]
    state, first_id = domain_state(victim)
    assert state == "running"
    conn = libvirt.open(QEMU_URI)
    try:
        conn.lookupByName(domain_name(victim)).destroy()
    finally:
        conn.close()
    await eventually(lambda: _async(domain_state(victim)[0] == "running"
                                    and domain_state(victim)[1] != first_id), timeout=30)
    lan.ping(addresses[victim])
    # ... and a managed domain nobody wants on this host is removed.
    ghost = f"g{secrets.token_hex(3)}"
    guests.append(ghost)
    with VmDriver(QEMU_URI, host) as driver:
        spec = InstanceSpec(template=InstanceTemplate(vcpus=1, memory_mib=128, image="tiny"),
                            power="stopped", host=host)
        driver.apply(ghost, spec, 1)
    await eventually(lambda: _async(domain_state(ghost)[0] == "absent"), timeout=30)

    # Deleting the instances removes their domains, and the agent reports them absent.
    await pub.publish_many([("user", command_from_dict(dict(
        type="DeleteInstance", cmd_id=f"delete-{g}", id=g))) for g in addresses])
    for guest in addresses:
        await eventually(lambda g=guest: _async(domain_state(g)[0] == "absent"), timeout=30)
    await eventually(lambda: pg.fetchval(
        "SELECT count(*) = 2 FROM entities WHERE kind = 'instance'"
        " AND state->>'observed' = 'absent'"), timeout=30)
    states = [msgspec.json.decode(r["state"]) for r in await pg.fetch(
        "SELECT state FROM entities WHERE kind = 'instance'")]
    assert all(s["status"] == "deleted" for s in states)


async def _async(value: bool) -> bool:
    return value
