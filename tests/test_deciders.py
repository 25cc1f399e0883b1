"""Business rules of the deciders, driven through ``fold_message`` as the workers drive them.

A ``World`` folds commands into one states dict, with increasing sequence numbers, and
relays follow-up commands (from source ``system``) as the outbox relay would.
"""

import re
from collections import deque
from typing import Any

import msgspec
import pytest

from events.subjects import partition_of, stored_command_subject
from orchestrator.deciders.instance import Instance
from orchestrator.deciders.network import Network
from orchestrator.deciders.pool import Pool
from orchestrator.deciders.scheduler import Scheduler
from orchestrator.fold import Folded, Key, fold_message
from schemas.codec import FLAVORS, CommandError, command_from_dict, decode_command, encode
from schemas.commands import COMMAND_TYPES, REGISTRY_ID, SCHEDULER_ID, Command, CreateInstance
from schemas.jobs import Job
from schemas.specs import InstanceSpec, InstanceTemplate, Nic

PARTITIONS = 8
T_SMALL: dict[str, Any] = {"vcpus": 2, "memory_mib": 1024, "image": "debian-12"}


def subject(source: str, kind: str, id_: str) -> str:
    return stored_command_subject(partition_of(kind, id_, PARTITIONS), source, kind, id_)


class World:
    """One partition-agnostic projection: every command folded in one states dict."""

    def __init__(self) -> None:
        self.states: dict[Key, Any] = {}
        self.history: list[tuple[str, bytes]] = []
        self.pending: deque[Command] = deque()
        self.n = 0

    def fold(self, subject_: str, data: bytes) -> Folded:
        self.history.append((subject_, data))
        seq = len(self.history)
        f = fold_message(self.states, subject_, data, seq, 1_000 * seq, PARTITIONS)
        self.pending.extend(f.commands)
        return f

    def send(self, source: str, type_: str, id_: str, /, **fields: Any) -> Folded:
        self.n += 1
        doc = {"type": type_, "cmd_id": f"k{self.n}", "id": id_, **fields}
        return self.fold(subject(source, COMMAND_TYPES[type_].kind, id_), encode(doc))

    def settle(self) -> list[Folded]:
        """Relay every follow-up, and theirs, in order."""
        done = []
        while self.pending:
            cmd = self.pending.popleft()
            done.append(self.fold(subject("system", cmd.kind, cmd.id), encode(cmd)))
        assert all(f.outcome is not None for f in done)
        return done

    def host(self, id_: str, vcpus: int = 8, memory_mib: int = 8192) -> None:
        assert accepted(self.send("admin", "RegisterHost", id_, vcpus=vcpus,
                                  memory_mib=memory_mib))
        self.settle()

    def instance(self, id_: str) -> Instance:
        return self.states[("instance", id_)]

    @property
    def scheduler(self) -> Scheduler:
        return self.states[("scheduler", SCHEDULER_ID)]


def accepted(f: Folded) -> bool:
    assert f.outcome is not None, f
    return f.outcome.accepted


def reason(f: Folded) -> str:
    assert f.outcome is not None and not f.outcome.accepted, f
    assert f.outcome.reason
    return f.outcome.reason


def types(f: Folded) -> list[str]:
    return [type(c).__name__ for c in f.commands]


def only(folded: list[Folded], type_: str, id_: str | None = None) -> Folded:
    found = [f for f in folded if f.outcome is not None and f.outcome.type == type_
             and (id_ is None or f.outcome.id == id_)]
    assert len(found) == 1, (type_, id_, [f.outcome for f in folded])
    return found[0]


# ---- instances: lifecycle, generations, jobs ----------------------------------------


def test_instance_lifecycle_bumps_generations_and_emits_jobs() -> None:
    w = World()
    w.host("h0")
    template = InstanceTemplate(vcpus=2, memory_mib=1024, image="debian-12")

    created = w.send("user", "CreateInstance", "i0", template=T_SMALL)
    assert accepted(created) and created.outcome is not None
    assert created.outcome.events == ("Created",) and created.jobs == []
    (place,) = created.commands
    assert encode(place) == encode(command_from_dict(dict(
        type="Place", cmd_id=f"fx-{created.seq}-0", id=SCHEDULER_ID, instance="i0", vcpus=2,
        memory_mib=1024)))
    assert created.outcome.commands == ("scheduler/default:Place",)
    inst = w.instance("i0")
    assert (inst.status, inst.host, inst.generation, inst.power) == (
        "pending", None, 0, "running")

    relayed = w.settle()
    assert [f.outcome.type for f in relayed if f.outcome] == ["Place", "Placed"]
    placed = relayed[1]
    spec = InstanceSpec(template=template, power="running", host="h0")
    assert placed.jobs == [Job(kind="instance", id="i0", host="h0", generation=1, spec=spec)]
    assert placed.outcome is not None and placed.outcome.jobs == ("job.h0.instance.i0",)
    assert (w.instance("i0").status, w.instance("i0").generation) == ("placed", 1)

    stopped = w.send("user", "StopInstance", "i0")
    assert accepted(stopped) and w.instance("i0").generation == 2
    (job,) = stopped.jobs
    assert job.generation == 2 and job.spec is not None and job.spec.power == "stopped"
    again = w.send("user", "StopInstance", "i0")
    assert accepted(again) and again.outcome is not None and again.outcome.events == ()
    assert again.jobs == [] and not again.changed and w.instance("i0").generation == 2

    started = w.send("user", "StartInstance", "i0")
    assert [j.generation for j in started.jobs] == [3]
    assert started.jobs[0].spec == spec

    deleted = w.send("user", "DeleteInstance", "i0")
    assert accepted(deleted) and types(deleted) == ["Release"]
    assert deleted.jobs == [Job(kind="instance", id="i0", host="h0", generation=4, spec=None)]
    assert (w.instance("i0").status, w.instance("i0").generation) == ("deleted", 4)
    assert w.scheduler.allocations["i0"].host == "h0"
    w.settle()
    assert "i0" not in w.scheduler.allocations
    slot = w.scheduler.hosts["h0"]
    assert (slot.used_vcpus, slot.used_memory_mib) == (0, 0)

    redelete = w.send("user", "DeleteInstance", "i0")
    assert accepted(redelete) and not redelete.changed and redelete.commands == []
    assert reason(w.send("user", "StartInstance", "i0")) == "instance i0 is deleted"
    assert "already exists (deleted)" in reason(
        w.send("user", "CreateInstance", "i0", template=T_SMALL))


