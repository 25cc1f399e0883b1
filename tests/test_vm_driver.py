"""The VM driver against real libvirt: the test:/// driver, then real QEMU guests (TCG).

The qemu:///system tests need libvirtd (CI runs .ci/setup-libvirt.sh first) and root (they
create a Linux bridge). They boot two tiny guests on a private bridge, wait for each one's
console marker and ping it over the bridge.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import pytest

from agents.drivers import testnode, vm
from agents.drivers.vm import (
    READY_MARKER,
    PermanentDriverError,
    TransientDriverError,
    VmDriver,
    domain_name,
    mac_address,
)
from agents.guest import build_guest_image
from schemas.specs import InstanceSpec, InstanceTemplate, Nic, Power
from tests.lan import Lan, guest_lan


def spec(
    power: Power = "running",
    *,
    vcpus: int = 1,
    memory_mib: int = 128,
    image: str = "tiny",
    ips: tuple[str | None, ...] = ("10.0.0.5",),
) -> InstanceSpec:
    nics = tuple(Nic(network=f"net{i}", ip=ip) for i, ip in enumerate(ips))
    template = InstanceTemplate(vcpus=vcpus, memory_mib=memory_mib, image=image, nics=nics)
    return InstanceSpec(template=template, power=power, host="h1")


# -- test:/// ------------------------------------------------------------------------------


def small_node(host: str, directory: Path) -> str:
    """A test:/// hypervisor with 4 vCPUs and 8 GiB."""
    return testnode.test_node_uri(host, directory, vcpus=4, memory_mib=8192)


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[VmDriver]:
    with VmDriver(small_node("h1", tmp_path), "h1") as drv:
        yield drv


def dom_of(drv: VmDriver, instance_id: str) -> libvirt.virDomain:
    return drv._connection().lookupByName(domain_name(instance_id))


def test_lifecycle_create_start_stop_delete(driver: VmDriver) -> None:
    assert driver.observe() == {}
    assert driver.generation("a") is None

    assert driver.apply("a", spec("running"), 1) == "running"
    assert driver.observe() == {"a": "running"}
    assert driver.generation("a") == 1
    dom = dom_of(driver, "a")
    assert dom.info()[3] == 1  # vCPUs
    assert dom.maxMemory() == 128 * 1024
    assert f"address='{mac_address('a', 0)}'" in dom.XMLDesc()

    assert driver.apply("a", spec("stopped"), 2) == "stopped"
    assert driver.observe() == {"a": "stopped"}
    assert driver.generation("a") == 2

    assert driver.apply("a", spec("running"), 3) == "running"
    assert driver.apply("a", None, 4) == "absent"
    assert driver.observe() == {}
    assert driver.generation("a") is None
    with pytest.raises(libvirt.libvirtError):
        dom_of(driver, "a")
    # Deleting what is already gone is fine (redelivery).
    assert driver.apply("a", None, 4) == "absent"


def test_mac_addresses_are_unicast_local_and_do_not_collide_in_a_big_segment() -> None:
    """100,000 NICs: 24 bits of hash would give some 300 pairs of equal MACs."""
    macs = [mac_address(f"vm{n}", n % 4) for n in range(100_000)]
    assert len(set(macs)) == len(macs)
    first = {int(mac[:2], 16) for mac in macs}
    assert all(octet & 0b11 == 0b10 for octet in first)  # locally administered, unicast
    assert len(first) == 64  # and the other 6 bits of that octet are used too


def test_apply_is_idempotent(driver: VmDriver) -> None:
    driver.apply("a", spec(), 1)
    dom = dom_of(driver, "a")
    before = (dom.ID(), dom.UUIDString(), dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))

    assert driver.apply("a", spec(), 1) == "running"
    after = dom_of(driver, "a")
    assert (after.ID(), after.UUIDString(), after.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) == (
        before
    )

    # A new generation of the same spec: only the generation moves, no restart.
    assert driver.apply("a", spec(), 2) == "running"
    assert driver.generation("a") == 2
    assert dom_of(driver, "a").ID() == before[0]


