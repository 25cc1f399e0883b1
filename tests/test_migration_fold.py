"""Live migration, drain and cold moves in the fold: the saga's phases, its rollbacks, the
scheduler's reservations and limits, and the jobs each step sends.

Driven through ``fold_message`` with the deciders' ``World`` (follow-ups relayed in order);
the agents' reports are sent by hand, as the source and destination agents send them.
"""

from typing import Any

import pytest

from orchestrator.deciders.instance import Instance
from orchestrator.fold import Folded
from schemas.ids import mac_address
from schemas.specs import InstanceSpec, NetworkSpec, Outgoing, RemotePort
from tests.test_deciders import accepted, only, reason
from tests.test_network_fold import VTEPS, Cloud

VTEPS = {**VTEPS, "h3": "192.0.2.13"}
CIDR = "10.9.0.0/24"


class Moves(Cloud):
    def __init__(self) -> None:
        super().__init__()
        self.results: list[Folded] = []
        self.up("h0", "h1", "h2")
        self.network("n", vni=7, cidr=CIDR)
        self.vm("a", {"network": "n"})  # h0: all equal, first by name
        self.vm("c", {"network": "n"})  # h1: most free
        assert (self.instance("a").host, self.instance("c").host) == ("h0", "h1")

    def fold(self, subject_: str, data: bytes) -> Folded:
        folded = super().fold(subject_, data)
        self.results.append(folded)
        return folded

    def timeline(self, kind: str, id_: str) -> list[str]:
        return [f.outcome.type for f in self.results
                if f.outcome and (f.outcome.kind, f.outcome.id) == (kind, id_)]

    def up(self, *hosts: str) -> None:
        for h in hosts:
            self.host(h, vcpus=64, memory_mib=1 << 16)
            self.send("system", "HostUp", h, boot_id="b1", underlay=VTEPS[h])
            self.settle()

    def report(self, host: str, id_: str, observed: str = "running",
               generation: int | None = None) -> list[Folded]:
        gen = self.instance(id_).generation if generation is None else generation
        first = self.send(host, "Applied", id_, generation=gen, observed=observed)
        return [first, *self.settle()]

    def fail(self, host: str, id_: str, error: str) -> list[Folded]:
        first = self.send(host, "Failed", id_, generation=self.instance(id_).generation,
                          error=error)
        return [first, *self.settle()]

    def migrate(self, id_: str, **fields: Any) -> list[Folded]:
        first = self.send("admin", "MigrateInstance", id_, **fields)
        return [first, *self.settle()]

    def live(self, id_: str, to: str) -> None:
        """A whole migration, every agent answering."""
        self.migrate(id_, to=to)
        source = self.instance(id_).host
        assert source is not None
        self.report(to, id_, "incoming")
        self.report(to, id_, "running")
        self.report(source, id_, "absent")
        assert self.instance(id_).migration is None and self.instance(id_).host == to

    def phase(self, id_: str) -> str | None:
        m = self.instance(id_).migration
        return m.phase if m else None

    def used(self) -> dict[str, tuple[int, int]]:
        return {h: (s.used_vcpus, s.used_memory_mib) for h, s in self.scheduler.hosts.items()}


def jobs(folded: list[Folded], kind: str = "instance") -> dict[str, Any]:
    """The newest job per host of ``kind`` among ``folded``: host -> spec (None: remove)."""
    return {j.host: j.spec for f in folded for j in f.jobs if j.kind == kind}


def events(folded: list[Folded]) -> list[str]:
    return [e for f in folded if f.outcome for e in f.outcome.events]


def port(id_: str, ip: str, host: str) -> RemotePort:
    return RemotePort(mac=mac_address(id_, 0), ip=ip, vtep=VTEPS[host])