def test_unknown_instance_is_rejected_without_state() -> None:
    w = World()
    for type_ in ("StartInstance", "StopInstance", "DeleteInstance"):
        assert reason(w.send("user", type_, "i9")) == "no instance i9"
    assert w.states == {}


def test_instance_deleted_before_placement_sends_no_job_and_frees_its_request() -> None:
    w = World()  # no host: the request waits
    w.send("user", "CreateInstance", "i0", template=T_SMALL)
    w.settle()
    assert [r.instance for r in w.scheduler.waiting] == ["i0"]
    deleted = w.send("user", "DeleteInstance", "i0")
    assert accepted(deleted) and deleted.jobs == [] and types(deleted) == ["Release"]
    w.settle()
    assert w.scheduler.waiting == []
    w.host("h0")  # capacity arrives: nothing to place any more
    assert w.scheduler.allocations == {}


def test_create_instance_attaches_its_ports_and_delete_detaches_them() -> None:
    w = World()
    w.send("user", "CreateNetwork", "n0", vni=10, cidr="10.0.0.0/24")
    w.send("user", "CreateNetwork", "n1", vni=11, cidr="10.1.0.0/24")
    w.settle()
    created = w.send("user", "CreateInstance", "i0", template={
        **T_SMALL, "nics": [{"network": "n0"}, {"network": "n1", "ip": "10.1.0.5"}]})
    # The addresses come first: the host is asked for once both networks have answered.
    assert types(created) == ["AttachPort", "AttachPort"]
    assert [c.id for c in created.commands] == ["n0", "n1"]
    assert [c.cmd_id for c in created.commands] == [f"fx-{created.seq}-{n}" for n in range(2)]
    w.settle()
    assert [(p.instance, p.ip) for p in w.states[("network", "n0")].ports] == [("i0", "10.0.0.2")]
    assert [(p.instance, p.ip) for p in w.states[("network", "n1")].ports] == [("i0", "10.1.0.5")]
    deleted = w.send("user", "DeleteInstance", "i0")
    assert types(deleted) == ["Release", "DetachPort", "DetachPort"]
    w.settle()
    assert w.states[("network", "n0")].ports == []
    assert w.states[("network", "n1")].ports == []


# ---- placement ----------------------------------------------------------------------


def capacity(w: World, host: str, vcpus: int, memory_mib: int, condition: str = "up") -> None:
    assert accepted(w.send("system", "HostCapacity", SCHEDULER_ID, host=host, vcpus=vcpus,
                           memory_mib=memory_mib, condition=condition))


def place(w: World, instance: str, vcpus: int = 1, memory_mib: int = 1024) -> Folded:
    f = w.send("system", "Place", SCHEDULER_ID, instance=instance, vcpus=vcpus,
               memory_mib=memory_mib)
    assert accepted(f)
    return f


def placed_on(f: Folded) -> str | None:
    hosts = [c.host for c in f.commands if type(c).__name__ == "Placed"]  # type: ignore[attr-defined]
    return hosts[0] if hosts else None


@pytest.mark.parametrize("order", [("h0", "h1", "h2"), ("h2", "h1", "h0"), ("h1", "h2", "h0")])
def test_placement_prefers_free_memory_then_vcpus_then_name(order: tuple[str, ...]) -> None:
    w = World()
    sizes = {"h0": (8, 4096), "h1": (4, 8192), "h2": (8, 8192)}
    for host in order:  # the order hosts appear in must not matter
        capacity(w, host, *sizes[host])
    # h1 and h2 tie on memory, h2 has more vCPUs; then h1 has more free memory; then they
    # tie on memory again and h2 has more vCPUs; then h1 (7168 MiB free vs 6144).
    got = [placed_on(place(w, f"i{n}")) for n in range(4)]
    assert got == ["h2", "h1", "h2", "h1"]
    assert {i: a.host for i, a in w.scheduler.allocations.items()} == {
        "i0": "h2", "i1": "h1", "i2": "h2", "i3": "h1"}


