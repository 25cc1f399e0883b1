"""Load balancers in the fold: LB nodes, placement on two of them, backends from pools,
health decided from both nodes' reports, drains before a member goes, and the jobs.

Driven through ``fold_message`` with the deciders' ``World`` (follow-ups relayed in order).
"""

from typing import Any

import pytest

from orchestrator.deciders.lb import (
    LoadBalancer,
    drains_due,
    healthy_ports,
    seed_of,
    without_healthy_backend,
)
from orchestrator.deciders.scheduler import Scheduler
from orchestrator.fold import Folded
from schemas.codec import decode_command
from schemas.commands import SCHEDULER_ID, CreateLoadBalancer, RegisterHost
from schemas.specs import InstanceSpec, LbSpec
from tests.test_deciders import T_SMALL, accepted, only, reason
from tests.test_network_fold import Cloud

VIP = "192.0.2.80"
SERVICE = {"port": 80, "target_port": 8080}
UNDERLAY = {"lb1": "192.0.2.21", "lb2": "192.0.2.22", "lb3": "192.0.2.23"}


class Lbs(Cloud):
    def node(self, *names: str) -> list[Folded]:
        done = []
        for name in names:
            assert accepted(self.send("admin", "RegisterHost", name, vcpus=4, memory_mib=4096,
                                      role="lb"))
            self.send("system", "HostUp", name, boot_id="b1", underlay=UNDERLAY[name])
            done += self.settle()
        return done

    def pool(self, id_: str, size: int, network: str | None = "n") -> list[Folded]:
        nics = [{"network": network}] if network else []
        self.send("user", "CreatePool", id_, template={**T_SMALL, "nics": nics}, size=size)
        return self.settle()

    def balancer(self, id_: str = "l", pool: str = "p", **fields: Any) -> list[Folded]:
        doc = {"vip": VIP, "pool": pool, "services": [SERVICE], **fields}
        assert accepted(self.send("user", "CreateLoadBalancer", id_, **doc))
        return self.settle()

    def lb(self, id_: str = "l") -> LoadBalancer:
        return self.states[("lb", id_)]

    def sched(self) -> Scheduler:
        return self.states[("scheduler", SCHEDULER_ID)]

    def applied(self, node: str, id_: str = "l", generation: int | None = None) -> list[Folded]:
        gen = self.lb(id_).generation if generation is None else generation
        assert accepted(self.send(node, "LbApplied", id_, generation=gen, observed="serving"))
        return self.settle()

    def drain(self, id_: str = "l") -> list[Folded]:
        """The reconciler's tick once the drain time is up (each fold here is 1 s later)."""
        assert accepted(self.send("system", "DrainTick", id_))
        return self.settle()

    def health(self, node: str, instance: str, healthy: bool, id_: str = "l",
               port: int = 80) -> Folded:
        gen = self.lb(id_).generation
        f = self.send(node, "BackendHealth", id_, instance=instance, port=port,
                      healthy=healthy, generation=gen, detail="probe")
        self.settle()
        return f

    def cloud(self, members: int = 3) -> list[Folded]:
        self.up("h0", "h1")
        self.network("n", vni=42)
        self.node("lb1", "lb2")
        self.pool("p", members)
        return self.balancer()


def lb_jobs(folded: list[Folded]) -> dict[str, LbSpec | None]:
    out: dict[str, Any] = {}
    for f in folded:
        for job in f.jobs:
            if job.kind == "lb":
                out[job.host] = job.spec
    return out


def backends(spec: LbSpec | None) -> dict[str, tuple[str, tuple[int, ...]]]:
    assert spec is not None
    return {b.instance: (b.ip, b.healthy) for b in spec.backends}