def test_a_live_migration_prepares_the_destination_migrates_switches_and_cleans_the_source(
) -> None:
    w = Moves()
    used = w.used()
    asked = w.migrate("a", to="h2")
    assert events(asked)[:3] == ["MigrationAsked", "MoveStarted", "MigrationPreparing"]
    a: Instance = w.instance("a")
    assert a.host == "h0" and a.migration is not None and a.migration.dest == "h2"
    # The destination's capacity is held besides the source's.
    assert w.used()["h2"] == (used["h2"][0] + 2, used["h2"][1] + 1024)
    assert w.used()["h0"] == used["h0"]
    # 1. Prepare: the destination expects the guest; its segment exists (it spans the
    # network now) while every host still reaches the port at the source.
    sent = jobs(asked)
    assert sent["h2"].incoming and sent["h2"].host == "h2" and sent["h2"].outgoing is None
    assert not sent["h0"].incoming and sent["h0"].outgoing is None
    segments = jobs(asked, "network")
    assert segments["h2"] == NetworkSpec(vni=7, cidr=CIDR, mtu=1500,
                                         vteps=(VTEPS["h0"], VTEPS["h1"]),
                                         ports=tuple(sorted([port("a", "10.9.0.2", "h0"),
                                                             port("c", "10.9.0.3", "h1")],
                                                            key=lambda p: p.mac)))
    assert segments["h1"].ports == (port("a", "10.9.0.2", "h0"),)
    # 2. Migrate, once the destination is ready: the source's job says where, and by when.
    ready = w.report("h2", "a", "incoming")
    assert events(ready) == ["DestObserved", "MigrationStarted"]
    out = jobs(ready)
    assert out["h0"].outgoing == Outgoing(dest="h2", address=VTEPS["h2"],
                                          deadline_at=ready[0].outcome.at + 120_000)  # type: ignore[union-attr]
    assert out["h2"].incoming
    # 3. Switch, on the destination's word that the guest runs there.
    arrived = w.report("h2", "a", "running")
    assert events(arrived)[:1] == ["Switched"]
    a = w.instance("a")
    assert a.host == "h2" and a.migration is not None and a.migration.phase == "cleaning"
    done = jobs(arrived)
    assert done["h0"] is None, "the source is sent a removal"
    assert isinstance(done["h2"], InstanceSpec) and not done["h2"].incoming
    segments = jobs(arrived, "network")
    assert segments["h1"].ports == (port("a", "10.9.0.2", "h2"),), "forwarding follows"
    assert segments["h0"] is None, "its last port gone, the source leaves the segment"
    # The scheduler heard: the allocation is on the destination, its slot in the limit
    # free, and the source's capacity kept until it is clean.
    assert "MoveSwitchedTo" in events(arrived)
    assert w.scheduler.allocations["a"].host == "h2"
    assert [m.switched for m in w.scheduler.moves] == [True]
    assert w.used()["h0"] == used["h0"]
    # 4. Clean: the source applied its removal; the move ends and its capacity goes.
    cleaned = w.report("h0", "a", "absent")
    assert events(cleaned) == ["CleanedUp", "MigrationEnded", "MoveEnded"]
    a = w.instance("a")
    assert a.migration is None and a.cleanup == {} and w.scheduler.moves == []
    assert w.used()["h0"] == (used["h0"][0] - 2, used["h0"][1] - 1024)
    assert w.used()["h2"] == (used["h2"][0] + 2, used["h2"][1] + 1024)
    # The whole story, in the instance's timeline.
    story = w.timeline("instance", "a")
    assert story[-5:] == ["MigrateInstance", "MigrationReserved", "Applied", "Applied",
                          "Applied"]


def test_the_source_saying_the_guest_left_switches_too() -> None:
    w = Moves()
    w.migrate("a", to="h2")
    w.report("h2", "a", "incoming")
    left = w.report("h0", "a", "migrated")
    assert events(left)[:1] == ["Switched"] and w.instance("a").host == "h2"
    # The destination's own word, later, is only a report of what it runs.
    late = w.report("h2", "a", "running", generation=w.instance("a").generation - 1)
    assert "Switched" not in events(late) and w.instance("a").host == "h2"


def test_without_a_destination_the_scheduler_picks_the_best_fit_never_the_source() -> None:
    w = Moves()
    w.migrate("a")
    assert w.instance("a").migration.dest == "h2"  # type: ignore[union-attr]
    w.report("h2", "a", "incoming")
    w.report("h2", "a", "running")
    w.report("h0", "a", "absent")
    w.migrate("a")  # h0 is the emptiest now
    assert w.instance("a").migration.dest == "h0"  # type: ignore[union-attr]


@pytest.mark.parametrize("failure", ["prepare", "libvirt"])
def test_a_failure_before_the_switch_rolls_back_to_one_copy_on_the_source(
        failure: str) -> None:
    w = Moves()
    used = w.used()
    w.migrate("a", to="h2")
    if failure == "prepare":
        back = w.fail("h2", "a", "no bridge for network n after 3 attempts")
        why = "destination h2 could not prepare: no bridge"
    else:
        w.report("h2", "a", "incoming")
        back = w.fail("h0", "a", "operation failed: migration job: unexpectedly failed")
        why = "the migration failed: operation failed"
    assert events(back)[0] == "RolledBack"
    assert back[0].outcome is not None and why in (back[0].outcome.reason or "")
    a = w.instance("a")
    assert a.host == "h0" and a.migration is None and a.cleanup == {"h2": a.generation}
    sent = jobs(back)
    assert sent["h2"] is None, "the destination is sent a removal"
    assert sent["h0"].outgoing is None and not sent["h0"].incoming
    assert jobs(back, "network")["h2"] is None, "the destination leaves the segment"
    assert w.net("n").ports[0].incoming is None
    assert w.used() == used and w.scheduler.moves == []
    # The destination's removal applied: nothing is left to clean.
    assert events(w.report("h2", "a", "absent")) == ["CleanedUp"]
    assert w.instance("a").cleanup == {}


