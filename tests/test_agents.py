"""Agents and convergence, end to end: agent processes on libvirt's test:/// driver,
orchestrator replicas, real nats-server and PostgreSQL."""

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from nats.js import JetStreamContext
from prometheus_client.parser import text_string_to_metric_families

from agents.drivers import testnode
from agents.drivers.errors import PermanentDriverError
from agents.drivers.vm import VmDriver
from agents.runtime import RESYNC_DUTY, Agent, AgentConfig
from events.bus import Publisher, read_stream
from events.heartbeats import read_heartbeats
from events.subjects import CMD_STREAM, JOB_STREAM, inventory_subject
from orchestrator.embedded import free_ports
from schemas.codec import command_from_dict
from schemas.jobs import Job
from schemas.specs import HostSpec, InstanceSpec, InstanceTemplate, Power
from tests.conftest import Env, Processes, eventually

HOSTS = ("h1", "h2", "h3")
TINY = {"vcpus": 1, "memory_mib": 128, "image": "tiny"}


async def register(js: JetStreamContext, pg: asyncpg.Connection) -> None:
    await Publisher(js).publish_many([("admin", command_from_dict(dict(
        type="RegisterHost", cmd_id=f"reg-{h}", id=h, vcpus=512, memory_mib=1 << 20)))
        for h in HOSTS])
    await eventually(lambda: pg.fetchval(
        f"SELECT count(*) = {len(HOSTS)} FROM history WHERE kind = 'scheduler'"))


async def agents_running(js: JetStreamContext) -> None:
    """Every host's agent is connected: it has beaten at least once. (Until then a job
    can pass its deadline unseen and be re-issued before any agent reads it.)"""

    async def beating() -> bool:
        return set(HOSTS) <= (await read_heartbeats(js)).keys()

    await eventually(beating, timeout=60)


def start(processes: Processes, env: Env, *extra: str) -> None:
    for name in ("r1", "r2"):
        processes.orch("orchestrator", "--id", name, "--deadline", "3", "--max-attempts", "2",
                       "--down-after", "3", *extra, env=env.environ(), name=name)


def agent(processes: Processes, env: Env, host: str, *extra: str,
          name: str | None = None) -> subprocess.Popen[bytes]:
    return processes.orch("agent", "--host", host, "--libvirt", "test", "--resync", "2",
                          *extra, env=env.environ(), name=name or f"agent-{host}")


async def instances(pg: asyncpg.Connection) -> dict[str, dict]:
    rows = await pg.fetch("SELECT id, state FROM entities WHERE kind = 'instance'")
    return {r["id"]: msgspec.json.decode(r["state"]) for r in rows}


def all_converged(states: dict[str, dict], count: int) -> bool:
    """All ``count`` instances exist, each is placed, and its host has applied its newest
    generation.

    An instance not placed yet has generation 0 and observed_generation 0 too: it is not
    converged, its job has not even been issued. (Counting it let a test move on while
    placements were still on their way.) Only an instance deleted before it was ever
    placed has no host and nothing left to converge.
    """
    return len(states) == count and all(
        s["observed_generation"] == s["generation"] if s["host"] else s["status"] == "deleted"
        for s in states.values())


async def converged(pg: asyncpg.Connection, count: int) -> bool:
    return all_converged(await instances(pg), count)


def test_an_instance_not_placed_yet_is_not_converged() -> None:
    placed = {"status": "placed", "host": "h1", "generation": 1, "observed_generation": 1}
    pending = {"status": "pending", "host": None, "generation": 0, "observed_generation": 0}
    applying = {**placed, "generation": 2}
    deleted_unplaced = {**pending, "status": "deleted", "generation": 1}
    assert all_converged({"a": placed, "b": deleted_unplaced}, 2)
    assert not all_converged({"a": placed, "b": pending}, 2)
    assert not all_converged({"a": placed, "b": applying}, 2)
    assert not all_converged({"a": placed}, 2)