def test_placement_ties_are_broken_by_name() -> None:
    w = World()
    for host in ("h2", "h0", "h1"):
        capacity(w, host, 4, 4096)
    assert placed_on(place(w, "i0", 4, 4096)) == "h0"
    assert placed_on(place(w, "i1", 4, 4096)) == "h1"


def test_placement_skips_hosts_that_are_not_up_or_too_small() -> None:
    w = World()
    capacity(w, "h0", 64, 65536, condition="draining")
    capacity(w, "h1", 64, 65536, condition="down")
    capacity(w, "h2", 1, 512)
    capacity(w, "h3", 2, 2048)
    assert placed_on(place(w, "i0", 2, 1024)) == "h3"  # h2 is up but too small


def test_no_capacity_answers_placement_failed_and_keeps_the_request() -> None:
    w = World()
    capacity(w, "h0", 4, 4096)
    f = place(w, "i0", vcpus=16, memory_mib=1024)
    assert f.outcome is not None and f.outcome.events == ("Queued",)
    assert types(f) == ["PlacementFailed"]
    (failed,) = f.commands
    assert failed.id == "i0" and "16 vCPUs" in failed.reason  # type: ignore[attr-defined]
    assert "i0" not in w.scheduler.allocations
    assert (w.scheduler.hosts["h0"].used_vcpus, w.scheduler.hosts["h0"].used_memory_mib) == (0, 0)


def test_unplaceable_instance_is_placed_when_capacity_arrives() -> None:
    w = World()
    w.host("h0", vcpus=2, memory_mib=2048)
    w.send("user", "CreateInstance", "big", template={**T_SMALL, "vcpus": 8})
    relayed = w.settle()
    assert [f.outcome.type for f in relayed if f.outcome] == ["Place", "PlacementFailed"]
    inst = w.instance("big")
    assert inst.status == "unplaceable" and inst.host is None
    assert inst.error is not None and "8 vCPUs" in inst.error
    assert all(f.jobs == [] for f in relayed)

    w.send("admin", "RegisterHost", "h1", vcpus=16, memory_mib=16384)
    relayed = w.settle()
    assert [f.outcome.type for f in relayed if f.outcome] == ["HostCapacity", "Placed"]
    assert (w.instance("big").status, w.instance("big").host) == ("placed", "h1")
    assert [j.host for j in relayed[1].jobs] == ["h1"]


def test_place_asked_twice_answers_the_same_host_once_allocated() -> None:
    w = World()
    capacity(w, "h0", 4, 4096)
    capacity(w, "h1", 8, 8192)
    first, second = place(w, "i0"), place(w, "i0")
    assert placed_on(first) == placed_on(second) == "h1"
    assert second.outcome is not None and second.outcome.events == ()
    assert w.scheduler.hosts["h1"].used_memory_mib == 1024


def test_placement_is_deterministic_across_replay() -> None:
    w = World()
    for host, size in (("h0", 4), ("h1", 4), ("h2", 8)):
        w.host(host, vcpus=size, memory_mib=1024 * size)
    for n in range(6):
        w.send("user", "CreateInstance", f"i{n}", template=T_SMALL)
    w.settle()
    hosts = {f"i{n}": w.instance(f"i{n}").host for n in range(6)}
    again: dict[Key, Any] = {}
    for seq, (s, d) in enumerate(w.history, 1):
        fold_message(again, s, d, seq, 1_000 * seq, PARTITIONS)
    assert {f"i{n}": again[("instance", f"i{n}")].host for n in range(6)} == hosts
    assert None not in hosts.values()


def test_a_host_shrunk_below_its_allocations_keeps_them_and_takes_no_more() -> None:
    """Re-registering smaller does not evict running guests (as in Nova): the host is
    overcommitted until instances leave it, and placement skips it meanwhile."""
    w = World()
    w.host("h0", vcpus=4, memory_mib=4096)
    w.send("user", "CreateInstance", "i0", template={**T_SMALL, "vcpus": 4})
    w.settle()
    assert w.instance("i0").host == "h0"
    w.send("admin", "RegisterHost", "h0", vcpus=2, memory_mib=4096)
    w.settle()
    slot = w.scheduler.hosts["h0"]
    assert (slot.used_vcpus, slot.vcpus) == (4, 2)
    w.send("user", "CreateInstance", "i1", template={**T_SMALL, "vcpus": 1})
    w.settle()
    assert w.instance("i1").status == "unplaceable"


# ---- networks -----------------------------------------------------------------------