def test_an_abort_while_memory_moves_asks_the_source_and_follows_what_libvirt_did() -> None:
    w = Moves()
    w.migrate("a", to="h2")
    w.report("h2", "a", "incoming")
    aborted = w.send("admin", "AbortMigration", "a", reason="operator")
    assert aborted.outcome is not None and aborted.outcome.events == ("AbortAsked",)
    (job,) = [j for j in aborted.jobs if j.host == "h0"]
    assert job.spec.outgoing.deadline_at == aborted.outcome.at, "the deadline is now"
    assert accepted(w.send("admin", "AbortMigration", "a"))  # asked already: nothing new
    assert w.instance("a").host == "h0" and w.phase("a") == "migrating"
    # libvirt could abort: the guest runs on the source.
    back = w.fail("h0", "a", "operation aborted: migration out job: canceled by client")
    assert events(back)[0] == "RolledBack" and "aborted: operator" in (
        back[0].outcome.reason or "")  # type: ignore[union-attr]
    assert w.instance("a").host == "h0"
    # Too late to abort: libvirt had finished; the guest runs on the destination.
    w.report("h2", "a", "absent")
    w.migrate("a", to="h2")
    w.report("h2", "a", "incoming")
    w.send("admin", "AbortMigration", "a")
    w.settle()
    assert events(w.report("h0", "a", "migrated"))[:1] == ["Switched"]
    assert w.instance("a").host == "h2"
    assert "too late" in reason(w.send("admin", "AbortMigration", "a"))


def test_an_abort_before_memory_moves_rolls_back_at_once() -> None:
    w = Moves()
    used = w.used()
    w.migrate("a", to="h2")
    back = [w.send("admin", "AbortMigration", "a"), *w.settle()]
    assert events(back)[0] == "RolledBack" and jobs(back)["h2"] is None
    assert w.used() == used
    assert "not migrating" in reason(w.send("admin", "AbortMigration", "a"))


def test_a_destination_that_goes_down_aborts_its_migrations() -> None:
    w = Moves()
    w.migrate("a", to="h2")
    down = [w.send("system", "HostDown", "h2"), *w.settle()]
    assert "AbortMigration" in [f.outcome.type for f in down if f.outcome]
    assert events(down).count("RolledBack") == 1
    assert w.instance("a").host == "h0" and w.instance("a").migration is None


@pytest.mark.parametrize(("to", "setup", "why"), [
    ("h0", None, "is on h0 already"),
    ("h9", None, "no host h9"),
    ("lb0", "lb", "lb0 is an LB node"),
    ("h2", "down", "host h2 is down"),
    ("h2", "draining", "host h2 is draining"),
    ("h2", "small", "host h2 has 1 vCPUs and 256 MiB free, not 2 and 1024"),
    ("h3", "silent", "h3 has not reported its underlay"),
])
def test_a_destination_that_cannot_take_it_is_refused_with_the_reason(
        to: str, setup: str | None, why: str) -> None:
    w = Moves()
    if setup == "lb":
        w.send("admin", "RegisterHost", "lb0", vcpus=4, memory_mib=4096, role="lb")
    elif setup == "down":
        w.send("system", "HostDown", "h2")
    elif setup == "draining":  # with a guest of its own, so that it stays draining
        w.vm("b", {"network": "n"})
        w.send("admin", "SetHostCondition", "h2", condition="draining")
    elif setup == "small":
        w.host("h2", vcpus=1, memory_mib=256)
    elif setup == "silent":
        w.host("h3", vcpus=64, memory_mib=1 << 16)  # no agent ever reported
    w.settle()
    asked = w.migrate("a", to=to)
    if asked[0].outcome is not None and not asked[0].outcome.accepted:
        assert why in reason(asked[0])  # the instance itself can tell
        return
    refused = only(asked, "ReserveMove")
    assert why in reason(refused)
    assert why in (only(asked, "MigrationRefused").outcome.reason or "")  # type: ignore
    assert w.instance("a").migration is None
    assert "a" not in [m.instance for m in w.scheduler.moves]


