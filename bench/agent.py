"""One agent alone: the CPU it spends per job, with nothing else folding or relaying.

    .venv/bin/python bench/agent.py [--rate 170] [--jobs 3000] [--instances 100]

A private nats-server (no PostgreSQL, no replica) in a temporary directory and one agent
process (`python -m agents --libvirt test`). The benchmark plays the orchestrator's relay:
it puts one job per instance on the JOB stream and waits for the agent's reports, then
publishes ``--jobs`` more on a fixed schedule, each flipping an instance's power at the
next generation, and waits until every report is in CMD. It prints the agent's CPU per
job and in cores. 170 jobs/s is one agent's share of bench/converge.py's 500 cmd/s over
three hosts. At exit, even on failure or Ctrl-C, the agent and the server are stopped and
the directory removed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import harness
import uvloop
from nats.js import JetStreamContext
from proctree import proc_stats, tree_cpu_seconds

from events.bus import connect
from events.subjects import CMD_STREAM
from events.topology import ensure_topology
from orchestrator.children import Children
from orchestrator.embedded import NatsServer
from orchestrator.fold import job_subject
from schemas.codec import encode
from schemas.jobs import Job
from schemas.specs import InstanceSpec, InstanceTemplate

HOST = "h1"
TEMPLATE = InstanceTemplate(vcpus=1, memory_mib=128, image="tiny")
REPORTS_TIMEOUT_S = 60.0


def job(instance: int, generation: int) -> Job:
    power = "running" if generation % 2 else "stopped"
    return Job(kind="instance", id=f"vm{instance}", host=HOST, generation=generation,
               spec=InstanceSpec(template=TEMPLATE, power=power, host=HOST))


async def put(js: JetStreamContext, j: Job) -> None:
    await js.publish(job_subject(j), encode(j))


async def reports_reach(js: JetStreamContext, count: int, children: Children) -> None:
    deadline = time.monotonic() + REPORTS_TIMEOUT_S
    while (await js.stream_info(CMD_STREAM)).state.messages < count:
        children.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} reports after {REPORTS_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.02)


async def bench(args: argparse.Namespace, nats: NatsServer, children: Children) -> None:
    nc = await connect(nats.url, "bench-agent")
    try:
        js = nc.jetstream()
        await ensure_topology(js)
        children.start("agent", "agents", "--host", HOST, "--libvirt", "test",
                       "--nats", nats.url)
        for i in range(args.instances):
            await put(js, job(i, 1))
        await reports_reach(js, args.instances, children)
        agent = [children.procs["agent"].pid]
        cpu0, t0 = tree_cpu_seconds(proc_stats(), agent), time.perf_counter()
        for k in range(args.jobs):
            await put(js, job(k % args.instances, 2 + k // args.instances))
            await asyncio.sleep(max(0.0, t0 + (k + 1) / args.rate - time.perf_counter()))
        await reports_reach(js, args.instances + args.jobs, children)
        seconds = time.perf_counter() - t0
        cpu = tree_cpu_seconds(proc_stats(), agent) - cpu0
        print(f"{args.jobs:,} jobs at {args.rate:,.0f}/s over {args.instances} instances"
              f" (libvirt test:///): agent CPU {1000 * cpu / args.jobs:.3f} ms per job,"
              f" {cpu / seconds:.2f} cores")
    finally:
        await nc.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=170.0, help="jobs per second")
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--instances", type=int, default=100)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="orch-bench-agent-"))
    nats = NatsServer(tmp / "nats")
    children = Children(tmp, dict(os.environ))

    def body() -> None:
        nats.start()
        uvloop.run(bench(args, nats, children))

    def cleanup() -> None:
        children.stop()
        nats.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    return harness.run(body, cleanup)


if __name__ == "__main__":
    sys.exit(main())
