"""Live migration against a model of the hosts: whatever the interleaving of commands,
follow-ups, agents' reports and libvirt's outcomes, a guest never runs on two hosts, and
once everything is delivered it runs exactly where the projection says.

The model plays each host's agent and libvirt: an agent applies the newest job on its
subject for an instance (an older one is stale, as in `agents.runtime`), and libvirt's
migration succeeds or fails as drawn. Its bookkeeping of where each guest runs is the
truth the fold is checked against; the fold sees only the reports.
"""

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgspec
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from orchestrator.deciders.instance import Instance
from schemas.codec import encode
from schemas.jobs import Job
from tests.test_deciders import World, subject
from tests.test_fold_properties import check_scheduler, snapshot

HOSTS = ("h0", "h1", "h2", "h3")
INSTANCES = ("i0", "i1", "i2", "i3")
TEMPLATE = {"vcpus": 2, "memory_mib": 1024, "image": "debian-12", "nics": [{"network": "n"}]}

SETTINGS = settings(max_examples=300, database=None, deadline=None,
                    phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass
class Hosts:
    """The agents and libvirt, as the model plays them."""

    newest: dict[tuple[str, str], Job] = field(default_factory=dict)  # (host, id) -> job
    applied: dict[tuple[str, str], tuple[int, bool]] = field(default_factory=dict)
    runs: dict[str, set[str]] = field(default_factory=dict)  # id -> hosts running it
    arrivals: deque[tuple[str, str]] = field(default_factory=deque)  # (host, id) to report
    frozen: set[str] = field(default_factory=set)  # hosts down: nothing runs or acts there
    seqs: dict[tuple[str, str], int] = field(default_factory=dict)  # the JOB stream's seq
    evacuated: dict[str, int] = field(default_factory=dict)  # host -> seq of its HostSpec
    seq: int = 0

    def saw(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.seq += 1
            if job.kind == "host":  # the host's own job: it was evacuated
                self.evacuated[job.host] = self.seq
                continue
            key = (job.host, job.id)
            if key not in self.newest or job.generation >= self.newest[key].generation:
                self.newest[key] = job
                self.seqs[key] = self.seq

    def job(self, host: str, x: str) -> Job | None:
        """The newest job, as the agent reads it: one older than the host's evacuation is
        a removal (agents.runtime's `_superseded`)."""
        job = self.newest.get((host, x))
        if job is not None and job.spec is not None and \
                self.seqs[(host, x)] < self.evacuated.get(host, 0):
            return msgspec.structs.replace(job, spec=None)
        return job


class Cloud(World):
    def __init__(self) -> None:
        super().__init__()
        self.hosts = Hosts()
        for i, h in enumerate(HOSTS):
            self.host(h, vcpus=8, memory_mib=4096)
            self.send("system", "HostUp", h, boot_id="b1", underlay=f"192.0.2.{10 + i}")
        self.send("user", "CreateNetwork", "n", vni=7, cidr="10.9.0.0/24")
        self.settle()
        for x in INSTANCES:
            self.send("user", "CreateInstance", x, template=TEMPLATE)
            self.settle()
        for x in INSTANCES:
            self.agent(self.instance(x).host or "", x, ok=True)

    def fold(self, subject_: str, data: bytes) -> Any:
        before = snapshot(self.states)
        f = super().fold(subject_, data)
        assert not f.internal_error, f.dead_letter
        check_scheduler(before, self.states, f)
        self.hosts.saw(f.jobs)
        return f

    def relay_one(self) -> None:
        if self.pending:
            cmd = self.pending.popleft()
            self.fold(subject("system", cmd.kind, cmd.id), encode(cmd))

    def now(self) -> int:
        return 1_000 * (len(self.history) + 1)

    def report(self, host: str, x: str, generation: int, observed: str | None,
               error: str = "") -> None:
        if observed is None:
            self.send(host, "Failed", x, generation=generation, error=error)
        else:
            self.send(host, "Applied", x, generation=generation, observed=observed)

    def agent(self, host: str, x: str, ok: bool) -> None:
        """``host``'s agent applies its newest job for ``x``, if it has not yet."""
        m = self.hosts
        job = m.job(host, x)
        done = m.applied.get((host, x), (-1, False))
        # Applied already, unless it is the same generation turned into a removal.
        if host in m.frozen or job is None or (job.generation, job.spec is None) <= done:
            return
        m.applied[(host, x)] = (job.generation, job.spec is None)
        runs = m.runs.setdefault(x, set())
        spec = job.spec
        if spec is None:
            runs.discard(host)
            self.report(host, x, job.generation, "absent")
        elif spec.incoming:
            self.report(host, x, job.generation, "incoming")
        elif spec.outgoing is not None:
            dest = spec.outgoing.dest
            if host not in runs:  # gone already: libvirt says where it went
                if dest in runs:
                    self.report(host, x, job.generation, "migrated")
                else:
                    self.report(host, x, job.generation, None, "runs nowhere")
            elif spec.outgoing.deadline_at <= self.now():
                self.report(host, x, job.generation, None, "deadline passed")
            elif ok:
                runs.discard(host)
                runs.add(dest)
                m.arrivals.append((dest, x))
                self.report(host, x, job.generation, "migrated")
            else:
                self.report(host, x, job.generation, None, "libvirt: migration failed")
        elif spec.power == "running":
            runs.add(host)  # defined and started here if it was not
            self.report(host, x, job.generation, "running")
        else:
            runs.discard(host)
            self.report(host, x, job.generation, "stopped")

    def arrive(self) -> None:
        """The destination's lifecycle event: the guest resumed there."""
        if self.hosts.arrivals:
            host, x = self.hosts.arrivals.popleft()
            if host in self.hosts.runs.get(x, set()):
                self.report(host, x, self.hosts.applied.get((host, x), (0, False))[0],
                            "running")

    def freeze(self, host: str) -> None:
        self.hosts.frozen.add(host)
        self.send("system", "HostDown", host)

    def thaw(self, host: str, boot: int) -> None:
        """The host returns: its agent removes what its newest jobs say to remove first,
        then says it is up."""
        if host not in self.hosts.frozen:
            return
        self.hosts.frozen.discard(host)
        for x in INSTANCES:
            job = self.hosts.job(host, x)
            if job is not None and job.spec is None:
                self.agent(host, x, ok=True)
        self.send("system", "HostUp", host, boot_id=f"b{boot}",
                  underlay=f"192.0.2.{10 + HOSTS.index(host)}")

    def check(self) -> None:
        for x, hosts in self.hosts.runs.items():
            live = hosts - self.hosts.frozen  # a frozen host's copy is stale, not running
            assert len(live) <= 1, f"{x} runs on {sorted(live)}"


Step = tuple[str, int, int]  # (what, which, extra)
steps = st.tuples(
    st.sampled_from(["migrate", "migrate", "migrate_to", "abort", "abort", "agent", "agent",
                     "agent", "agent", "agent_fail", "arrive", "arrive", "relay", "relay",
                     "relay", "relay", "down", "down", "up", "drain", "limit", "delete", "stop",
                     "start", "evacuate", "evacuate"]),
    st.integers(0, 3), st.integers(0, 3))


def run(cloud: Cloud, step: Step) -> None:
    what, i, j = step
    x, host = INSTANCES[i], HOSTS[j]
    match what:
        case "migrate":
            cloud.send("admin", "MigrateInstance", x)
        case "migrate_to":
            cloud.send("admin", "MigrateInstance", x, to=host)
        case "abort":
            cloud.send("admin", "AbortMigration", x)
        case "agent" | "agent_fail":
            cloud.agent(host, x, ok=what == "agent")
        case "arrive":
            cloud.arrive()
        case "relay":
            cloud.relay_one()
        case "down":
            cloud.freeze(host)
        case "up":
            cloud.thaw(host, i)
        case "evacuate":
            cloud.send("admin", "EvacuateHost", host)
        case "drain":
            cloud.send("admin", "SetHostCondition", host, condition="draining")
        case "limit":
            cloud.send("admin", "SetMigrationLimit", "default", limit=1 + i % 2)
        case "delete":
            cloud.send("user", "DeleteInstance", x)
        case "stop":
            cloud.send("user", "StopInstance", x)
        case "start":
            cloud.send("user", "StartInstance", x)


def quiesce(cloud: Cloud) -> None:
    """Every host back, everything delivered, every agent answering and every migration
    succeeding."""
    for n, host in enumerate(sorted(cloud.hosts.frozen)):
        cloud.thaw(host, 10 + n)
    for _ in range(200):
        cloud.settle()
        while cloud.hosts.arrivals:
            cloud.arrive()
        before = len(cloud.history)
        for h in HOSTS:
            for x in INSTANCES:
                cloud.agent(h, x, ok=True)
        cloud.check()
        if len(cloud.history) == before and not cloud.pending:
            return
    raise AssertionError("the saga never settled")


@SETTINGS
@given(st.lists(steps, min_size=10, max_size=80))
def test_a_guest_never_runs_twice_and_ends_where_the_projection_says(
        script: list[Step]) -> None:
    cloud = Cloud()
    for step in script:
        run(cloud, step)
        cloud.check()
    quiesce(cloud)
    sched = cloud.scheduler
    for x in INSTANCES:
        state: Instance = cloud.instance(x)
        runs = cloud.hosts.runs.get(x, set())
        if state.status == "deleted" or state.power == "stopped":
            assert runs == set(), (x, state.status, runs)
        else:
            assert runs == {state.host}, (x, state.host, runs)
        assert state.migration is None or state.migration.phase == "queued", state.migration
        assert state.cleanup == {}, (x, state.cleanup)
        queued = [m for m in sched.moves if m.instance == x]
        assert all(m.dest is None for m in queued), queued
        assert bool(queued) == (state.migration is not None)
        if state.status != "deleted":
            assert sched.allocations[x].host == state.host