def test_what_cannot_migrate_is_rejected() -> None:
    w = Moves()
    w.migrate("a", to="h2")
    assert "already migrating (preparing to h2)" in reason(w.send("admin", "MigrateInstance",
                                                                  "a"))
    assert "migrating to h2 (preparing)" in reason(w.send("user", "StopInstance", "a"))
    assert "no instance nope" in reason(w.send("admin", "MigrateInstance", "nope"))
    w.send("user", "DeleteInstance", "c")
    w.settle()
    assert "is deleted" in reason(w.send("admin", "MigrateInstance", "c"))
    # Users do not migrate machines: the fold refuses the source itself.
    assert "MigrateInstance may not come from source 'user'" in reason(
        w.send("user", "MigrateInstance", "a"))


def test_a_stopped_instance_moves_cold() -> None:
    w = Moves()
    w.send("user", "StopInstance", "a")
    w.settle()
    w.report("h0", "a", "stopped")
    moved = w.migrate("a", to="h2")
    assert "MovedCold" in events(moved) and "MoveEnded" in events(moved)
    a = w.instance("a")
    assert a.host == "h2" and a.migration is None and a.cleanup == {"h0": a.generation}
    sent = jobs(moved)
    assert sent["h0"] is None and sent["h2"].power == "stopped" and not sent["h2"].incoming
    assert w.scheduler.allocations["a"].host == "h2"


def test_deleting_a_migrating_instance_removes_it_from_both_hosts() -> None:
    w = Moves()
    w.migrate("a", to="h2")
    w.report("h2", "a", "incoming")
    gone = [w.send("user", "DeleteInstance", "a"), *w.settle()]
    assert jobs(gone) == {"h0": None, "h2": None}
    assert "a" not in w.scheduler.allocations and w.scheduler.moves == []


def test_at_most_k_migrations_at_once_per_host_the_rest_queue_visibly() -> None:
    w = Moves()
    w.send("admin", "SetMigrationLimit", "default", limit=1)
    w.vm("b", {"network": "n"})  # h2
    w.vm("d", {"network": "n"})  # h0
    assert (w.instance("b").host, w.instance("d").host) == ("h2", "h0")
    w.migrate("a", to="h2")
    out = w.migrate("d", to="h1")
    assert w.phase("d") == "queued"
    assert "1 migrations out of h0 already" in (
        only(out, "MigrationQueued").outcome.reason or "")  # type: ignore[union-attr]
    w.migrate("b", to="h1")  # other hosts: it starts
    assert w.phase("b") == "preparing"
    into = w.migrate("c", to="h2")
    assert "1 migrations into h2 already" in (
        only(into, "MigrationQueued").outcome.reason or "")  # type: ignore[union-attr]
    w.report("h2", "a", "incoming")
    w.report("h2", "a", "running")
    # a's move ends once h0 is clean: c may go into h2 now; d still waits, b moving into h1.
    ended = w.report("h0", "a", "absent")
    assert [f.outcome.id for f in ended if f.outcome and f.outcome.type == "MigrationReserved"
            ] == ["c"]
    assert w.phase("c") == "preparing" and w.phase("d") == "queued"
    # A limit raised lets the queue go on.
    w.send("admin", "SetMigrationLimit", "default", limit=2)
    w.settle()
    assert w.phase("d") == "preparing"


def test_a_drain_moves_everything_within_the_limit_then_the_host_is_in_maintenance() -> None:
    w = Moves()
    for name in ("d", "e", "f", "g", "h", "i"):
        w.vm(name, {"network": "n"})
    on_h0 = sorted(i for i, a in w.scheduler.allocations.items() if a.host == "h0")
    assert len(on_h0) >= 3
    drain = [w.send("admin", "SetHostCondition", "h0", condition="draining"), *w.settle()]
    asked = [f.outcome.id for f in drain if f.outcome and f.outcome.type == "MigrateInstance"]
    assert sorted(asked) == on_h0
    moving = [i for i in on_h0 if w.phase(i) == "preparing"]
    assert len(moving) == 2 and all(w.phase(i) == "queued" for i in on_h0 if i not in moving)
    most = 0
    while any(w.instance(i).host == "h0" for i in on_h0):
        most = max(most, len([m for m in w.scheduler.moves if m.dest]))
        i = next(i for i in on_h0 if w.phase(i) == "preparing")
        dest = w.instance(i).migration.dest  # type: ignore[union-attr]
        w.report(dest, i, "incoming")
        w.report(dest, i, "running")
        w.report("h0", i, "absent")
    assert most == 2
    assert w.states[("host", "h0")].condition == "maintenance"
    assert all(w.instance(i).host != "h0" for i in on_h0)


