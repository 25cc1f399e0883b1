"""Private networks in the fold: VNIs, addresses, MACs, ports, spans and the jobs they send.

Driven through ``fold_message`` with the deciders' ``World`` (follow-ups relayed in order).
"""

from typing import Any

import pytest

from orchestrator.deciders.network import Network
from orchestrator.fold import Folded
from schemas.commands import REGISTRY_ID
from schemas.ids import mac_address
from schemas.specs import InstanceSpec, NetworkSpec, RemotePort
from tests.test_deciders import T_SMALL, World, accepted, only, reason

VTEPS = {"h0": "192.0.2.10", "h1": "192.0.2.11", "h2": "192.0.2.12"}


class Cloud(World):
    def fold(self, subject_: str, data: bytes) -> Folded:
        folded = super().fold(subject_, data)
        assert not folded.internal_error, folded.dead_letter
        return folded

    def up(self, *hosts: str) -> None:
        for h in hosts:
            self.host(h, vcpus=64, memory_mib=1 << 16)
            self.send("system", "HostUp", h, boot_id="b1", underlay=VTEPS[h])
            self.settle()

    def network(self, id_: str, vni: int, cidr: str = "10.0.0.0/24") -> list[Folded]:
        assert accepted(self.send("user", "CreateNetwork", id_, vni=vni, cidr=cidr))
        return self.settle()

    def vm(self, id_: str, *nics: dict[str, Any]) -> list[Folded]:
        self.send("user", "CreateInstance", id_, template={**T_SMALL, "nics": list(nics)})
        return self.settle()

    def net(self, id_: str) -> Network:
        return self.states[("network", id_)]

    def jobs_of(self, folded: list[Folded], kind: str) -> dict[str, Any]:
        """The newest job per host of ``kind`` among ``folded``: host -> spec (None: remove)."""
        out: dict[str, Any] = {}
        for f in folded:
            for job in f.jobs:
                if job.kind == kind:
                    out[job.host] = job.spec
        return out


def test_a_vni_in_use_fails_the_second_network_with_the_reason_in_its_timeline() -> None:
    w = Cloud()
    w.network("n1", vni=100)
    assert w.net("n1").status == "active"
    done = w.network("n2", vni=100)
    refused = only(done, "VniRefused", "n2")
    assert refused.outcome is not None and refused.outcome.accepted
    assert refused.outcome.reason == "VNI 100 is in use by network n1"
    assert (w.net("n2").status, w.net("n2").error) == ("failed", "VNI 100 is in use by network n1")
    assert reason(only(done, "ReserveVni", REGISTRY_ID)) == "VNI 100 is in use by network n1"
    # Once n1 is deleted its VNI is free again, and n2 may be created anew with it.
    assert accepted(w.send("user", "DeleteNetwork", "n1"))
    w.settle()
    w.network("n2", vni=100)
    assert w.net("n2").status == "active"


@pytest.mark.parametrize(("cidr", "why"), [
    ("10.0.0.1/24", "10.0.0.1/24 is not a network address (did you mean 10.0.0.0/24?)"),
    ("10.0.0.0/31", "10.0.0.0/31: the prefix must be /8 to /30"),
    ("0.0.0.0/2", "0.0.0.0/2: the prefix must be /8 to /30"),
    ("10.0.0.0/33", "10.0.0.0/33 has an invalid prefix length"),
    ("300.0.0.0/8", "300.0.0.0/8 is not an IPv4 network"),
])
def test_a_cidr_must_be_a_network_address_with_a_prefix_from_8_to_30(cidr: str,
                                                                      why: str) -> None:
    w = Cloud()
    assert reason(w.send("user", "CreateNetwork", "n1", vni=5, cidr=cidr)) == why
    assert ("network", "n1") not in w.states and not w.pending


def test_overlapping_cidrs_on_different_vnis_are_allowed() -> None:
    w = Cloud()
    w.network("a", vni=1, cidr="10.0.0.0/24")
    w.network("b", vni=2, cidr="10.0.0.0/24")
    assert w.net("a").status == w.net("b").status == "active"


def test_addresses_lowest_free_or_as_asked_and_released_on_delete() -> None:
    w = Cloud()
    w.up("h0")
    w.network("n", vni=7, cidr="10.9.0.0/29")  # .0 network, .1 gateway, .7 broadcast
    w.vm("a", {"network": "n"})
    w.vm("b", {"network": "n", "ip": "10.9.0.5"})
    w.vm("c", {"network": "n"})
    ips = {p.instance: p.ip for p in w.net("n").ports}
    assert ips == {"a": "10.9.0.2", "b": "10.9.0.5", "c": "10.9.0.3"}
    assert [n.ip for n in w.instance("a").nics if n] == ["10.9.0.2"]
    w.send("user", "DeleteInstance", "a")
    w.settle()
    w.vm("d", {"network": "n"})
    assert {p.instance: p.ip for p in w.net("n").ports}["d"] == "10.9.0.2"


