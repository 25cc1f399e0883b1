"""BGP from LB nodes to a router, for real: a bird2 per LB node namespace (agents.lb.bgp's
Speaker) and the edge's router bird (orchestrator.edge), checked by the router's kernel
routes and by real TCP connections from the client behind it.

Each LB node runs a stand-in for its dataplane (`Edge.serve`: the VIP on `lo`, a process
answering the node's name), so that a node "dies" with its links up: SIGKILL (or SIGSTOP,
hung) of its bird and of that process together.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.drivers.errors import PermanentDriverError
from agents.lb.bgp import HOLD_S, Speaker
from orchestrator.edge import EDGE_RUN_DIR, Edge, Prober, seconds_apart
from tests.fabric import Fabric, _alive, unavailable

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

NODES = ["lb1", "lb2"]
PORT = 80
CONNECTIONS = 200


@pytest.fixture(scope="module")
def edge() -> Iterator[Edge]:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with Fabric(NODES) as fabric:
        with Edge(fabric, NODES) as edge:
            yield edge
        assert not (EDGE_RUN_DIR / edge.router).exists()
        assert edge.router not in fabric.namespaces()
        assert edge.client not in fabric.namespaces()
    assert fabric.namespaces() == []


class Nodes:
    """The LB nodes' speakers and stand-in servers of one test; all closed after it."""

    def __init__(self, edge: Edge, run_dir: Path) -> None:
        self.edge = edge
        self.speakers = {}
        for host in NODES:
            local_ip, router_ip = edge.uplink(host)
            self.speakers[host] = Speaker(edge.uplinks[host].netns, run_dir / host, local_ip,
                                          edge.node_asn, router_ip, edge.router_asn)
        self.servers: dict[str, subprocess.Popen[bytes]] = {}

    def serve(self, host: str, vip: str) -> None:
        self.servers[host] = self.edge.serve(host, vip, PORT)

    def signal(self, host: str, sig: signal.Signals) -> None:
        """The node's bird and server get `sig`, its links stay up."""
        pid = self.speakers[host].pid()
        assert pid is not None
        os.kill(pid, sig)
        os.kill(self.servers[host].pid, sig)

    def close(self) -> None:
        for server in self.servers.values():
            server.kill()
            server.wait()
        for speaker in self.speakers.values():
            speaker.close()


@pytest.fixture
def nodes(edge: Edge, tmp_path: Path) -> Iterator[Nodes]:
    made = Nodes(edge, tmp_path)
    try:
        yield made
    finally:
        made.close()
    for i in range(3):  # the VIPs the tests use: withdrawn (bird's Cease is asynchronous)
        edge.wait_routes(edge.vip(i), [])
    for host in NODES:
        assert not [pid for pid in edge.fabric.processes([edge.uplinks[host].netns])
                    if _command(pid).startswith("bird")]


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def spread(edge: Edge, vip: str, count: int = CONNECTIONS) -> collections.Counter[str | None]:
    """Who answered `count` new connections from the client (None: nobody)."""
    return collections.Counter(edge.connect(vip, PORT, timeout_s=2.0) for _ in range(count))


def serving_both(edge: Edge, nodes: Nodes, vip: str) -> None:
    for host in NODES:
        nodes.speakers[host].announce({vip})
        nodes.serve(host, vip)
    edge.wait_routes(vip, NODES, within_s=30)  # the router may be in its error wait (≤ 5 s)


def test_two_nodes_announce_one_route_with_two_nexthops_and_share_the_connections(
        edge: Edge, nodes: Nodes) -> None:
    vip = edge.vip(0)
    serving_both(edge, nodes, vip)
    assert edge.router_routes(vip) == sorted(edge.uplink(h)[0] for h in NODES)
    assert edge.sessions() == {h: "Established" for h in NODES}
    assert {h: s.announced() for h, s in nodes.speakers.items()} == {h: {vip} for h in NODES}
    answers = spread(edge, vip)
    print(f"\n{CONNECTIONS} connections: {dict(answers)}")
    assert set(answers) == set(NODES)  # every one answered, by one of the two nodes
    assert min(answers.values()) >= CONNECTIONS // 4  # the 5-tuple hash spreads them


@pytest.mark.parametrize(("death", "bfd"), [(signal.SIGKILL, True), (signal.SIGSTOP, True),
                                            (signal.SIGSTOP, False)],
                         ids=["sigkill", "sigstop-bfd", "sigstop-hold-timer"])
def test_a_dead_node_loses_its_nexthop_and_new_connections_go_to_the_other(
        edge: Edge, nodes: Nodes, death: signal.Signals, bfd: bool) -> None:
    vip = edge.vip(0)
    nodes.speakers["lb1"].bfd = bfd  # without BFD on its side, only the hold timer sees a hang
    serving_both(edge, nodes, vip)
    with Prober(edge, vip, PORT) as probe:
        time.sleep(0.3)
        killed = time.monotonic()
        nodes.signal("lb1", death)
        withdrawn_s = edge.wait_routes(vip, ["lb2"], within_s=HOLD_S + 1)
        time.sleep(0.5)
    last = probe.last_failure()
    failover_s = max(0.0, last.started - killed) if last else 0.0
    failed = sum(a.answer is None for a in probe.attempts)
    print(f"\n{death.name} (BFD {'on' if bfd else 'off'}): "
          f"route withdrawn after {withdrawn_s:.3f} s; "
          f"{failed} of {len(probe.attempts)} probes failed, the last started "
          f"{failover_s:.3f} s after the death")
    assert all(a.answer for a in probe.attempts if a.ended < killed)
    # The protocol's bound (hold timer, or BFD), not a speed: every connection begun
    # later than that was answered, by the survivor.
    assert failover_s <= HOLD_S + 1
    later = [a.answer for a in probe.attempts if a.started > killed + withdrawn_s]
    assert later and set(later) == {"lb2"}
    assert spread(edge, vip, 100) == {"lb2": 100}

    # Back: a hung node resumes; a killed one is started again by its next announce.
    if death == signal.SIGSTOP:
        nodes.signal("lb1", signal.SIGCONT)
    else:
        assert nodes.speakers["lb1"].pid() is None
        assert nodes.speakers["lb1"].announced() == set()
        nodes.speakers["lb1"].announce({vip})
        nodes.serve("lb1", vip)
    back_s = edge.wait_routes(vip, NODES, within_s=30)  # after bird's error wait (1-5 s)
    edge.wait_established(steady_s=0.5)
    print(f"two nexthops again {back_s:.3f} s later")
    assert set(spread(edge, vip)) == set(NODES)


