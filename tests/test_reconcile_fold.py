"""Re-issue and degrade decisions in the fold, driven by Reconcile commands; and which
instances the reconciler sends them for."""

from typing import Any

from events.bus import Publisher
from events.subjects import CMD_STREAM, partition_of, stored_command_subject
from orchestrator import queries
from orchestrator.fold import Folded, fold_message
from orchestrator.reconciler import Reconciler, ReconcilerConfig
from schemas.codec import encode

N = 8


class Log:
    def __init__(self) -> None:
        self.states: dict[Any, Any] = {}
        self.seq = 0

    def fold(self, source: str, kind: str, id_: str, **fields: Any) -> Folded:
        self.seq += 1
        fields.setdefault("cmd_id", f"k{self.seq}")
        subject = stored_command_subject(partition_of(kind, id_, N), source, kind, id_)
        return fold_message(self.states, subject, encode({"id": id_, **fields}), self.seq,
                            1_000 * self.seq, N)


def placed_instance() -> Log:
    log = Log()
    log.fold("user", "instance", "vm1", type="CreateInstance",
             template={"vcpus": 1, "memory_mib": 256, "image": "missing-image"})
    log.fold("system", "instance", "vm1", type="Placed", host="h1")
    return log


def test_overdue_job_is_reissued_then_the_instance_degrades() -> None:
    log = placed_instance()
    failed = log.fold("h1", "instance", "vm1", type="Failed", generation=1,
                      error="image missing-image does not exist")
    assert failed.outcome and failed.outcome.accepted
    for attempt in (1, 2):
        out = log.fold("system", "instance", "vm1", type="Reconcile", generation=1,
                       max_attempts=2)
        assert out.outcome and out.outcome.events == ("Reissued",)
        assert [(j.generation, j.attempt) for j in out.jobs] == [(1, attempt)]
    out = log.fold("system", "instance", "vm1", type="Reconcile", generation=1, max_attempts=2)
    assert out.outcome and out.outcome.events == ("Degraded",) and not out.jobs
    state = log.states[("instance", "vm1")]
    assert state.status == "degraded" and "does not exist" in (state.error or "")
    # Degraded is final for this generation: more ticks change nothing.
    again = log.fold("system", "instance", "vm1", type="Reconcile", generation=1, max_attempts=2)
    assert again.outcome and again.outcome.events == ()
    # A new generation (the user asks for something else) starts over.
    stop = log.fold("user", "instance", "vm1", type="StopInstance")
    assert stop.jobs and stop.jobs[0].generation == 2 and stop.jobs[0].attempt == 0
    assert log.states[("instance", "vm1")].status == "placed"


def test_reconcile_of_a_converged_or_older_generation_is_a_no_op() -> None:
    log = placed_instance()
    log.fold("h1", "instance", "vm1", type="Applied", generation=1, observed="running")
    out = log.fold("system", "instance", "vm1", type="Reconcile", generation=1, max_attempts=3)
    assert out.outcome and out.outcome.accepted and out.outcome.events == () and not out.jobs
    log.fold("user", "instance", "vm1", type="StopInstance")
    old = log.fold("system", "instance", "vm1", type="Reconcile", generation=1, max_attempts=3)
    assert old.outcome and old.outcome.events == ()


def test_only_the_system_may_reconcile() -> None:
    log = placed_instance()
    out = log.fold("user", "instance", "vm1", type="Reconcile", generation=1, max_attempts=1)
    assert out.outcome and not out.outcome.accepted
    assert "may not come from source 'user'" in (out.outcome.reason or "")


async def test_the_reconciler_leaves_instances_on_a_down_host_alone(js, pg) -> None:
    """Re-issuing to a host that is down would only degrade its instances, one alert each:
    the host is the alert, and its return resyncs them."""
    log = Log()
    for host in ("h1", "h2"):
        log.fold("admin", "host", host, type="RegisterHost", vcpus=8, memory_mib=8192)
    for vm, host in (("vm1", "h1"), ("vm2", "h2"), ("vm3", "h9")):  # h9: never registered
        log.fold("user", "instance", vm, type="CreateInstance",
                 template={"vcpus": 1, "memory_mib": 256, "image": "tiny"})
        log.fold("system", "instance", vm, type="Placed", host=host)
    log.fold("system", "host", "h1", type="HostDown")
    await pg.copy_records_to_table(
        "entities", columns=["kind", "id", "state", "last_seq"],
        records=[(kind, id_, encode(state), 0) for (kind, id_), state in log.states.items()])

    issued = await Reconciler(Publisher(js), ReconcilerConfig()).tick(pg, now_ms=10**13)
    assert sorted(cmd.id for cmd in issued) == ["vm2", "vm3"]
    assert (await js.stream_info(CMD_STREAM)).state.messages == 2
    alerts = await queries.alerts(pg)
    assert [(a.kind, a.id, a.attempts) for a in alerts] == [("host", "h1", None)]