def test_a_drain_with_no_room_anywhere_waits_with_the_reason() -> None:
    w = Moves()
    w.host("h1", vcpus=2, memory_mib=1024)  # full with c
    w.host("h2", vcpus=1, memory_mib=256)
    w.settle()
    w.send("admin", "SetHostCondition", "h0", condition="draining")
    w.settle()
    m = w.instance("a").migration
    assert m is not None and m.phase == "queued" and "no other host has" in (m.reason or "")
    w.up("h3")  # room arrives: the move starts
    assert w.phase("a") == "preparing"
    assert w.instance("a").migration.dest == "h3"  # type: ignore[union-attr]


def test_an_empty_host_set_draining_is_in_maintenance_at_once() -> None:
    w = Moves()
    w.send("admin", "SetHostCondition", "h2", condition="draining")
    w.settle()
    assert w.states[("host", "h2")].condition == "maintenance"


def test_a_down_host_is_evacuated_cold_and_its_own_jobs_say_removal() -> None:
    w = Moves()
    assert "is up: only a host that is down" in reason(w.send("admin", "EvacuateHost", "h0"))
    w.send("system", "HostDown", "h0")
    w.settle()
    gone = [w.send("admin", "EvacuateHost", "h0"), *w.settle()]
    assert "Evacuated" in events(gone) and "Rehomed" in events(gone)
    a = w.instance("a")
    assert a.host == "h2" and a.cleanup == {"h0": a.generation}
    sent = jobs(gone)
    assert sent["h0"] is None and sent["h2"].power == "running" and not sent["h2"].incoming
    assert jobs(gone, "network")["h1"].ports == (port("a", "10.9.0.2", "h2"),)
    assert w.scheduler.allocations["a"].host == "h2"
    assert accepted(w.send("admin", "EvacuateHost", "h0"))  # once per outage
    assert "Evacuated" not in events(w.settle())
    # The host returns: its agent applies the removal, and it is clean.
    w.send("system", "HostUp", "h0", boot_id="b2", underlay=VTEPS["h0"])
    w.settle()
    assert events(w.report("h0", "a", "absent")) == ["CleanedUp"]


def test_an_evacuation_with_no_room_waits_with_the_reason_and_places_when_room_comes() -> None:
    w = Moves()
    w.host("h1", vcpus=2, memory_mib=1024)  # full with c
    w.host("h2", vcpus=1, memory_mib=256)
    w.send("system", "HostDown", "h0")
    w.send("admin", "EvacuateHost", "h0")
    w.settle()
    a = w.instance("a")
    assert a.host == "h0" and "no host has 2 vCPUs and 1024 MiB free" in (a.error or "")
    w.up("h3")
    assert w.instance("a").host == "h3" and w.instance("a").error is None


def test_an_evacuation_ends_a_migration_and_removes_what_its_destination_may_hold() -> None:
    w = Moves()
    w.migrate("a", to="h2")
    w.report("h2", "a", "incoming")
    w.send("system", "HostDown", "h0")
    moved = [w.send("admin", "EvacuateHost", "h0"), *w.settle()]
    a = w.instance("a")
    assert a.migration is None and a.host not in ("h0", None)
    assert set(a.cleanup) >= {"h0"} and (a.host == "h2" or "h2" in a.cleanup)
    assert w.scheduler.moves == [] and jobs(moved)["h0"] is None


def test_a_source_that_never_confirms_its_removal_is_reissued_it_and_blocks_nothing() -> None:
    w = Moves()
    w.migrate("a", to="h2")
    w.report("h2", "a", "incoming")
    w.report("h2", "a", "running")
    w.report("h2", "a", "running")  # the destination applied the switch's job
    a = w.instance("a")
    assert a.cleanup == {"h0": a.generation} and a.observed_generation == a.generation
    # Its report lost: the reconciler's tick re-issues the removal to the host left.
    again = w.send("system", "Reconcile", "a", generation=a.generation, max_attempts=2)
    assert again.outcome is not None and again.outcome.events == ("Reissued",)
    assert {j.host: j.spec is None for j in again.jobs} == {"h2": False, "h0": True}
    # Out of re-issues: no alert (the host applies it when it returns).
    for _ in range(2):
        w.send("system", "Reconcile", "a", generation=a.generation, max_attempts=2)
    assert w.instance("a").status == "placed"
    # It can migrate again meanwhile, never back to the host that holds the stale copy.
    assert "has not removed an earlier copy" in reason(
        only(w.migrate("a", to="h0"), "ReserveMove"))
    w.migrate("a")
    m = w.instance("a").migration
    assert m is not None and m.phase == "preparing" and m.dest == "h1"