def test_a_balancer_is_placed_on_two_lb_nodes_with_ports_and_the_same_backends() -> None:
    w = Lbs()
    done = w.cloud()
    lb = w.lb()
    assert lb.status == "active" and lb.network == "n"
    assert sorted(s.node for s in lb.slots) == ["lb1", "lb2"]
    ips = {p.instance: p.ip for p in w.net("n").ports if p.owner == "instance"}
    assert set(ips) == {"p-0", "p-1", "p-2"}
    # Members live on hypervisors only; the LB nodes carry no instance.
    assert {w.instance(m).host for m in ips} <= {"h0", "h1"}
    assert set(w.sched().hosts) == {"h0", "h1"} and set(w.sched().lb_nodes) == {"lb1", "lb2"}
    # Each node has its own port on the network, bound to it.
    lb_ports = {p.index: (p.host, p.ip) for p in w.net("n").ports if p.owner == "lb"}
    assert {host for host, _ in lb_ports.values()} == {"lb1", "lb2"}
    assert len({ip for _, ip in lb_ports.values()} | set(ips.values())) == 5
    # Both nodes get the whole balancer: the same backends and seed, each its own port.
    jobs = lb_jobs(done)
    assert set(jobs) == {"lb1", "lb2"}
    one, two = jobs["lb1"], jobs["lb2"]
    assert one is not None and two is not None
    assert backends(one) == backends(two) == {m: (ip, ()) for m, ip in ips.items()}
    assert one.seed == two.seed == seed_of("l") and one.vip == VIP
    assert one.services[0].strategy == "maglev"
    assert {one.port.ip, two.port.ip} == {ip for _, ip in lb_ports.values()}
    # The nodes span the network: each is told every member's port.
    net_jobs = w.jobs_of(done, "network")
    for node in ("lb1", "lb2"):
        spec = net_jobs[node]
        assert spec is not None and set(ips.values()) <= {p.ip for p in spec.ports}


def test_health_is_decided_from_both_nodes_reports() -> None:
    w = Lbs()
    w.cloud()
    assert without_healthy_backend(w.lb()) == [80]  # nothing seen to rise yet: an alert
    gen = w.lb().generation
    up = w.health("lb1", "p-0", True)
    assert up.outcome is not None and up.outcome.reason == "p-0:80 healthy as lb1 sees it (probe)"
    assert w.lb().generation == gen + 1
    spec = lb_jobs([up])
    assert backends(spec["lb1"])["p-0"][1] == backends(spec["lb2"])["p-0"][1] == (80,)
    assert without_healthy_backend(w.lb()) == []
    # The same again changes nothing; the other node seeing it healthy keeps it in.
    again = w.health("lb1", "p-0", True)
    assert accepted(again) and not again.changed
    w.health("lb2", "p-0", True)
    assert w.lb().generation == gen + 1
    # One node seeing it fall takes it out for both.
    down = w.health("lb2", "p-0", False)
    assert w.lb().generation == gen + 2
    assert {backends(s)["p-0"][1] for s in lb_jobs([down]).values()} == {()}
    # Reports from a host that is no node of the balancer, or about an unknown backend,
    # or for a generation before the backend joined, are ignored and say so.
    w.node("lb3")
    stranger = w.health("lb3", "p-1", True)
    assert stranger.outcome is not None and "does not serve l" in (stranger.outcome.reason or "")
    assert not stranger.changed
    unknown = w.health("lb1", "zz", True)
    assert not unknown.changed
    assert reason(w.health("lb1", "p-1", True, port=443)) == "l has no service on port 443"


def test_a_stopped_member_leaves_the_balancers_before_its_job_goes_out() -> None:
    w = Lbs()
    w.cloud()
    w.applied("lb1")
    w.applied("lb2")
    stop = w.send("user", "StopInstance", "p-1")
    assert stop.outcome is not None and stop.outcome.events == ("Leaving",)
    assert stop.jobs == []  # the guest keeps running while the balancers drain it
    done = w.settle()
    assert w.instance("p-1").power == "running" and w.instance("p-1").leaving == "stop"
    specs = lb_jobs(done)
    assert "p-1" not in backends(specs["lb1"]) and "p-1" not in backends(specs["lb2"])
    # One node applied the job without it: not yet.
    assert not any(j.kind == "instance" for f in w.applied("lb1") for j in f.jobs)
    assert w.instance("p-1").leaving == "stop"
    # Both did: no new flow reaches it, and its established flows get their drain time.
    assert not any(j.kind == "instance" for f in w.applied("lb2") for j in f.jobs)
    assert w.lb().draining and w.instance("p-1").leaving == "stop"
    (since,) = w.lb().draining.values()
    assert drains_due(w.lb(), since + 999) == () and drains_due(w.lb(), since + 1000)
    # Then the pool lets it go, and only now is the guest told to stop.
    done = w.drain()
    only(done, "MemberDrained", "p-1")
    (job,) = [j for f in done for j in f.jobs if j.kind == "instance"]
    assert isinstance(job.spec, InstanceSpec) and job.spec.power == "stopped"
    assert w.instance("p-1").leaving is None
    # Started again: it serves again.
    w.send("user", "StartInstance", "p-1")
    done = w.settle()
    assert "p-1" in backends(lb_jobs(done)["lb1"])