@pytest.mark.parametrize(("ip", "why"), [
    ("10.9.0.9", "10.9.0.9 is outside 10.9.0.0/29"),
    ("10.9.0.1", "10.9.0.1 is reserved in 10.9.0.0/29 (network, gateway or broadcast)"),
    ("10.9.0.7", "10.9.0.7 is reserved in 10.9.0.0/29 (network, gateway or broadcast)"),
    ("10.9.0.2", "10.9.0.2 is already taken in 10.9.0.0/29"),
])
def test_a_bad_requested_address_fails_the_instance_and_changes_nothing_else(
        ip: str, why: str) -> None:
    w = Cloud()
    w.up("h0")
    w.network("n", vni=7, cidr="10.9.0.0/29")
    w.network("m", vni=8)
    w.vm("a", {"network": "n"})  # takes 10.9.0.2
    done = w.vm("x", {"network": "m"}, {"network": "n", "ip": ip})
    assert reason(only(done, "AttachPort", "n")) == why
    refused = only(done, "NicRefused", "x")
    assert refused.outcome is not None and refused.outcome.reason == f"NIC 1 on network n: {why}"
    assert (w.instance("x").status, w.instance("x").host) == ("failed", None)
    # Its other NIC's address is given back, it was never placed, and no job went out.
    assert [p.instance for p in w.net("m").ports] == []
    assert [p.instance for p in w.net("n").ports] == ["a"]
    assert "x" not in w.scheduler.allocations
    assert not any(f.jobs for f in done)
    assert reason(w.send("user", "StartInstance", "x")).startswith("instance x failed: NIC 1")
    assert accepted(w.send("user", "DeleteInstance", "x"))


@pytest.mark.parametrize("gone", ["missing", "deleted"])
def test_a_nic_on_a_network_that_does_not_exist_or_is_deleted_fails_the_instance(
        gone: str) -> None:
    w = Cloud()
    w.up("h0")
    if gone == "deleted":
        w.network("n", vni=7)
        w.send("user", "DeleteNetwork", "n")
        w.settle()
    w.vm("x", {"network": "n"})
    expected = "no network n" if gone == "missing" else "network n is deleted (being deleted)"
    assert w.instance("x").status == "failed"
    assert w.instance("x").error == f"NIC 0 on network n: {expected}"


def test_an_instance_is_placed_once_addressed_and_its_job_carries_the_resolved_nics() -> None:
    w = Cloud()
    w.up("h0")
    w.network("n", vni=7, cidr="10.9.0.0/24")
    done = w.vm("a", {"network": "n"})
    order = [f.outcome.type for f in done if f.outcome]
    assert order.index("NicAddressed") < order.index("Place") < order.index("Placed")
    (spec,) = w.jobs_of(done, "instance").values()
    assert isinstance(spec, InstanceSpec)
    (nic,) = spec.nics
    assert (nic.network, nic.vni, nic.mac, nic.ip, nic.prefix, nic.mtu) == (
        "n", 7, mac_address("a", 0), "10.9.0.2", 24, 1500)


def test_network_jobs_tell_each_host_every_other_hosts_vtep_and_ports() -> None:
    w = Cloud()
    w.up("h0")
    w.network("n", vni=7, cidr="10.9.0.0/24")
    first = w.vm("a", {"network": "n"})
    # One host: its segment has no remote VTEP or port yet.
    assert w.jobs_of(first, "network") == {"h0": NetworkSpec(
        vni=7, cidr="10.9.0.0/24", mtu=1500, vteps=(), ports=())}
    w.up("h1")  # more room than h0 now: the next instance goes there
    second = w.vm("b", {"network": "n"})
    assert w.instance("b").host == "h1"
    jobs = w.jobs_of(second, "network")
    a, b = (RemotePort(mac=mac_address(i, 0), ip=ip, vtep=VTEPS[h])
            for i, ip, h in (("a", "10.9.0.2", "h0"), ("b", "10.9.0.3", "h1")))
    assert jobs["h0"] == NetworkSpec(vni=7, cidr="10.9.0.0/24", mtu=1500,
                                     vteps=(VTEPS["h1"],), ports=(b,))
    assert jobs["h1"] == NetworkSpec(vni=7, cidr="10.9.0.0/24", mtu=1500,
                                     vteps=(VTEPS["h0"],), ports=(a,))
    # The last port leaving h1: h1 is told to remove the segment, h0 to forget h1.
    w.send("user", "DeleteInstance", "b")
    gone = w.jobs_of(w.settle(), "network")
    assert gone == {"h1": None, "h0": NetworkSpec(vni=7, cidr="10.9.0.0/24", mtu=1500,
                                                  vteps=(), ports=())}
    assert w.states[("host", "h1")].networks == []