async def inventory(js: JetStreamContext, host: str) -> dict[str, str]:
    reply = await js._nc.request(inventory_subject(host), b"", timeout=5)
    return msgspec.json.decode(reply.data)


async def test_a_resync_never_applies_an_older_job_after_a_newer_removal(
        env: Env, js: JetStreamContext, tmp_path: Path) -> None:
    """A resync reads its snapshot, then the newer removal is applied before the resync
    reaches that entity: the resync's older job must change nothing and report nothing,
    or a deleted instance would be recreated, or reported at a stale power state."""
    uri = testnode.test_node_uri("h1", tmp_path)
    driver = VmDriver(uri, "h1")
    agent = Agent(AgentConfig(env.nats_url, "h1", uri), lambda: {"instance": driver})
    agent.drivers = {"instance": driver}  # what Agent.run would set up, without its loops
    agent.publisher = Publisher(js)
    template = InstanceTemplate(vcpus=1, memory_mib=128, image="tiny")

    def job(generation: int, power: Power | None) -> Job:
        spec = None if power is None else InstanceSpec(template=template, power=power, host="h1")
        return Job(kind="instance", id="a", host="h1", generation=generation, spec=spec)

    async def publish_job(j: Job) -> None:
        await js.publish("job.h1.instance.a", msgspec.json.encode(j), stream=JOB_STREAM)

    await agent._converge(job(1, "running"), None)
    await publish_job(job(2, "stopped"))  # the newest job when the resync reads the stream
    async with agent.locks("instance/a"):  # held as the job loop holds it for the newer job
        resync = asyncio.create_task(agent.resync(js))
        await eventually(lambda: asyncio.sleep(
            0, agent.locks._locks["instance/a"].users == 2))
        await publish_job(job(3, None))
        await agent._converge(job(2, "stopped"), None)
        await agent._converge(job(3, None), None)
    await resync  # now it converges its snapshot's generation 2
    assert driver.observe() == {}
    assert agent.applied["instance", "a"] == 3
    reports = [msgspec.json.decode(m.data) async for batch in read_stream(
        js, CMD_STREAM, "cmd.*.h1.instance.a") for m in batch]
    assert [(r["generation"], r["observed"]) for r in reports] == [
        (1, "running"), (2, "stopped"), (3, "absent")]
    driver.close()


async def test_a_host_evacuated_drops_older_instance_jobs_before_it_runs_anything(
        env: Env, js: JetStreamContext, tmp_path: Path) -> None:
    """A host back from an evacuation whose instances' own removals are not on its subjects
    yet (the fold's follow-ups were still on their way): the host's own job, written in
    the step that decided the evacuation, makes every older instance job a removal, at
    start before the agent runs anything, and for jobs delivered later; a newer job (an
    instance placed there since) runs."""
    uri = testnode.test_node_uri("h1", tmp_path)
    driver = VmDriver(uri, "h1")
    agent = Agent(AgentConfig(env.nats_url, "h1", uri), lambda: {"instance": driver})
    agent.drivers = {"instance": driver}
    agent.publisher = Publisher(js)
    template = InstanceTemplate(vcpus=1, memory_mib=128, image="tiny")

    def job(id_: str) -> Job:
        return Job(kind="instance", id=id_, host="h1", generation=1, spec=InstanceSpec(
            template=template, power="running", host="h1"))

    await agent._converge(job("old"), None)  # ran before the host went away
    assert driver.observe() == {"old": "running"}
    agent.applied = {("instance", "old"): 1}  # as a restarted agent adopts it
    await js.publish("job.h1.instance.old", msgspec.json.encode(job("old")), stream=JOB_STREAM)
    await js.publish("job.h1.host.h1", msgspec.json.encode(Job(
        kind="host", id="h1", host="h1", generation=1, spec=HostSpec(evacuated_at=1))),
        stream=JOB_STREAM)
    await agent._remove_stale(js)
    assert driver.observe() == {}, "the stale copy goes first"
    # A job placed here after the evacuation runs; the old one, delivered again, does not.
    await js.publish("job.h1.instance.new", msgspec.json.encode(job("new")), stream=JOB_STREAM)
    await agent.resync(js)
    assert driver.observe() == {"new": "running"}
    driver.close()