def test_start_while_leaving_cancels_the_stop_and_delete_while_leaving_takes_over() -> None:
    w = Lbs()
    w.cloud()
    w.send("user", "StopInstance", "p-0")
    w.settle()
    stays = w.send("user", "StartInstance", "p-0")
    assert stays.outcome is not None and stays.outcome.events == ("Stays",)
    done = w.settle()
    assert "p-0" in backends(lb_jobs(done)["lb2"]) and w.states[("pool", "p")].draining == {}
    w.send("user", "StopInstance", "p-0")
    w.settle()
    w.send("user", "DeleteInstance", "p-0")
    w.settle()
    assert w.instance("p-0").leaving == "delete"
    assert reason(w.send("user", "StartInstance", "p-0")) == "instance p-0 is being deleted"
    w.applied("lb1")
    w.applied("lb2")
    done = w.drain()
    assert w.instance("p-0").status == "deleted"
    (job,) = [j for f in done for j in f.jobs if j.kind == "instance"]
    assert job.spec is None


def test_scaling_changes_the_backends_and_removed_members_are_drained_first() -> None:
    w = Lbs()
    w.cloud(members=2)
    w.send("user", "ScalePool", "p", size=4)
    done = w.settle()
    assert set(backends(lb_jobs(done)["lb1"])) == {"p-0", "p-1", "p-2", "p-3"}
    w.applied("lb1")
    w.applied("lb2")
    w.send("user", "ScalePool", "p", size=1)
    done = w.settle()
    assert set(backends(lb_jobs(done)["lb2"])) == {"p-0"}
    assert {w.instance(f"p-{i}").status for i in (1, 2, 3)} == {"placed"}  # held
    w.applied("lb2")
    w.applied("lb1")
    w.drain()
    assert {w.instance(f"p-{i}").status for i in (1, 2, 3)} == {"deleted"}
    assert w.states[("pool", "p")].draining == {}
    assert w.lb().leaving == {}


def test_a_degraded_member_leaves_the_backends_at_once() -> None:
    w = Lbs()
    w.cloud(members=2)
    member = w.instance("p-0")
    w.send("system", "Reconcile", "p-0", generation=member.generation, max_attempts=0)
    done = w.settle()
    assert w.instance("p-0").status == "degraded"
    assert set(backends(lb_jobs(done)["lb1"])) == {"p-1"}
    assert w.states[("pool", "p")].draining == {}


def test_a_lost_node_is_replaced_and_a_balancer_without_two_waits_visibly() -> None:
    w = Lbs()
    w.cloud()
    w.send("system", "HostDown", "lb1")
    done = w.settle()
    lb = w.lb()
    assert [s.node for s in lb.slots].count(None) == 1 and "lb2" in [s.node for s in lb.slots]
    assert lb.reason == "on 1 of 2 LB nodes: waiting for another (1 LB node up)"
    assert lb_jobs(done)["lb1"] is None  # the node it left is told to remove it
    assert lb_jobs(done)["lb2"] is not None  # the survivor keeps serving
    # A new node takes the empty slot, with the slot's port (same address) bound to it.
    slot = next(i for i, s in enumerate(lb.slots) if s.node is None)
    ip = lb.slots[slot].port.ip  # type: ignore[union-attr]
    done = w.node("lb3")
    lb = w.lb()
    assert lb.slots[slot].node == "lb3" and lb.reason is None and lb.status == "active"
    spec = lb_jobs(done)["lb3"]
    assert spec is not None and spec.port.ip == ip
    assert {p.host for p in w.net("n").ports if p.owner == "lb"} == {"lb2", "lb3"}
    # lb1 comes back: nothing moves (both slots are served).
    w.send("system", "HostUp", "lb1", boot_id="b2", underlay=UNDERLAY["lb1"])
    w.settle()
    assert sorted(s.node or "" for s in w.lb().slots) == ["lb2", "lb3"]


