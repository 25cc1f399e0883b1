"""The fabric: hosts as namespaces on an underlay bridge, made and always removed again."""

from __future__ import annotations

import ipaddress
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.fabric import GUEST_RUN_DIR, Fabric, _alive, _used_networks, unavailable


@pytest.fixture(scope="module", autouse=True)
def namespaces_available() -> None:
    reason = unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def fabric() -> Iterator[Fabric]:
    with Fabric(3) as fab:
        yield fab
    assert_gone(fab)


def assert_gone(fab: Fabric) -> None:
    assert fab.namespaces() == []
    assert fab.root_links() == []
    assert list(GUEST_RUN_DIR.glob(f"{fab.prefix}-*")) == []
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert fab.prefix not in listed


def test_hosts_are_namespaces_on_a_jumbo_underlay(fabric: Fabric) -> None:
    assert [h.name for h in fabric.hosts] == ["h1", "h2", "h3"]
    assert sorted(fabric.namespaces()) == sorted(
        [fabric.fabric_netns, *(h.netns for h in fabric.hosts)])
    assert not any(fabric.underlay.overlaps(n) for n in _used_networks())
    for host in fabric.hosts:
        assert ipaddress.ip_address(host.underlay_ip) in fabric.underlay
        assert fabric.links(host.netns) == ["lo", "ul0"]
        mtu = fabric.exec(host.netns, "cat", "/sys/class/net/ul0/mtu").stdout.strip()
        assert mtu == "9000"
    assert sorted(fabric.links(fabric.fabric_netns)) == ["lo", "ul1", "ul2", "ul3", "ulbr"]
    h1, h2, h3 = fabric.hosts
    assert fabric.ping(h1.netns, h2.underlay_ip)
    assert fabric.ping(h3.netns, h1.underlay_ip)
    # A full 9000-byte frame crosses unfragmented: room for VXLAN over a 1500 segment and more.
    assert fabric.ping(h2.netns, h3.underlay_ip, size=9000 - 28, dont_fragment=True)
    assert not fabric.ping(h2.netns, h3.underlay_ip, size=9001 - 28, dont_fragment=True)
    # Nothing of it is reachable from the root namespace.
    root = subprocess.run(["ping", "-c1", "-W1", h1.underlay_ip], capture_output=True)
    assert root.returncode != 0
    print(f"\nfabric of 3 hosts: setup {fabric.setup_s * 1000:.0f} ms")


def test_tcp_probe_from_inside_a_namespace(fabric: Fabric) -> None:
    h1, h2, _ = fabric.hosts
    # nc (openbsd) as the server: it sends its stdin and closes on EOF (-N).
    server = subprocess.Popen(["ip", "netns", "exec", h2.netns, "nc", "-N", "-l",
                               h2.underlay_ip, "9000"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    try:
        assert server.stdin is not None
        server.stdin.write(b"hello from h2\n")
        server.stdin.close()
        deadline = time.monotonic() + 5
        while True:
            try:
                answer = fabric.tcp(h1.netns, h2.underlay_ip, 9000, b"hi\n")
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert answer == "hello from h2\n"
        assert server.stdout is not None and server.stdout.read() == b"hi\n"
    finally:
        server.kill()
        server.wait()
    with pytest.raises(ConnectionRefusedError):
        fabric.tcp(h1.netns, h2.underlay_ip, 9002)


def test_teardown_after_a_failure_removes_namespaces_links_and_processes() -> None:
    fab = Fabric(2)
    with pytest.raises(RuntimeError, match="the test failed"), fab:
        host = fab.hosts[0]
        # What drivers leave under a host: a guest namespace and a process in the host.
        guest = f"{host.netns}.guest-1"
        subprocess.run(["ip", "netns", "add", guest], check=True)
        subprocess.run(["ip", "link", "add", "v0", "netns", host.netns, "type", "veth",
                        "peer", "name", "eth0", "netns", guest], check=True)
        daemon = subprocess.Popen(["ip", "netns", "exec", host.netns, "sleep", "600"],
                                  start_new_session=True)
        run_dir = GUEST_RUN_DIR / host.netns
        run_dir.mkdir(parents=True)
        deadline = time.monotonic() + 5
        while daemon.pid not in fab.processes() and time.monotonic() < deadline:
            time.sleep(0.01)  # until ip netns exec has become sleep in the namespace
        assert fab.processes() == {daemon.pid: host.netns}
        raise RuntimeError("the test failed")
    daemon.wait(timeout=5)
    assert not _alive(daemon.pid)
    assert fab.teardown_s is not None
    assert_gone(fab)
    print(f"\nteardown of 2 hosts, a guest and a process: {fab.teardown_s * 1000:.0f} ms")


def test_setup_and_teardown_times() -> None:
    setups, teardowns = [], []
    for _ in range(3):
        with Fabric(3) as fab:
            pass
        assert fab.setup_s is not None and fab.teardown_s is not None
        setups.append(fab.setup_s)
        teardowns.append(fab.teardown_s)
        assert_gone(fab)
    print(f"\nFabric(3): setup {min(setups) * 1000:.0f}-{max(setups) * 1000:.0f} ms, "
          f"teardown {min(teardowns) * 1000:.0f}-{max(teardowns) * 1000:.0f} ms")
    assert max(setups) < 5 and max(teardowns) < 5
