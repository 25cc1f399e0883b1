"""`orch publish --wait` and `orch trace`, as subprocesses against a real nats-server and
PostgreSQL, with replicas and (test:///) agents."""

import asyncio
import contextlib
import json
import os
import pty
import subprocess

import asyncpg
from conftest import Env, Processes
from nats.js import JetStreamContext
from test_cli import ORCH, orch

from events.heartbeats import read_heartbeats
from tests.conftest import eventually

TINY = {"vcpus": 1, "memory_mib": 128, "image": "tiny"}


def replica(processes: Processes, env: Env, *extra: str) -> None:
    processes.orch("orchestrator", "--id", "r1", *extra, env=env.environ(), name="r1")


async def register(environ: dict[str, str], *hosts: str) -> None:
    for host in hosts:
        done = await orch(environ, "publish", "-s", "admin", "RegisterHost", host,
                          "--set", "vcpus=64", "--set", "memory_mib=65536", "--wait")
        assert done.returncode == 0, done.stderr


async def test_wait_prints_the_outcome_accepted_or_rejected(
        env: Env, js: JetStreamContext, processes: Processes) -> None:
    environ = env.environ()
    replica(processes, env, "--deadline", "3600")
    net = ["CreateNetwork", "net1", "--set", "vni=5", "--set", "cidr=10.5.0.0/24"]
    done = await orch(environ, "publish", *net, "--wait")
    assert done.returncode == 0, done.stderr
    assert "network/net1" in done.stdout and "ACCEPTED Created" in done.stdout
    assert "-> registry/vnis:ReserveVni" in done.stdout  # its follow-up, named

    done = await orch(environ, "publish", "DeleteNetwork", "ghost", "--wait")
    assert done.returncode == 1
    assert "REJECTED no network ghost" in done.stdout
    assert done.stderr == "error: 1 failure(s): rejected: no network ghost\n"

    lines = "".join(json.dumps(d) + "\n" for d in [
        {"type": "CreateNetwork", "id": "net2", "vni": 6, "cidr": "10.6.0.0/24"},
        {"type": "DeleteNetwork", "id": "ghost"},
        {"type": "DeleteNetwork", "id": "net2"}])
    done = await orch(environ, "publish", "-f", "-", "--wait", stdin=lines)
    assert done.returncode == 1, done.stderr
    out = done.stdout.splitlines()
    assert len(out) == 4 and out[-1] == "3 commands: 2 accepted, 1 rejected"
    assert "network/ghost" in out[1] and "REJECTED" in out[1]

    done = await orch(environ, "publish", "-f", "-", "--wait", "--json-out",
                      stdin=lines.replace("net2", "net3").replace('"vni": 6', '"vni": 7'))
    docs = [json.loads(line) for line in done.stdout.splitlines()]
    assert [d["status"] for d in docs] == ["accepted", "rejected", "accepted"]
    assert docs[0]["outcome"]["events"] == ["Created"] and docs[0]["seq"] == docs[0][
        "outcome"]["seq"]


async def test_wait_applied_times_out_naming_what_is_missing(
        env: Env, js: JetStreamContext, processes: Processes) -> None:
    """No agent runs on h1: the job of vm1 is never applied."""
    environ = env.environ()
    replica(processes, env, "--deadline", "3600")
    await register(environ, "h1")
    done = await orch(environ, "publish", "CreateInstance", "vm1", "--json",
                      json.dumps({"template": TINY}), "--wait", "applied", "--timeout", "3")
    assert done.returncode == 124, done.stderr
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: timed out after 3 s waiting for: job.h1.instance.vm1"
                                  " generation 1 attempt 0: no report yet")
    # The outcome so far is printed all the same: the placement and the job.
    assert "CreateInstance instance/vm1" in done.stdout and "Placed" in done.stdout
    assert "pending" in done.stdout

    done = await orch(environ, "publish", "StopInstance", "vm1", "--wait", "--timeout", "10")
    assert done.returncode == 0, done.stderr  # only the outcome was asked for

    # On a TTY a wait longer than a second shows what it waits for; on a pipe (above) not.
    code, shown = await asyncio.to_thread(
        on_a_tty, environ, "publish", "StartInstance", "vm1", "--wait", "applied",
        "--timeout", "2.5")
    assert code == 124
    assert "waiting for 1 of 1 command(s): job.h1.instance.vm1" in shown


def on_a_tty(environ: dict[str, str], *args: str) -> tuple[int, str]:
    """Run `orch ARGS` with its stderr on a pseudo-terminal; its exit code and what it drew."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen([*ORCH, *args], env={**environ, "TERM": "xterm"},
                                stdout=subprocess.DEVNULL, stderr=follower)
        os.close(follower)
        drawn = b""
        with contextlib.suppress(OSError):  # EIO once the process has closed its end
            while chunk := os.read(leader, 65536):
                drawn += chunk
        return proc.wait(30), drawn.decode(errors="replace")
    finally:
        os.close(leader)


async def test_wait_applied_returns_once_every_member_is_applied_or_fails_clearly(
        env: Env, js: JetStreamContext, pg: asyncpg.Connection, processes: Processes) -> None:
    environ = env.environ()
    replica(processes, env, "--deadline", "2", "--max-attempts", "1")
    processes.orch("agent", "--host", "h1", "--libvirt", "test", env=environ, name="agent-h1")
    await eventually(lambda: _beating(js, "h1"), timeout=60)
    await register(environ, "h1")

    done = await orch(environ, "publish", "CreatePool", "p1", "--json",
                      json.dumps({"template": TINY, "size": 3}), "--wait", "applied",
                      "--timeout", "60")
    assert done.returncode == 0, done.stdout + done.stderr
    # Returned only once each member's report is folded: true now, without waiting.
    rows = await pg.fetch("SELECT id, (state->>'generation')::int AS g,"
                          " (state->>'observed_generation')::int AS o FROM entities"
                          " WHERE kind = 'instance' ORDER BY id")
    assert [r["id"] for r in rows] == ["p1-0", "p1-1", "p1-2"]
    assert all(r["g"] >= 1 and r["o"] >= r["g"] for r in rows), rows
    for member in ("p1-0", "p1-1", "p1-2"):
        assert f"CreateInstance instance/{member}" in done.stdout
        assert f"job.h1.instance.{member}" in done.stdout
    assert done.stdout.count("Applied instance/") >= 3
    assert "pending" not in done.stdout and "MISSING" not in done.stdout

    done = await orch(environ, "publish", "CreateInstance", "broken", "--json",
                      json.dumps({"template": {**TINY, "image": "missing-image"}}),
                      "--wait", "applied", "--timeout", "60", "--json-out")
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.startswith("error: ") and "instance/broken degraded" in done.stderr
    doc = json.loads(done.stdout)
    assert doc["status"] == "failed"
    types = [n.get("type") for n in _nodes(doc["trace"])]
    assert "Failed" in types and "Reconcile" in types


async def _beating(js: JetStreamContext, host: str) -> bool:
    return host in await read_heartbeats(js)


def _nodes(doc: dict) -> list[dict]:
    return [doc, *(n for c in doc.get("children", ()) for n in _nodes(c))]