def test_a_balancer_waits_for_two_nodes_and_balancers_spread_over_nodes() -> None:
    w = Lbs()
    w.up("h0")
    w.network("n", vni=42)
    w.pool("p", 1)
    w.node("lb1")
    done = w.balancer("a")
    placed = only(done, "BalancerPlaced", "a")
    assert placed.outcome is not None
    assert placed.outcome.reason == "on 0 of 2 LB nodes: waiting for another (1 LB node up)"
    assert w.lb("a").status == "pending" and lb_jobs(done) == {}
    w.node("lb2")
    assert sorted(s.node or "" for s in w.lb("a").slots) == ["lb1", "lb2"]
    w.node("lb3")
    for id_ in ("b", "c"):
        w.balancer(id_)
    load: dict[str, int] = {}
    for nodes in w.sched().balancers.values():
        for n in nodes:
            load[n] = load.get(n, 0) + 1
    assert load == {"lb1": 2, "lb2": 2, "lb3": 2}


@pytest.mark.parametrize(("fields", "why"), [
    ({"vip": "300.1.2.3"}, "VIP '300.1.2.3' is not an IPv4 address"),
    ({"vip": "127.0.0.5"}, "VIP 127.0.0.5 is not a unicast address a router can carry"),
    ({"services": [SERVICE, {"port": 80, "target_port": 9090}]}, "two services on 80/tcp"),
    ({"services": [{**SERVICE, "health": {"interval_ms": 500, "timeout_ms": 500}}]},
     "service 80/tcp: health check timeout 500 ms must be shorter than its interval 500 ms"),
    ({"services": [{**SERVICE, "strategy": "least_conn"}]},
     "service 80/tcp: strategy least_conn is not offered for tcp"
     " (offered: maglev, round_robin, source_hash)"),
    ({"services": [{**SERVICE, "protocol": "udp", "health": {"http_path": "/"}}]},
     "service 80/udp: an HTTP health check needs tcp"),
])
def test_bad_balancers_are_rejected_with_the_reason(fields: dict[str, Any], why: str) -> None:
    w = Lbs()
    doc = {"vip": VIP, "pool": "p", "services": [SERVICE], **fields}
    assert reason(w.send("user", "CreateLoadBalancer", "l", **doc)) == why
    assert ("lb", "l") not in w.states and not w.pending


def test_a_missing_pool_or_a_vip_inside_the_network_fails_the_balancer_with_the_reason() -> None:
    w = Lbs()
    w.up("h0")
    w.network("n", vni=42, cidr="10.0.0.0/24")
    w.node("lb1", "lb2")
    done = w.balancer("a", pool="nope")
    assert reason(only(done, "AttachBalancer", "nope")) == "no pool nope"
    assert (w.lb("a").status, w.lb("a").reason) == ("failed", "no pool nope")
    assert w.sched().balancers.get("a") is None  # its nodes were given back
    w.pool("p", 1)
    done = w.balancer("b", vip="10.0.0.200")
    assert w.lb("b").status == "failed"
    assert w.lb("b").reason == ("VIP 10.0.0.200 lies inside 10.0.0.0/24, the CIDR of network n"
                                " behind it: replies would never come back through a node")
    assert not [p for p in w.net("n").ports if p.owner == "lb"]
    w.pool("bare", 1, network=None)
    w.balancer("c", pool="bare")
    assert w.lb("c").reason == "pool bare's template has no NIC: its members cannot be reached"