class HoldsNothing:
    """The driver protocol's observing half, for the drivers below that test the runtime
    (our own protocol, not a fake of an external component): they hold nothing."""

    blocking = True

    def observe(self) -> dict[str, str]:
        return {}

    def remove(self, entity_id: str) -> bool:
        return False

    def generations(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


class TimedDriver(HoldsNothing):
    """A driver whose every apply takes ``apply_s`` of its thread, as a hypervisor's
    call would; it records when each ran."""

    def __init__(self, apply_s: float) -> None:
        self.apply_s = apply_s
        self.runs: list[tuple[float, float]] = []  # (began, ended), monotonic

    def apply(self, entity_id: str, spec: Any, generation: int) -> str:
        began = time.monotonic()
        time.sleep(self.apply_s)
        self.runs.append((began, time.monotonic()))
        return "running"


async def test_a_resync_rests_between_entities(env: Env, js: JetStreamContext) -> None:
    """After each entity a resync rests three times as long as converging it took
    (RESYNC_DUTY): a pass never holds a core, and the jobs of other agents on the host
    (and of this one) are not kept waiting behind it."""
    driver = TimedDriver(0.03)
    agent = Agent(AgentConfig(env.nats_url, "paced", "test:///default"),
                  lambda: {"instance": driver})
    agent.drivers = {"instance": driver}  # what Agent.run would set up, without its loops
    agent.publisher = Publisher(js)
    spec = InstanceSpec(template=InstanceTemplate(**TINY), power="running", host="paced")
    for n in range(4):
        await js.publish(f"job.paced.instance.p{n}", msgspec.json.encode(Job(
            kind="instance", id=f"p{n}", host="paced", generation=1, spec=spec)),
            stream=JOB_STREAM)
    await agent.resync(js)
    assert len(driver.runs) == 4
    rest = (1 - RESYNC_DUTY) / RESYNC_DUTY
    for (began, ended), (following, _) in zip(driver.runs, driver.runs[1:], strict=False):
        assert following - ended >= rest * (ended - began)


class HeldDriver(HoldsNothing):
    """A driver whose apply of generation 1 runs until the runtime interrupts it (a live
    migration stands behind this hook); it records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, bool]] = []  # (what, generation, while held)
        self.holding = threading.Event()
        self.released = threading.Event()

    def apply(self, entity_id: str, spec: Any, generation: int) -> str:
        self.calls.append(("apply", generation, self.holding.is_set()))
        if generation == 1:
            self.holding.set()
            if not self.released.wait(30):
                return "never interrupted"
            self.holding.clear()
            raise PermanentDriverError("aborted: a newer job came")
        return "running"

    def interrupt(self, entity_id: str, spec: Any, generation: int) -> None:
        self.calls.append(("interrupt", generation, self.holding.is_set()))
        self.released.set()

    def close(self) -> None:
        self.released.set()


async def test_a_newer_job_interrupts_the_apply_it_would_wait_for(
        env: Env, js: JetStreamContext) -> None:
    """The runtime tells the driver of a newer job without waiting for the entity's lock
    (the older apply holds it); the older apply reports how it ended, then the newer one
    is applied."""
    driver = HeldDriver()
    agent = Agent(AgentConfig(env.nats_url, "h1", "test:///default", resync_s=3600),
                  lambda: {"instance": driver})
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    template = InstanceTemplate(vcpus=1, memory_mib=128, image="tiny")

    async def publish_job(generation: int) -> None:
        spec = InstanceSpec(template=template, power="running", host="h1")
        job = Job(kind="instance", id="a", host="h1", generation=generation, spec=spec)
        await js.publish("job.h1.instance.a", msgspec.json.encode(job), stream=JOB_STREAM)

    try:
        await publish_job(1)
        await eventually(lambda: asyncio.sleep(0, driver.holding.is_set()))
        await publish_job(2)

        async def reported() -> list[dict]:
            found = [msgspec.json.decode(m.data) async for batch in read_stream(
                js, CMD_STREAM, "cmd.*.h1.instance.a") for m in batch]
            return found if len(found) == 2 else []

        reports = await eventually(reported)
        assert [(r["type"], r["generation"]) for r in reports] == [("Failed", 1),
                                                                   ("Applied", 2)]
        assert reports[0]["error"].startswith("aborted")
        assert driver.calls == [("apply", 1, False), ("interrupt", 2, True),
                                ("apply", 2, False)]
        assert agent.applying == {}
    finally:
        stop.set()
        await running


async def test_300_instances_converge_across_3_agents(env: Env, js, pg, processes) -> None:
    start(processes, env)
    for host in HOSTS:
        agent(processes, env, host)
    await register(js, pg)
    pub = Publisher(js)
    ids = [f"vm{n}" for n in range(300)]
    await pub.publish_many([("user", command_from_dict(dict(
        type="CreateInstance", cmd_id=f"create-{i}", id=i, template=TINY))) for i in ids])
    await eventually(lambda: converged(pg, 300), timeout=120, interval=0.5)
    # Stop a third, delete a sixth (some of them stopped first).
    await pub.publish_many(
        [("user", command_from_dict(dict(type="StopInstance", cmd_id=f"stop-{i}", id=i)))
         for i in ids[:100]]
        + [("user", command_from_dict(dict(type="DeleteInstance", cmd_id=f"del-{i}", id=i)))
           for i in ids[50:100]])
    await eventually(lambda: pg.fetchval(
        "SELECT count(*) = 150 FROM history WHERE outcome->>'cmd_id' LIKE 'stop-%'"
        " OR outcome->>'cmd_id' LIKE 'del-%'"))
    await eventually(lambda: converged(pg, 300), timeout=120, interval=0.5)

    states = await instances(pg)
    for host in HOSTS:
        wanted = {i: s["power"] for i, s in states.items()
                  if s["host"] == host and s["status"] != "deleted"}
        assert wanted, f"nothing placed on {host}"
        # What libvirt really runs on the host is exactly what is wanted there ...
        assert await inventory(js, host) == wanted
        # ... and what the projection says was observed.
        assert {i: states[i]["observed"] for i in wanted} == wanted
    assert sum(1 for s in states.values() if s["status"] == "deleted") == 50
    assert all(s["observed"] == "absent" for s in states.values() if s["status"] == "deleted")
    # Every job was acked (with its report), and none had to come twice.
    for host in HOSTS:
        info = await js.consumer_info(JOB_STREAM, f"agent-{host}")
        assert (info.num_ack_pending, info.num_redelivered) == (0, 0), host
    # orch hosts: each host up, its live instances counted, its heartbeat recent.
    listed = subprocess.run([sys.executable, "-m", "orchestrator.cli", "hosts", "--json"],
                            env=env.environ(), capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    rows = [msgspec.json.decode(line) for line in listed.stdout.splitlines()]
    assert [r["id"] for r in rows] == list(HOSTS)
    assert all(r["condition"] == "up" for r in rows)
    assert sum(r["instances"] for r in rows) == 250
    now_ms = time.time() * 1000
    assert all(now_ms - r["last_heartbeat_ms"] < 5_000 for r in rows)


async def alerted(env: Env) -> dict[tuple[str, str], dict]:
    """What `orch alerts --json` lists, by (kind, id); it exits 1 exactly when there is any."""
    listed = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "orchestrator.cli", "alerts", "--json"],
        env=env.environ(), capture_output=True, text=True, timeout=30)
    alerts = {(a["kind"], a["id"]): a for a in map(msgspec.json.decode, listed.stdout.splitlines())}
    assert listed.returncode == (1 if alerts else 0), listed.stderr
    return alerts


async def test_killed_agent_is_marked_down_then_resyncs(env: Env, js, pg, processes) -> None:
    start(processes, env)
    agents = {host: agent(processes, env, host) for host in HOSTS}
    await register(js, pg)
    pub = Publisher(js)
    await pub.publish_many([("user", command_from_dict(dict(
        type="CreateInstance", cmd_id=f"c-{n}", id=f"vm{n}", template=TINY)))
        for n in range(60)])
    # SIGKILL h1's agent while jobs are arriving, before they are all applied.
    await eventually(lambda: pg.fetchval(
        "SELECT count(*) > 0 FROM history WHERE outcome->>'source' = 'h1'"),
        timeout=60, interval=0.05)
    os.killpg(agents["h1"].pid, signal.SIGKILL)
    agents["h1"].wait()
    await eventually(lambda: pg.fetchval(
        "SELECT state->>'condition' = 'down' FROM entities WHERE kind='host' AND id='h1'"),
        timeout=30)
    assert ("host", "h1") in await alerted(env)
    # Its hypervisor (test:///, in the agent's memory) is gone with it: the new boot must
    # rebuild everything placed there from the jobs, and say so in the host's timeline.
    agent(processes, env, "h1", name="agent-h1-again")
    await eventually(lambda: pg.fetchval(
        "SELECT state->>'condition' = 'up' FROM entities WHERE kind='host' AND id='h1'"),
        timeout=30)
    await eventually(lambda: converged(pg, 60), timeout=60, interval=0.5)
    assert ("host", "h1") not in await alerted(env)
    states = await instances(pg)
    on_h1 = {i: s["power"] for i, s in states.items() if s["host"] == "h1"}
    assert on_h1 and await inventory(js, "h1") == on_h1
    timeline = [msgspec.json.decode(r["outcome"]) for r in await pg.fetch(
        "SELECT outcome FROM history WHERE kind = 'host' AND id = 'h1' ORDER BY seq")]
    assert [o["type"] for o in timeline if o["events"]] == [
        "RegisterHost", "HostUp", "HostDown", "HostUp"]


def scrape(port: int, counter: str, *labels: str) -> dict:
    """An agent's counter, by its labels' values (one label: the value alone)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()

    def key(sample: Any) -> Any:
        values = tuple(sample.labels[label] for label in labels)
        return values[0] if len(values) == 1 else values

    return {key(s): s.value for family in text_string_to_metric_families(text)
            if family.name == counter for s in family.samples if s.name == f"{counter}_total"}


async def test_a_job_that_always_fails_degrades_and_alerts_while_others_converge(
        env: Env, js, pg, processes) -> None:
    start(processes, env)
    ports = free_ports(len(HOSTS))
    for host, port in zip(HOSTS, ports, strict=True):
        agent(processes, env, host, "--metrics-port", str(port))
    await register(js, pg)
    # Each attempt must reach an agent to be reported as Failed: none may be re-issued
    # while the agents are still starting (the JOB stream keeps only the newest one).
    await agents_running(js)
    pub = Publisher(js)
    await pub.publish_many(
        [("user", command_from_dict(dict(type="CreateInstance", cmd_id="bad", id="broken",
                                         template={**TINY, "image": "missing-image"})))]
        + [("user", command_from_dict(dict(type="CreateInstance", cmd_id=f"ok-{n}",
                                           id=f"ok{n}", template=TINY))) for n in range(20)])
    await eventually(lambda: pg.fetchval(
        "SELECT state->>'status' = 'degraded' FROM entities WHERE kind='instance'"
        " AND id='broken'"), timeout=90, interval=0.5)
    # Meanwhile every other instance converged (checked after: they are not held back,
    # they are done long before the broken one runs out of retries).
    states = await instances(pg)
    assert len(states) == 21
    assert all(s["observed"] == "running" for i, s in states.items() if i != "broken")
    outcomes = [msgspec.json.decode(r["outcome"]) for r in await pg.fetch(
        "SELECT outcome FROM history WHERE kind='instance' AND id='broken' ORDER BY seq")]
    events = [e for o in outcomes for e in o.get("events", ())]
    assert events.count("Reissued") == 2 and events[-1] == "Degraded"
    assert sum(1 for o in outcomes if o["type"] == "Failed") >= 3
    assert "does not exist" in states["broken"]["error"]
    [(key, alert)] = (await alerted(env)).items()  # exit 1: alerts present
    assert (key, alert["attempts"]) == (("instance", "broken"), 2)
    # The agents' metrics count the same: every job applied, and each failure reported.
    counts: dict[tuple[str, str], float] = {}
    for port in ports:
        jobs = await asyncio.to_thread(scrape, port, "orch_agent_jobs", "source", "outcome")
        for key, value in jobs.items():
            counts[key] = counts.get(key, 0) + value
    assert counts[("job", "applied")] >= 20
    assert counts[("job", "failed")] == sum(1 for o in outcomes if o["type"] == "Failed")


async def test_agents_ride_out_a_nats_server_restart(env: Env, js, pg, processes) -> None:
    """Heartbeats and resyncs that fail while the server is away are skipped, not fatal:
    the same agent processes converge what is asked once it is back."""
    start(processes, env)
    ports = dict(zip(HOSTS, free_ports(len(HOSTS)), strict=True))
    agents = {host: agent(processes, env, host, "--metrics-port", str(ports[host]))
              for host in HOSTS}
    await register(js, pg)
    pub = Publisher(js)

    def creates(numbers: range) -> list[tuple[str, object]]:
        return [("user", command_from_dict(dict(type="CreateInstance", cmd_id=f"c-{n}",
                                                id=f"vm{n}", template=TINY))) for n in numbers]

    await pub.publish_many(creates(range(30)))
    await eventually(lambda: converged(pg, 30), timeout=60, interval=0.5)
    env.nats.stop()
    await asyncio.sleep(7)  # longer than a publish waits for its ack: heartbeats fail
    env.nats.start()
    assert all(proc.poll() is None for proc in agents.values()), "an agent died"
    await pub.publish_many(creates(range(30, 60)))
    await eventually(lambda: converged(pg, 60), timeout=90, interval=0.5)
    states = await instances(pg)
    for host in HOSTS:
        assert await inventory(js, host) == {
            i: s["power"] for i, s in states.items() if s["host"] == host}
        # The outage really failed heartbeats, which the agent skipped.
        assert (await asyncio.to_thread(scrape, ports[host], "orch_agent_rounds_skipped",
                                        "duty"))["heartbeat"] >= 1


async def test_a_resync_while_the_hypervisor_does_not_answer_skips_that_round_only(
        env: Env, js: JetStreamContext, tmp_path: Path) -> None:
    """A libvirtd that is down (restarting, say) fails a resync's observe: that round is
    skipped and the agent goes on (its process once ended there, taking the host down)."""
    uri = f"qemu+unix:///system?socket={tmp_path / 'no-libvirtd'}"
    driver = VmDriver(uri, "h1", console_dir=tmp_path / "consoles")
    agent = Agent(AgentConfig(env.nats_url, "h1", uri), lambda: {"instance": driver})
    agent.drivers = {"instance": driver}  # what Agent.run would set up, without its loops
    agent.publisher = Publisher(js)
    try:
        await agent._unless_transient("resync", agent.resync(js))  # no exception
        with pytest.raises(RuntimeError):  # anything else still ends the agent
            await agent._unless_transient("resync", _failing())
    finally:
        driver.close()


async def _failing() -> None:
    raise RuntimeError("a bug")