def test_announce_changes_what_the_router_routes_without_restarting_bird(
        edge: Edge, nodes: Nodes) -> None:
    a, b, c = edge.vip(0), edge.vip(1), edge.vip(2)
    lb1, lb2 = nodes.speakers["lb1"], nodes.speakers["lb2"]
    lb1.announce({a})
    lb2.announce({a})
    edge.wait_routes(a, NODES)
    pid = lb1.pid()
    edge.wait_established()
    since = edge.since("lb1")
    lb1.announce({a, b})
    edge.wait_routes(b, ["lb1"])
    assert lb1.announced() == {a, b}
    lb1.announce({b, c})  # a dropped, c added
    edge.wait_routes(a, ["lb2"])
    edge.wait_routes(c, ["lb1"])
    assert edge.router_routes(b) == [edge.uplink("lb1")[0]]
    lb1.announce({b, c})  # the same again: nothing changes
    assert lb1.announced() == {b, c}
    assert lb1.pid() == pid  # reconfigured, never restarted
    assert seconds_apart(edge.since("lb1"), since) < 0.1  # the session never went down
    assert edge.sessions()["lb1"] == "Established"
    lb1.announce(set())
    for vip in (b, c):
        edge.wait_routes(vip, [])
    assert lb1.announced() == set()
    assert lb1.session() == "Established"  # announcing nothing keeps the session
    assert seconds_apart(edge.since("lb1"), since) < 0.1


def test_close_withdraws_everything_and_leaves_no_process_or_file(
        edge: Edge, nodes: Nodes) -> None:
    a, b = edge.vip(0), edge.vip(1)
    lb1 = nodes.speakers["lb1"]
    lb1.announce({a, b})
    edge.wait_routes(a, ["lb1"])
    edge.wait_routes(b, ["lb1"])
    pid = lb1.pid()
    assert pid is not None
    lb1.close()
    edge.wait_routes(a, [])
    edge.wait_routes(b, [])
    # bird said goodbye (a Cease on SIGTERM): the router did not wait for its hold timer.
    assert edge.session_info("lb1")["Last error"] == "Received: Administrative shutdown"
    assert not _alive(pid)
    assert not lb1.run_dir.exists()
    assert lb1.announced() == set() and lb1.session() is None
    lb1.close()  # twice is fine


def test_a_dead_bird_is_restarted_by_the_next_announce(edge: Edge, nodes: Nodes) -> None:
    vip = edge.vip(0)
    lb1 = nodes.speakers["lb1"]
    lb1.announce({vip})
    edge.wait_routes(vip, ["lb1"])
    old = lb1.pid()
    assert old is not None
    os.kill(old, signal.SIGKILL)
    edge.wait_routes(vip, [])
    assert lb1.pid() is None and lb1.announced() == set()
    lb1.announce({vip})
    edge.wait_routes(vip, ["lb1"])
    assert lb1.pid() not in (None, old)
    assert lb1.announced() == {vip}


def test_a_hung_or_unreachable_bird_is_replaced_by_the_next_announce(
        edge: Edge, nodes: Nodes) -> None:
    vip = edge.vip(0)
    lb1 = nodes.speakers["lb1"]
    lb1.announce({vip})
    edge.wait_routes(vip, ["lb1"])
    hung = lb1.pid()
    assert hung is not None
    os.kill(hung, signal.SIGSTOP)
    lb1.announce({vip})  # birdc times out: a new bird
    edge.wait_routes(vip, ["lb1"])
    assert lb1.pid() not in (None, hung) and not _alive(hung)
    unreachable = lb1.pid()
    lb1.ctl.unlink()
    lb1.announce({vip, edge.vip(1)})
    edge.wait_routes(edge.vip(1), ["lb1"])
    assert lb1.pid() not in (None, unreachable)


def test_bad_input_is_a_permanent_error(edge: Edge, tmp_path: Path) -> None:
    local_ip, router_ip = edge.uplink("lb1")
    netns = edge.uplinks["lb1"].netns
    with pytest.raises(PermanentDriverError, match="router id"):
        Speaker(netns, tmp_path, "lb1", 65001, router_ip, 65000)
    with pytest.raises(PermanentDriverError, match="AS"):
        Speaker(netns, tmp_path, local_ip, 0, router_ip, 65000)
    speaker = Speaker(netns, tmp_path / "s", local_ip, 65001, router_ip, 65000)
    for vip in ("10.0.0.0/24", "nope", "224.0.0.1", "::1"):
        with pytest.raises(PermanentDriverError, match="VIP"):
            speaker.announce({vip})
    assert speaker.pid() is None
    with pytest.raises(PermanentDriverError, match="namespace"):
        Speaker(f"{edge.fabric.prefix}-nosuch", tmp_path / "n", local_ip, 65001, router_ip,
                65000).announce({edge.vip(0)})
    speaker.close()
    assert not (tmp_path / "s").exists()