def test_deleting_a_balancer_removes_it_from_its_nodes_pool_scheduler_and_network() -> None:
    w = Lbs()
    w.cloud()
    deleted = w.send("user", "DeleteLoadBalancer", "l")
    assert accepted(deleted) and lb_jobs([deleted]) == {"lb1": None, "lb2": None}
    done = w.settle()
    assert w.states[("pool", "p")].balancers == []
    assert "l" not in w.sched().balancers
    assert not [p for p in w.net("n").ports if p.owner == "lb"]
    net_jobs = w.jobs_of(done, "network")
    assert net_jobs["lb1"] is None and net_jobs["lb2"] is None  # no port left there
    # Its members stop without waiting for anyone.
    stop = w.send("user", "StopInstance", "p-0")
    assert stop.outcome is not None and stop.outcome.events == ("Leaving",)
    done = w.settle()
    assert w.instance("p-0").power == "stopped"


def test_old_commands_read_as_they_meant() -> None:
    v1 = decode_command(b'{"type":"RegisterHost","v":1,"cmd_id":"a","id":"h9","vcpus":4,'
                        b'"memory_mib":4096}')
    assert isinstance(v1, RegisterHost) and v1.role == "hypervisor"
    lb = decode_command(b'{"type":"CreateLoadBalancer","v":1,"cmd_id":"a","id":"l","vip":"'
                        + VIP.encode() + b'","pool":"p","services":[{"port":80,'
                        b'"target_port":8080}]}')
    assert isinstance(lb, CreateLoadBalancer) and lb.services[0].strategy == "round_robin"
    w = Lbs()
    w.node("lb1")
    assert reason(w.send("admin", "RegisterHost", "lb1", vcpus=4, memory_mib=4096)) == (
        "host lb1 is registered as lb: a role does not change (register the machine under"
        " another name)")


def test_the_consistent_strategy_is_the_default_and_health_is_per_service() -> None:
    w = Lbs()
    w.up("h0", "h1")
    w.network("n", vni=42)
    w.node("lb1", "lb2")
    w.pool("p", 1)
    w.balancer(services=[SERVICE, {"port": 53, "target_port": 5353, "protocol": "udp",
                                   "strategy": "source_hash"}])
    assert [s.strategy for s in w.lb().services] == ["maglev", "source_hash"]
    w.health("lb1", "p-0", True, port=53)
    backend = w.lb().backends["p-0"]
    assert healthy_ports(w.lb(), backend) == (53,)
    assert without_healthy_backend(w.lb()) == [80]


def test_a_node_that_does_not_apply_gets_its_job_again_then_the_balancer_alerts() -> None:
    w = Lbs()
    w.cloud()
    w.applied("lb1")  # lb2 never does
    gen = w.lb().generation
    for attempt in (1, 2):
        tick = w.send("system", "ReconcileLb", "l", generation=gen, max_attempts=2)
        assert tick.outcome is not None and tick.outcome.events == ("Reissued",)
        assert [(j.host, j.generation, j.attempt) for j in tick.jobs] == [("lb2", gen, attempt)]
    stalled = w.send("system", "ReconcileLb", "l", generation=gen, max_attempts=2)
    assert stalled.outcome is not None and stalled.outcome.events == ("Stalled",)
    assert w.lb().stalled == f"nodes lb2 did not apply generation {gen}" and not stalled.jobs
    quiet = w.send("system", "ReconcileLb", "l", generation=gen, max_attempts=2)
    assert quiet.outcome is not None and quiet.outcome.events == ()
    w.applied("lb2")  # late, but applied: the alert is over
    assert w.lb().stalled is None
    done = w.send("system", "ReconcileLb", "l", generation=gen, max_attempts=2)
    assert done.outcome is not None and done.outcome.events == ()


def test_without_a_drain_time_a_member_goes_once_both_nodes_applied() -> None:
    w = Lbs()
    w.up("h0", "h1")
    w.network("n", vni=42)
    w.node("lb1", "lb2")
    w.pool("p", 2)
    w.balancer(drain_ms=0)
    w.send("user", "StopInstance", "p-0")
    w.settle()
    w.applied("lb1")
    done = w.applied("lb2")
    only(done, "MemberDrained", "p-0")
    assert w.instance("p-0").power == "stopped" and w.lb().draining == {}