def test_delete_network_with_members_is_rejected_naming_them() -> None:
    w = World()
    w.send("user", "CreateNetwork", "n0", vni=5, cidr="10.0.0.0/24")
    for n in range(2):
        w.send("user", "CreateInstance", f"i{n}", template={**T_SMALL, "nics": [
            {"network": "n0"}]})
    w.settle()
    refused = w.send("user", "DeleteNetwork", "n0")
    assert reason(refused) == "network n0 has 2 members: i0, i1"
    assert w.states[("network", "n0")].status == "active"

    w.send("user", "DeleteInstance", "i0")
    w.send("user", "DeleteInstance", "i1")
    w.settle()
    assert accepted(w.send("user", "DeleteNetwork", "n0"))
    assert w.states[("network", "n0")].status == "deleted"
    retired = w.send("system", "JoinNetwork", "n0", instance="i2")
    assert reason(retired) == "JoinNetwork is retired: ports attach with AttachPort"


def test_delete_network_reason_truncates_a_long_member_list() -> None:
    w = World()
    w.send("user", "CreateNetwork", "n0", vni=5, cidr="10.0.0.0/24")
    for n in range(7):
        w.send("user", "CreateInstance", f"i{n}", template={**T_SMALL, "nics": [
            {"network": "n0"}]})
    w.settle()
    assert reason(w.send("user", "DeleteNetwork", "n0")) == (
        "network n0 has 7 members: i0, i1, i2, i3, i4, ...")


def test_network_attach_is_idempotent_and_create_again_is_a_no_op() -> None:
    w = World()
    w.send("user", "CreateNetwork", "n0", vni=5, cidr="10.0.0.0/24")
    w.settle()
    for _ in range(2):
        w.send("system", "AttachPort", "n0", instance="i2", index=0, mac="02:00:00:00:00:02")
    net: Network = w.states[("network", "n0")]
    assert [(p.instance, p.ip) for p in net.ports] == [("i2", "10.0.0.2")]
    left = w.send("system", "DetachPort", "n0", instance="i9")
    assert accepted(left) and not left.changed
    same = w.send("user", "CreateNetwork", "n0", vni=5, cidr="10.0.0.0/24")
    assert accepted(same) and not same.changed
    assert "already exists" in reason(
        w.send("user", "CreateNetwork", "n0", vni=6, cidr="10.0.0.0/24"))


# ---- pools and load balancers -------------------------------------------------------


def test_pool_scaling_creates_and_deletes_members_with_stable_ids() -> None:
    w = World()
    w.host("h0", vcpus=64, memory_mib=65536)
    created = w.send("user", "CreatePool", "p0", template=T_SMALL, size=2)
    assert created.outcome is not None and created.outcome.events == ("Created", "Scaled")
    assert types(created) == ["CreateInstance", "CreateInstance"]
    members = created.commands
    assert [c.id for c in members] == ["p0-0", "p0-1"]
    for cmd in members:
        assert isinstance(cmd, CreateInstance)
        assert cmd.pool == "p0" and cmd.template == InstanceTemplate(**T_SMALL)
    w.settle()
    assert {w.instance(m).pool for m in ("p0-0", "p0-1")} == {"p0"}
    assert {w.instance(m).status for m in ("p0-0", "p0-1")} == {"placed"}

    up = w.send("user", "ScalePool", "p0", size=4)
    assert types(up) == ["CreateInstance", "CreateInstance"]
    assert [c.id for c in up.commands] == ["p0-2", "p0-3"]
    w.settle()

    down = w.send("user", "ScalePool", "p0", size=1)
    assert types(down) == ["DeleteInstance"] * 3
    assert [c.id for c in down.commands[:3]] == ["p0-3", "p0-2", "p0-1"]  # newest first
    w.settle()
    assert [w.instance(f"p0-{n}").status for n in range(4)] == [
        "placed", "deleted", "deleted", "deleted"]

    regrow = w.send("user", "ScalePool", "p0", size=2)
    assert [c.id for c in regrow.commands] == ["p0-4"]  # p0-1 is never reused
    same = w.send("user", "ScalePool", "p0", size=2)
    assert accepted(same) and not same.changed and same.commands == []
    w.settle()
    pool: Pool = w.states[("pool", "p0")]
    assert (pool.members, pool.size, pool.next_index) == (["p0-0", "p0-4"], 2, 5)

    gone = w.send("user", "DeletePool", "p0")
    assert types(gone) == ["DeleteInstance", "DeleteInstance"]
    assert [c.id for c in gone.commands] == ["p0-0", "p0-4"]
    w.settle()
    assert reason(w.send("user", "ScalePool", "p0", size=3)) == "no pool p0 (deleted)"
    assert w.scheduler.allocations == {}


def test_pool_members_without_balancers_tell_nobody() -> None:
    w = World()
    f = w.send("user", "CreatePool", "p0", template=T_SMALL, size=1)
    assert types(f) == ["CreateInstance"]
    assert types(w.send("user", "ScalePool", "p0", size=0)) == ["DeleteInstance"]


def test_pool_whose_member_ids_would_be_invalid_is_rejected() -> None:
    w = World()
    long_id = "p" * 62  # valid itself, but "<id>-0" is 64 characters
    f = w.send("user", "CreatePool", long_id, template=T_SMALL, size=1)
    assert "too long" in reason(f) and w.states == {}
    ok = w.send("user", "CreatePool", long_id, template=T_SMALL, size=0)
    assert accepted(ok)