def test_material_change_redefines_and_restarts(driver: VmDriver) -> None:
    driver.apply("a", spec(), 1)
    first = dom_of(driver, "a")
    first_id, uuid = first.ID(), first.UUIDString()

    assert driver.apply("a", spec(vcpus=2, memory_mib=256, ips=("10.0.0.5", None)), 2) == (
        "running"
    )
    dom = dom_of(driver, "a")
    assert dom.UUIDString() == uuid  # redefined in place, not a new domain
    assert dom.ID() != first_id  # restarted so that the running guest matches the spec
    assert dom.info()[3] == 2
    assert dom.maxMemory() == 256 * 1024
    assert dom.XMLDesc().count("<interface") == 2
    assert driver.generation("a") == 2


def test_stale_generation_changes_nothing(driver: VmDriver) -> None:
    driver.apply("a", spec(vcpus=2), 5)
    dom_id = dom_of(driver, "a").ID()
    # A redelivered older job must not roll the instance back.
    assert driver.apply("a", spec("stopped", vcpus=1), 4) == "running"
    assert driver.apply("a", None, 3) == "running"
    assert dom_of(driver, "a").ID() == dom_id
    assert dom_of(driver, "a").info()[3] == 2
    assert driver.generation("a") == 5


def test_unmanaged_domains_are_never_touched(driver: VmDriver) -> None:
    conn = driver._connection()
    # The test driver's default node has no domains; define two that orch does not own:
    # one with an unrelated name, one with our prefix but without our metadata.
    for name in ("other-vm", "orch-rogue"):
        conn.defineXML(
            f"<domain type='test'><name>{name}</name><memory>65536</memory>"
            "<os><type>hvm</type></os></domain>"
        ).create()
    driver.apply("a", spec(), 1)
    driver.apply("b", spec("stopped"), 1)

    assert driver.observe() == {"a": "running", "b": "stopped"}
    assert driver.remove("b")
    assert not driver.remove("rogue")  # our prefix, not our metadata: never touched
    assert not driver.remove("b")  # gone already
    assert driver.observe() == {"a": "running"}
    names = {d.name() for d in conn.listAllDomains(0)}
    assert names == {"other-vm", "orch-rogue", "orch-a"}
    assert all(conn.lookupByName(n).isActive() for n in ("other-vm", "orch-rogue"))

    with pytest.raises(PermanentDriverError, match="not managed"):
        driver.apply("rogue", spec(), 1)
    with pytest.raises(PermanentDriverError, match="not managed"):
        driver.apply("rogue", None, 1)
    assert conn.lookupByName("orch-rogue").isActive()
    assert driver.generation("rogue") is None


def test_domain_stopped_behind_our_back_is_restarted(driver: VmDriver) -> None:
    driver.apply("a", spec(), 1)
    dom_of(driver, "a").destroy()
    assert driver.observe() == {"a": "stopped"}
    assert driver.apply("a", spec(), 1) == "running"
    assert driver.observe() == {"a": "running"}

    dom_of(driver, "a").suspend()
    assert driver.observe() == {"a": "stopped"}  # paused vCPUs do not count as running
    assert driver.apply("a", spec(), 1) == "running"

    # Undefined behind our back: defined again.
    dom = dom_of(driver, "a")
    dom.destroy()
    dom.undefine()
    assert driver.apply("a", spec(), 1) == "running"
    assert driver.generation("a") == 1


def test_missing_image_is_permanent(driver: VmDriver) -> None:
    with pytest.raises(PermanentDriverError, match="image missing-os does not exist"):
        driver.apply("a", spec(image="missing-os"), 1)
    assert driver.observe() == {}
    # The qemu driver knows only its built-in image; checked before connecting.
    qemu = VmDriver("qemu+unix:///system?socket=/nonexistent/sock", "h1")
    with pytest.raises(PermanentDriverError, match="image centos does not exist"):
        qemu.apply("a", spec(image="centos"), 1)


def test_unreachable_libvirtd_is_transient(tmp_path: Path) -> None:
    with VmDriver(f"qemu+unix:///system?socket={tmp_path}/no-such-sock", "h1") as drv:
        with pytest.raises(TransientDriverError):
            drv.observe()
        with pytest.raises(TransientDriverError):
            drv.apply("a", spec(), 1)
        assert not isinstance(TransientDriverError("x"), PermanentDriverError)
        assert TransientDriverError("x").transient and not PermanentDriverError("x").transient