async def test_a_host_that_comes_back_restarts_its_instances_deadlines(js, pg) -> None:
    """A flapping host must not use up its instances' retries: their deadline counts from
    its return (the resync it brings converges them)."""
    log = Log()
    log.fold("admin", "host", "h1", type="RegisterHost", vcpus=8, memory_mib=8192)
    for vm in ("vm1", "vm2"):
        log.fold("user", "instance", vm, type="CreateInstance",
                 template={"vcpus": 1, "memory_mib": 256, "image": "tiny"})
        log.fold("system", "instance", vm, type="Placed", host="h1")
    log.fold("system", "host", "h1", type="HostDown")
    back = log.fold("system", "host", "h1", type="HostUp", boot_id="b2")
    await pg.copy_records_to_table(
        "entities", columns=["kind", "id", "state", "last_seq"],
        records=[(kind, id_, encode(state), 0) for (kind, id_), state in log.states.items()])
    config = ReconcilerConfig(deadline_s=10.0)
    reconciler = Reconciler(Publisher(js), config)
    back_at = 1_000 * back.seq
    assert await reconciler.tick(pg, now_ms=back_at + 9_999) == []
    issued = await reconciler.tick(pg, now_ms=back_at + 10_000)
    assert sorted(cmd.id for cmd in issued) == ["vm1", "vm2"]


async def test_the_reconciler_reissues_network_jobs_late_hosts_have_not_applied(js, pg) -> None:
    """Networks get the instances' rules: overdue jobs are reconciled, hosts that are down
    excepted, and a degraded network is an alert."""
    from tests.test_network_fold import Cloud

    w = Cloud()
    w.up("h0")
    w.network("late", vni=7)
    w.network("down", vni=8)
    w.network("fine", vni=9)
    for net in ("late", "down", "fine"):
        w.vm(f"{net}-vm", {"network": net})
    for net in ("down", "fine"):
        w.send("h0", "NetworkApplied", net, generation=w.net(net).generation, observed="up")
    w.host("h1", vcpus=64, memory_mib=1 << 17)
    w.vm("down-vm2", {"network": "down"})  # h1: most free memory; it then goes down
    assert w.instance("down-vm2").host == "h1"
    w.send("system", "HostDown", "h1")
    w.settle()
    w.send("h0", "NetworkApplied", "down", generation=w.net("down").generation, observed="up")
    await pg.copy_records_to_table(
        "entities", columns=["kind", "id", "state", "last_seq"],
        records=[(kind, id_, encode(state), 0) for (kind, id_), state in w.states.items()])

    issued = await Reconciler(Publisher(js), ReconcilerConfig()).tick(pg, now_ms=10**13)
    networks = [(type(cmd).__name__, cmd.id) for cmd in issued if cmd.kind == "network"]
    assert networks == [("ReconcileNetwork", "late")]
    w.send("system", "ReconcileNetwork", "late", generation=w.net("late").generation,
           max_attempts=0)
    row = w.net("late")
    await pg.execute("UPDATE entities SET state = $1 WHERE kind = 'network' AND id = 'late'",
                     encode(row).decode())
    alerts = await queries.alerts(pg)
    assert ("network", "late") in [(a.kind, a.id) for a in alerts]


async def test_the_reconciler_reissues_balancer_jobs_late_nodes_have_not_applied(js, pg) -> None:
    """Only a node that was sent the balancer and has not applied it counts; a stalled
    balancer is an alert."""
    from tests.test_lb_fold import Lbs

    w = Lbs()
    w.cloud()
    w.balancer("done")
    for lb in ("l", "done"):
        w.applied("lb1", lb)
    w.applied("lb2", "done")
    await pg.copy_records_to_table(
        "entities", columns=["kind", "id", "state", "last_seq"],
        records=[(kind, id_, encode(state), 0) for (kind, id_), state in w.states.items()])
    issued = await Reconciler(Publisher(js), ReconcilerConfig()).tick(pg, now_ms=10**13)
    assert [(type(cmd).__name__, cmd.id) for cmd in issued if cmd.kind == "lb"] == [
        ("ReconcileLb", "l")]
    w.send("system", "ReconcileLb", "l", generation=w.lb().generation, max_attempts=0)
    await pg.execute("UPDATE entities SET state = $1 WHERE kind = 'lb' AND id = 'l'",
                     encode(w.lb()).decode())
    reasons = [a.reason for a in await queries.alerts(pg) if (a.kind, a.id) == ("lb", "l")]
    assert any(r.startswith("nodes lb2 did not apply generation") for r in reasons), reasons


async def test_the_reconciler_ticks_a_balancer_whose_drain_time_is_up(js, pg) -> None:
    from orchestrator.deciders.lb import drains_due
    from tests.test_lb_fold import Lbs

    w = Lbs()
    w.cloud()
    w.send("user", "StopInstance", "p-0")
    w.settle()
    w.applied("lb1")
    w.applied("lb2")
    (since,) = w.lb().draining.values()
    await pg.copy_records_to_table(
        "entities", columns=["kind", "id", "state", "last_seq"],
        records=[(kind, id_, encode(state), 0) for (kind, id_), state in w.states.items()])
    reconciler = Reconciler(Publisher(js), ReconcilerConfig(deadline_s=3600))
    assert drains_due(w.lb(), since + 999) == ()
    assert [c for c in await reconciler.tick(pg, now_ms=since + 999) if c.kind == "lb"] == []
    (tick,) = [c for c in await reconciler.tick(pg, now_ms=since + 1000) if c.kind == "lb"]
    assert (type(tick).__name__, tick.id, tick.cmd_id) == ("DrainTick", "l", f"dt-l-{since}")