# ---- source rules and agents' reports -----------------------------------------------

EXAMPLES: dict[str, dict[str, Any]] = {
    "RegisterHost": {"vcpus": 4, "memory_mib": 4096},
    "SetHostCondition": {"condition": "draining"},
    "HostDown": {}, "HostUp": {},
    "CreateInstance": {"template": T_SMALL},
    "StartInstance": {}, "StopInstance": {}, "DeleteInstance": {},
    "SetRules": {"rules": [{"protocol": "tcp", "port": 22, "source": "10.0.0.9/32"}]},
    "Placed": {"host": "h0"}, "PlacementFailed": {"reason": "full"},
    "Applied": {"generation": 1, "observed": "running"},
    "Failed": {"generation": 1, "error": "boom"},
    "Reconcile": {"generation": 1, "max_attempts": 3},
    "CreateNetwork": {"vni": 1, "cidr": "10.0.0.0/24"}, "DeleteNetwork": {},
    "JoinNetwork": {"instance": "i0"}, "LeaveNetwork": {"instance": "i0"},
    "AttachPort": {"instance": "i0", "index": 0, "mac": "02:00:00:00:00:01"},
    "BindPort": {"instance": "i0", "host": "h0"}, "DetachPort": {"instance": "i0"},
    "VniGranted": {}, "VniRefused": {"reason": "taken"},
    "HostVtep": {"host": "h0", "vtep": "192.0.2.1"},
    "NetworkApplied": {"generation": 1, "observed": "present"},
    "NetworkFailed": {"generation": 1, "error": "boom"},
    "ReconcileNetwork": {"generation": 1, "max_attempts": 3},
    "NicAddressed": {"index": 0, "network": "n0", "vni": 1, "mac": "02:00:00:00:00:01",
                     "ip": "10.0.0.2", "prefix": 24, "mtu": 1500},
    "NicRefused": {"index": 0, "network": "n0", "reason": "taken"},
    "ReserveVni": {"vni": 1, "network": "n0"}, "ReleaseVni": {"vni": 1, "network": "n0"},
    "SpanNetwork": {"network": "n0"}, "UnspanNetwork": {"network": "n0"},
    "CreatePool": {"template": T_SMALL, "size": 1}, "ScalePool": {"size": 2},
    "DeletePool": {}, "AttachBalancer": {"lb": "l0"}, "DetachBalancer": {"lb": "l0"},
    "CreateLoadBalancer": {"vip": "192.0.2.1", "pool": "p0",
                           "services": [{"port": 80, "target_port": 80}]},
    "DeleteLoadBalancer": {}, "PoolMembers": {"members": ["i0"]},
    "PoolBackends": {"network": "n0", "backends": [["i0", "10.0.0.2"]]},
    "PoolRefused": {"reason": "no pool p0"},
    "BalancerPlaced": {"nodes": ["h0", "h1"]},
    "LbPortAddressed": {"index": 0, "network": "n0", "vni": 1, "mac": "02:00:00:00:00:01",
                        "ip": "10.0.0.2", "prefix": 24, "mtu": 1500},
    "LbPortRefused": {"index": 0, "network": "n0", "reason": "taken"},
    "LbApplied": {"generation": 1, "observed": "serving"},
    "LbFailed": {"generation": 1, "error": "boom"},
    "ReconcileLb": {"generation": 1, "max_attempts": 3}, "DrainTick": {},
    "BackendHealth": {"instance": "i0", "port": 80, "healthy": True, "generation": 1},
    "MemberState": {"instance": "i0", "serving": True, "ip": "10.0.0.2"},
    "BalancerDrained": {"lb": "l0", "instance": "i0"},
    "MemberDrained": {},
    "LbNode": {"host": "h0", "condition": "up"},
    "PlaceBalancer": {"lb": "l0"}, "ReleaseBalancer": {"lb": "l0"},
    "HostCapacity": {"host": "h0", "vcpus": 4, "memory_mib": 4096, "condition": "up"},
    "Place": {"instance": "i0", "vcpus": 1, "memory_mib": 64}, "Release": {"instance": "i0"},
    "MigrateInstance": {"to": "h1"}, "AbortMigration": {"reason": "operator"},
    "MigrationReserved": {"ticket": 3, "host": "h1", "address": "192.0.2.11"},
    "MigrationRefused": {"ticket": 3, "reason": "host h1 is down"},
    "MigrationQueued": {"ticket": 3, "reason": "queued: the limit"},
    "MigrationProgress": {"generation": 1, "processed_mib": 10, "remaining_mib": 60},
    "ReserveMove": {"instance": "i0", "ticket": 3, "source": "h0", "vcpus": 1,
                    "memory_mib": 64},
    "EndMove": {"instance": "i0", "ticket": 3, "moved": True},
    "MoveSwitched": {"instance": "i0", "ticket": 3}, "SetMigrationLimit": {"limit": 2},
    "EvacuateHost": {}, "Evacuate": {"host": "h0"},
    "Rehome": {"host": "h1", "reason": "its host was evacuated"},
}
SOURCE_OF_CLASS = {"user": "user", "admin": "admin", "system": "system", "host": "h0"}