def test_hosts_are_independent(tmp_path: Path) -> None:
    drivers = []
    for host in ("h1", "h2", "h3"):
        drivers.append(VmDriver(small_node(host, tmp_path), host))
    try:
        for i, drv in enumerate(drivers):
            for n in range(i + 1):
                drv.apply(f"i{i}-{n}", spec(), 1)
        assert [len(d.observe()) for d in drivers] == [1, 2, 3]
    finally:
        for drv in drivers:
            drv.close()


# -- qemu:///system: real guests under TCG -----------------------------------------------

QEMU_URI = "qemu:///system"
BOOT_TIMEOUT = 60.0


def _libvirtd_unreachable() -> str | None:
    try:
        conn = libvirt.open(QEMU_URI)
    except libvirt.libvirtError as exc:
        return f"libvirtd not reachable at {QEMU_URI} ({exc}): run .ci/setup-libvirt.sh"
    conn.close()
    if os.geteuid() != 0:
        return "needs root to create a bridge"
    return None


_SKIP_QEMU = _libvirtd_unreachable()
qemu_only = pytest.mark.skipif(_SKIP_QEMU is not None, reason=_SKIP_QEMU or "")


@dataclass
class QemuHost:
    driver: VmDriver
    lan: Lan
    ids: list[str] = field(default_factory=list)  # every instance to remove at teardown

    def new_id(self) -> str:
        instance_id = f"tb{secrets.token_hex(4)}"
        self.ids.append(instance_id)
        return instance_id


def _force_remove(instance_id: str) -> None:
    conn = libvirt.open(QEMU_URI)
    try:
        dom = conn.lookupByName(domain_name(instance_id))
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    except libvirt.libvirtError:
        pass
    finally:
        conn.close()


@pytest.fixture
def qemu_host() -> Iterator[QemuHost]:
    """A private LAN (see tests/lan.py) and a driver attaching guests to its bridge.

    Teardown removes every guest the test created, then the LAN, whatever happened.
    """
    with guest_lan() as lan:
        driver = VmDriver(QEMU_URI, "h1", guest=build_guest_image(), bridge=lan.bridge)
        host = QemuHost(driver, lan)
        try:
            yield host
        finally:
            for instance_id in host.ids:
                try:
                    host.driver.apply(instance_id, None, 1 << 62)
                except Exception:  # leave no guest behind, even if the driver is broken
                    _force_remove(instance_id)
                host.driver.console_log(instance_id).unlink(missing_ok=True)
            host.driver.close()


def _wait_for_marker(log: Path, instance_id: str, since: float) -> float:
    marker = f"{READY_MARKER} {instance_id}"
    while time.monotonic() - since < BOOT_TIMEOUT:
        if log.exists() and marker in log.read_text(errors="replace"):
            return time.monotonic() - since
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no console log)"
    raise AssertionError(f"{instance_id}: no '{marker}' within {BOOT_TIMEOUT}s:\n{tail}")


def test_guest_image_is_cached(tmp_path: Path) -> None:
    if not list(Path("/boot").glob("vmlinuz-*")):
        pytest.skip("no Debian kernel installed: run .ci/setup-libvirt.sh")
    first = build_guest_image(tmp_path)
    stamp = first.kernel.stat().st_mtime_ns
    assert first.kernel.read_bytes()[:4] == b"\x7fELF"  # uncompressed, boots via PVH
    assert first.initrd.read_bytes()[:6] == b"070701"  # cpio newc
    again = build_guest_image(tmp_path)
    assert again == first
    assert again.kernel.stat().st_mtime_ns == stamp  # reused, not rebuilt