def test_a_host_heard_of_after_its_ports_were_bound_is_announced_when_its_vtep_arrives() -> None:
    w = Cloud()
    w.up("h0")
    w.host("h1", vcpus=64, memory_mib=(1 << 16) + 1024)  # no heartbeat yet: VTEP unknown
    w.network("n", vni=7, cidr="10.9.0.0/24")
    w.vm("a", {"network": "n"})  # h1: most free memory
    before = w.vm("b", {"network": "n"})  # h0: equal memory then, more vCPUs
    assert (w.instance("a").host, w.instance("b").host) == ("h1", "h0")
    a = RemotePort(mac=mac_address("a", 0), ip="10.9.0.2", vtep="192.0.2.11")
    b = RemotePort(mac=mac_address("b", 0), ip="10.9.0.3", vtep=VTEPS["h0"])
    assert w.jobs_of(before, "network") == {
        "h0": NetworkSpec(vni=7, cidr="10.9.0.0/24", mtu=1500, vteps=(), ports=()),
        "h1": NetworkSpec(vni=7, cidr="10.9.0.0/24", mtu=1500, vteps=(VTEPS["h0"],),
                          ports=(b,))}
    w.send("system", "HostUp", "h1", boot_id="b1", underlay="192.0.2.11")
    after = w.jobs_of(w.settle(), "network")
    assert after["h0"] == NetworkSpec(vni=7, cidr="10.9.0.0/24", mtu=1500,
                                      vteps=("192.0.2.11",), ports=(a,))


def test_v1_host_up_is_upcast_without_an_underlay() -> None:
    w = Cloud()
    w.host("h0")
    f = w.send("system", "HostUp", "h0", v=1, boot_id="b9")
    assert accepted(f)
    assert w.states[("host", "h0")].underlay is None


def test_network_jobs_are_reissued_to_late_hosts_then_degraded_and_a_report_clears_it() -> None:
    w = Cloud()
    w.up("h0")
    w.network("n", vni=7, cidr="10.9.0.0/24")
    w.vm("a", {"network": "n"})
    w.up("h1")
    w.vm("b", {"network": "n"})
    gen = w.net("n").generation
    assert accepted(w.send("h0", "NetworkApplied", "n", generation=gen, observed="present"))
    assert reason(w.send("h1", "NetworkApplied", "n", generation=gen + 1, observed="present")) \
        == f"report for generation {gen + 1} > {gen}"
    w.send("h1", "NetworkFailed", "n", generation=gen, error="vxlan: EEXIST")
    again = w.send("system", "ReconcileNetwork", "n", generation=gen, max_attempts=1)
    assert [(j.host, j.attempt) for j in again.jobs] == [("h1", 1)]  # only the late host
    out = w.send("system", "ReconcileNetwork", "n", generation=gen, max_attempts=1)
    assert out.outcome is not None and out.outcome.events == ("Degraded",)
    why = f"hosts h1 did not apply generation {gen}: vxlan: EEXIST"
    assert (out.outcome.reason, w.net("n").status) == (why, "degraded")
    assert accepted(w.send("h1", "NetworkApplied", "n", generation=gen, observed="present"))
    assert (w.net("n").status, w.net("n").error) == ("active", None)
    # A report from a host the network does not span changes nothing.
    stray = w.send("h2", "NetworkApplied", "n", generation=gen, observed="present")
    assert accepted(stray) and not stray.changed


def test_new_rules_are_a_new_generation_of_the_instance_job() -> None:
    w = Cloud()
    w.up("h0")
    w.network("n", vni=7)
    w.vm("a", {"network": "n"})
    rule = {"protocol": "tcp", "port": 8080, "source": "10.0.0.9/32"}
    f = w.send("user", "SetRules", "a", rules=[rule])
    (job,) = f.jobs
    assert job.generation == 2 and [r.port for r in job.spec.template.rules] == [8080]
    same = w.send("user", "SetRules", "a", rules=[rule])
    assert accepted(same) and not same.jobs