def example_id(type_: str) -> str:
    kind = COMMAND_TYPES[type_].kind
    return {"scheduler": SCHEDULER_ID, "registry": REGISTRY_ID}.get(kind, f"{kind[0]}0")


def test_every_command_type_has_an_example() -> None:
    assert set(EXAMPLES) == set(COMMAND_TYPES)


@pytest.mark.parametrize("type_", sorted(COMMAND_TYPES))
def test_sources_outside_a_commands_classes_are_refused(type_: str) -> None:
    cls = COMMAND_TYPES[type_]
    for source_class, source in SOURCE_OF_CLASS.items():
        w = World()
        f = w.send(source, type_, example_id(type_), **EXAMPLES[type_])
        assert f.outcome is not None and f.dead_letter is None
        refusal = f"{type_} may not come from source {source!r}"
        if source_class in cls.sources:
            assert f.outcome.reason != refusal
        else:
            assert reason(f) == refusal and w.states == {}


def placed_instance(w: World, host: str = "h0") -> None:
    w.host(host)
    w.send("user", "CreateInstance", "i0", template=T_SMALL)
    w.settle()
    assert (w.instance("i0").host, w.instance("i0").generation) == (host, 1)


def test_user_cannot_report_applied() -> None:
    w = World()
    placed_instance(w)
    before = encode(w.instance("i0"))
    f = w.send("user", "Applied", "i0", generation=1, observed="running")
    assert reason(f) == "Applied may not come from source 'user'"
    assert encode(w.instance("i0")) == before


def test_report_from_another_host_is_rejected() -> None:
    w = World()
    placed_instance(w)
    w.host("h1")
    f = w.send("h1", "Applied", "i0", generation=1, observed="running")
    assert reason(f) == "report from host h1, but i0 is on h0"
    assert w.instance("i0").observed_generation == 0
    failed = w.send("h1", "Failed", "i0", generation=1, error="boom")
    assert "report from host h1" in reason(failed) and w.instance("i0").error is None


def test_reports_record_progress_and_stale_ones_are_accepted_as_no_ops() -> None:
    w = World()
    placed_instance(w)
    ok = w.send("h0", "Applied", "i0", generation=1, observed="running")
    assert ok.outcome is not None and ok.outcome.events == ("Observed",)
    assert (w.instance("i0").observed_generation, w.instance("i0").observed) == (1, "running")

    w.send("user", "StopInstance", "i0")
    w.send("user", "StartInstance", "i0")
    assert accepted(w.send("h0", "Applied", "i0", generation=3, observed="running"))
    before = encode(w.instance("i0"))
    stale = w.send("h0", "Applied", "i0", generation=2, observed="stopped")
    assert accepted(stale) and stale.outcome is not None and stale.outcome.events == ()
    assert not stale.changed and stale.jobs == [] and encode(w.instance("i0")) == before
    stale_failure = w.send("h0", "Failed", "i0", generation=1, error="late")
    assert accepted(stale_failure) and not stale_failure.changed

    ahead = w.send("h0", "Applied", "i0", generation=9, observed="running")
    assert reason(ahead) == "report for generation 9 > 3"


def test_failed_report_records_the_error_until_applied() -> None:
    w = World()
    placed_instance(w)
    failed = w.send("h0", "Failed", "i0", generation=1, error="qemu exited")
    assert accepted(failed) and w.instance("i0").error == "qemu exited"
    w.send("h0", "Applied", "i0", generation=1, observed="running")
    assert w.instance("i0").error is None


def test_reconcile_reissues_then_degrades() -> None:
    w = World()
    placed_instance(w)
    first = w.send("system", "Reconcile", "i0", generation=1, max_attempts=2)
    assert first.outcome is not None and first.outcome.events == ("Reissued",)
    assert [(j.generation, j.attempt) for j in first.jobs] == [(1, 1)]
    second = w.send("system", "Reconcile", "i0", generation=1, max_attempts=2)
    assert [(j.generation, j.attempt) for j in second.jobs] == [(1, 2)]
    third = w.send("system", "Reconcile", "i0", generation=1, max_attempts=2)
    assert third.outcome is not None and third.outcome.events == ("Degraded",)
    assert third.jobs == [] and w.instance("i0").status == "degraded"
    old = w.send("system", "Reconcile", "i0", generation=0, max_attempts=2)
    assert accepted(old) and not old.changed
    assert reason(w.send("user", "Reconcile", "i0", generation=1, max_attempts=2)) == (
        "Reconcile may not come from source 'user'")


def test_applied_current_generation_clears_degraded() -> None:
    w = World()
    placed_instance(w)
    for _ in range(2):
        w.send("system", "Reconcile", "i0", generation=1, max_attempts=1)
    assert w.instance("i0").status == "degraded"
    assert accepted(w.send("h0", "Applied", "i0", generation=1, observed="running"))
    inst = w.instance("i0")
    assert (inst.observed_generation, inst.error) == (1, None)
    assert inst.status == "placed"