@qemu_only
def test_real_guests_boot_and_answer_ping(qemu_host: QemuHost) -> None:
    drv, lan = qemu_host.driver, qemu_host.lan
    conn = drv._connection()
    guests = {qemu_host.new_id(): lan.address(11), qemu_host.new_id(): lan.address(12)}

    # Both boot at once, as an agent converging its host would do.
    started: dict[str, float] = {}
    for instance_id, address in guests.items():
        started[instance_id] = time.monotonic()
        assert drv.apply(instance_id, spec(ips=(address,)), 1) == "running"
    observed = drv.observe()
    assert {i: observed.get(i) for i in guests} == dict.fromkeys(guests, "running")

    for instance_id, address in guests.items():
        log = drv.console_log(instance_id)
        boot = _wait_for_marker(log, instance_id, started[instance_id])
        uptime = [line for line in log.read_text().splitlines() if "kernel uptime" in line]
        print(f"\n{instance_id}: apply -> '{READY_MARKER}' in {boot:.2f}s ({uptime[-1]})")
        lan.ping(address)

    first, address = next(iter(guests.items()))
    # Converged already: applying again is a no-op and does not restart the guest.
    dom_id = conn.lookupByName(domain_name(first)).ID()
    assert drv.apply(first, spec(ips=(address,)), 1) == "running"
    assert conn.lookupByName(domain_name(first)).ID() == dom_id

    # Stop: the guest powers off on the ACPI power button, before the grace period ends.
    t = time.monotonic()
    assert drv.apply(first, spec("stopped", ips=(address,)), 2) == "stopped"
    stop = time.monotonic() - t
    print(f"{first}: stopped in {stop:.2f}s")
    assert stop < drv.shutdown_grace

    for instance_id in guests:
        assert drv.apply(instance_id, None, 3) == "absent"
        with pytest.raises(libvirt.libvirtError) as err:
            conn.lookupByName(domain_name(instance_id))
        assert err.value.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
    assert not set(drv.observe()) & set(guests)


@qemu_only
def test_qemu_unknown_image_is_permanent(qemu_host: QemuHost) -> None:
    instance_id = qemu_host.new_id()
    with pytest.raises(PermanentDriverError, match="image centos does not exist"):
        qemu_host.driver.apply(instance_id, spec(image="centos"), 1)
    assert qemu_host.driver.generation(instance_id) is None


def test_a_new_rendering_leaves_running_guests_alone_until_their_template_changes(
        driver: VmDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    """An upgraded agent that renders domains differently (here: another MAC scheme) must
    not restart every guest it finds; a changed template still takes the new rendering."""
    driver.apply("a", spec(), 1)
    first = dom_of(driver, "a")
    old_mac = mac_address("a", 0)
    monkeypatch.setattr(vm, "mac_address", lambda instance_id, index: "02:00:00:00:00:01")
    driver._desired.cache_clear()  # the upgraded agent starts with nothing rendered

    assert driver.apply("a", spec(), 2) == "running"
    dom = dom_of(driver, "a")
    assert dom.ID() == first.ID() and f"address='{old_mac}'" in dom.XMLDesc()

    assert driver.apply("a", spec(memory_mib=256), 3) == "running"
    dom = dom_of(driver, "a")
    assert dom.ID() != first.ID() and "address='02:00:00:00:00:01'" in dom.XMLDesc()


def test_a_domain_an_older_agent_defined_the_same_way_is_adopted_without_a_restart(
        driver: VmDriver) -> None:
    """Older agents stored the digest of the XML: where the XML is still the same (no NIC),
    upgrading must restart nothing; where it differs (a NIC's MAC), the guest restarts."""
    for instance_id, ips in (("plain", ()), ("nic", ("10.0.0.5",))):
        driver.apply(instance_id, spec(ips=ips), 1)
        dom = dom_of(driver, instance_id)
        xml, _, xml_digest = driver._desired(instance_id, spec(ips=ips).template, ())
        if ips:  # what the older agent rendered: QEMU's 52:54:00 MAC
            xml = xml.replace(mac_address(instance_id, 0), "52:54:00:12:34:56")
            xml_digest = hashlib.sha256(xml.encode()).hexdigest()[:32]
        driver._set_metadata(dom, instance_id, 1, xml_digest)
    started = {i: dom_of(driver, i).ID() for i in ("plain", "nic")}

    for instance_id, ips in (("plain", ()), ("nic", ("10.0.0.5",))):
        assert driver.apply(instance_id, spec(ips=ips), 2) == "running"
    assert dom_of(driver, "plain").ID() == started["plain"]
    assert dom_of(driver, "nic").ID() != started["nic"]
    # Adopted: the new digest is stored, so the next apply compares against it.
    digest = driver._desired("plain", spec(ips=()).template, ())[1]
    assert driver._metadata(dom_of(driver, "plain"))["digest"] == digest