# ---- the v1 CreateInstance ----------------------------------------------------------


def v1(flavor: Any = "medium", **extra: Any) -> dict[str, Any]:
    return {"type": "CreateInstance", "v": 1, "cmd_id": "old-1", "id": "i0",
            "flavor": flavor, "image": "debian-11", **extra}


@pytest.mark.parametrize("flavor", sorted(FLAVORS))
def test_v1_create_instance_is_upcast(flavor: str) -> None:
    cmd = decode_command(encode(v1(flavor, networks=["n0", "n1"])))
    assert isinstance(cmd, CreateInstance) and cmd.v == 2
    vcpus, memory = FLAVORS[flavor]
    assert cmd.template == InstanceTemplate(vcpus=vcpus, memory_mib=memory, image="debian-11",
                                            nics=(Nic(network="n0"), Nic(network="n1")))
    assert (cmd.power, cmd.pool, cmd.cmd_id, cmd.id) == ("running", None, "old-1", "i0")


def test_v1_create_instance_folds_like_v2() -> None:
    w = World()
    f = w.fold(subject("user", "instance", "i0"), encode(v1("large", networks=["n0"])))
    assert accepted(f) and types(f) == ["AttachPort"]
    w.send("user", "CreateNetwork", "n0", vni=5, cidr="10.0.0.0/24")
    place = only(w.settle(), "Place")
    assert (place.outcome.id, w.instance("i0").template.vcpus) == (SCHEDULER_ID, 4)  # type: ignore[union-attr]
    assert w.instance("i0").template.image == "debian-11"


@pytest.mark.parametrize(("doc", "where"), [
    (v1("huge"), "`$.flavor`"),
    (v1(None), "`$.flavor`"),
    ({**v1(), "v": 3}, "`$.v`"),
    ({**v1(), "v": -1}, "`$.v`"),
    (v1(networks=["N0"]), "`$.networks[0]`"),
])
def test_bad_v1_create_instance_is_refused_with_a_reason(doc: dict[str, Any],
                                                        where: str) -> None:
    with pytest.raises(CommandError, match=r"^CreateInstance.*" + re.escape(where)):
        decode_command(encode(doc))
    f = World().fold(subject("user", "instance", "i0"), encode(doc))
    assert f.dead_letter is not None and where in f.dead_letter and where in reason(f)


@pytest.mark.parametrize("doc", [v1(["medium"]), v1({"a": 1}), v1(networks=5),
                                 v1(networks=None)])
def test_ill_typed_v1_create_instance_is_dead_lettered(doc: dict[str, Any]) -> None:
    f = World().fold(subject("user", "instance", "i0"), encode(doc))
    assert f.dead_letter is not None and f.outcome is not None and not f.outcome.accepted


@pytest.mark.parametrize("networks", ["n0", {"n0": True}])
def test_v1_networks_must_be_a_list(networks: Any) -> None:
    with pytest.raises(CommandError, match="networks"):
        decode_command(encode(v1(networks=networks)))


# ---- bad input: reasons name the field, ids are checked -----------------------------


@pytest.mark.parametrize(("doc", "where"), [
    ({"type": "CreateInstance", "template": {**T_SMALL, "vcpus": 0}}, "`$.template.vcpus`"),
    ({"type": "CreateInstance", "template": {**T_SMALL, "vcpus": 257}}, "`$.template.vcpus`"),
    ({"type": "CreateInstance", "template": {**T_SMALL, "memory_mib": 1}},
     "`$.template.memory_mib`"),
    ({"type": "CreateInstance", "template": {**T_SMALL, "image": " x"}}, "`$.template.image`"),
    ({"type": "CreateInstance", "template": {**T_SMALL, "nics": [{"network": "N0"}]}},
     "`$.template.nics[0].network`"),
    ({"type": "CreateInstance", "template": {**T_SMALL, "rules": [
        {"protocol": "icmp", "port": 1}]}}, "`$.template.rules[0].protocol`"),
    ({"type": "CreateInstance", "template": {**T_SMALL, "gpu": 1}}, "`$.template`"),
    ({"type": "CreateInstance", "template": T_SMALL, "power": "paused"}, "`$.power`"),
    ({"type": "CreateInstance"}, "`template`"),
    ({"type": "CreateNetwork", "vni": 0, "cidr": "10.0.0.0/24"}, "`$.vni`"),
    ({"type": "CreateNetwork", "vni": 1, "cidr": "10.0.0.0"}, "`$.cidr`"),
    ({"type": "CreateLoadBalancer", "vip": "192.0.2.1", "pool": "p0", "services": []},
     "`$.services`"),
    ({"type": "CreateLoadBalancer", "vip": "192.0.2.1", "pool": "p0", "services": [
        {"port": 0, "target_port": 80}]}, "`$.services[0].port`"),
    ({"type": "ScalePool", "size": 1001}, "`$.size`"),
    ({"type": "Applied", "generation": -1, "observed": "running"}, "`$.generation`"),
    ({"type": "JoinNetwork", "instance": "i.0"}, "`$.instance`"),
    ({"type": "Placed", "host": "h 0"}, "`$.host`"),
    ({"type": "StartInstance", "id": "i.0"}, "`$.id`"),
    ({"type": "StartInstance", "id": "i 0"}, "`$.id`"),
    ({"type": "StartInstance", "id": "I0"}, "`$.id`"),
    ({"type": "StartInstance", "id": ""}, "`$.id`"),
    ({"type": "StartInstance", "id": "i" * 64}, "`$.id`"),
    ({"type": "StartInstance", "cmd_id": "a b"}, "`$.cmd_id`"),
    ({"type": "StartInstance", "v": 2}, "`$.v`"),
    ({"type": "Reboot"}, "`$.type`"),
])
def test_bad_input_reason_names_the_field(doc: dict[str, Any], where: str) -> None:
    doc = {"cmd_id": "k1", "id": example_id(doc["type"]) if doc["type"] in COMMAND_TYPES
           else "i0", **doc}
    with pytest.raises(CommandError) as caught:
        command_from_dict(doc)
    assert where in str(caught.value)
    kind = COMMAND_TYPES[doc["type"]].kind if doc["type"] in COMMAND_TYPES else "instance"
    f = World().fold(subject("admin", kind, "x0"), encode(doc))
    assert f.key == (kind, "x0") and f.dead_letter is not None
    # The timeline names the type the message claimed, even though it did not decode.
    assert where in reason(f) and f.outcome is not None and f.outcome.type == doc["type"]


@pytest.mark.parametrize("bad", ["i 0", "I0", "-i0", "i*", ">", "é"])
def test_subject_with_an_invalid_id_or_source_is_dead_lettered(bad: str) -> None:
    for subject_ in (subject("user", "instance", bad), subject(bad, "instance", "i0")):
        f = World().fold(subject_, encode({"type": "StartInstance", "cmd_id": "k",
                                           "id": "i0"}))
        assert f.key is None and f.outcome is None
        assert f.dead_letter is not None and repr(bad) in f.dead_letter


def test_subject_with_a_dotted_id_is_dead_lettered() -> None:
    f = World().fold(subject("user", "instance", "i.0"), encode(
        {"type": "StartInstance", "cmd_id": "k", "id": "i.0"}))
    assert f.key is None and f.outcome is None
    assert f.dead_letter is not None and "is not cmd.<partition>" in f.dead_letter


def test_wrong_partition_and_unknown_kind_are_dead_lettered() -> None:
    right = partition_of("instance", "i0", PARTITIONS)
    data = encode({"type": "StartInstance", "cmd_id": "k", "id": "i0"})
    wrong = World().fold(stored_command_subject((right + 1) % PARTITIONS, "user", "instance",
                                                "i0"), data)
    assert wrong.key is None and wrong.dead_letter == (
        f"instance/i0 belongs to partition {right}, not {(right + 1) % PARTITIONS}")
    vm = World().fold(stored_command_subject(0, "user", "vm", "i0"), data)
    assert vm.key is None and vm.dead_letter is not None and "'vm'" in vm.dead_letter


def test_misaddressed_body_is_dead_lettered_on_the_subjects_timeline() -> None:
    w = World()
    for body in ({"type": "StartInstance", "cmd_id": "k", "id": "i1"},
                 {"type": "DeleteNetwork", "cmd_id": "k", "id": "i0"}):
        f = w.fold(subject("user", "instance", "i0"), encode(body))
        assert f.key == ("instance", "i0") and f.dead_letter is not None
        assert f.dead_letter.startswith("misaddressed:")
        assert reason(f) == f.dead_letter and f.outcome is not None
        assert (f.outcome.type, f.outcome.cmd_id) == (body["type"], "k")
    assert w.states == {}


def test_undecodable_payload_is_dead_lettered_on_the_subjects_timeline() -> None:
    for data in (b"", b"{", b"[]", b'{"type": 5}', b"\xff", b"x" * 70_000):
        f = World().fold(subject("user", "instance", "i0"), data)
        assert f.key == ("instance", "i0") and f.dead_letter
        assert f.outcome is not None and f.outcome.type == "?" and not f.outcome.accepted
        assert f.outcome.reason == f.dead_letter and f.outcome.cmd_id == ""


def test_states_survive_a_json_round_trip() -> None:
    """What the worker stores and loads back is the state it folded."""
    from orchestrator.deciders import STATE_TYPES

    w = World()
    w.host("h0")
    w.send("user", "CreateNetwork", "n0", vni=5, cidr="10.0.0.0/24")
    w.send("user", "CreatePool", "p0", template={**T_SMALL, "nics": [{"network": "n0"}]},
           size=2)
    w.send("user", "CreateLoadBalancer", "l0", vip="192.0.2.1", pool="p0",
           services=[{"port": 80, "target_port": 8080}])
    w.settle()
    assert {k for k, _ in w.states} == {"host", "network", "pool", "lb", "instance",
                                        "scheduler", "registry"}
    for (kind, _), state in w.states.items():
        again = msgspec.json.decode(encode(state), type=STATE_TYPES[kind])
        assert again == state
