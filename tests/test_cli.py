"""`orch` end to end: the CLI as a subprocess against a real nats-server and PostgreSQL."""

import asyncio
import contextlib
import datetime
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from conftest import Env, Processes, eventually
from nats.js import JetStreamContext

from events.bus import connect
from events.subjects import CMD_STREAM
from orchestrator import queries
from orchestrator.fabric import unavailable

ORCH = [sys.executable, "-m", "orchestrator.cli"]
ANSI = "\x1b["
VM_TEMPLATE = {"vcpus": 1, "memory_mib": 256, "image": "debian-12"}


async def orch(environ: dict[str, str], *args: str, stdin: str = "", cwd: Path | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `orch ARGS` to completion without blocking the event loop."""
    return await asyncio.to_thread(
        subprocess.run, [*ORCH, *args], input=stdin, env=environ, cwd=cwd,
        capture_output=True, text=True, timeout=timeout,
    )


def jsonl(*docs: dict) -> str:
    return "".join(json.dumps(d) + "\n" for d in docs)


async def stored(js: JetStreamContext) -> int:
    return (await js.stream_info(CMD_STREAM)).state.messages


async def entity(conn: asyncpg.Connection, kind: str, id_: str) -> dict | None:
    try:
        row = await queries.get_entity(conn, kind, id_)
    except asyncpg.UndefinedTableError:  # the replica has not migrated yet
        return None
    return row.state if row else None


async def read_line(proc: asyncio.subprocess.Process, timeout: float = 30) -> str:
    assert proc.stdout is not None and proc.stderr is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    if not line:
        errors = await asyncio.wait_for(proc.stderr.read(), timeout)
        raise AssertionError(f"stdout closed; stderr: {errors.decode()!r}")
    return line.decode()


def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        os.killpg(proc.pid, signal.SIGKILL)


async def test_publish_get_tail_replay(env: Env, js: JetStreamContext, pg: asyncpg.Connection,
                                       processes: Processes) -> None:
    environ = env.environ()
    # No agent here: the reconciler must not re-issue jobs into the timelines read below.
    replica = processes.orch("orchestrator", "--id", "r1", "--deadline", "3600", env=environ,
                             name="replica")

    done = await orch(environ, "publish", "RegisterHost", "h1", "--source", "admin",
                      "--set", "vcpus=8", "--set", "memory_mib=16384")
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"published RegisterHost host/h1 seq=\d+\n", done.stdout)

    lines = jsonl(
        {"type": "CreateNetwork", "id": "net1", "vni": 7, "cidr": "10.7.0.0/24"},
        {"type": "CreateInstance", "id": "vm1",
         "template": {**VM_TEMPLATE, "nics": [{"network": "net1"}]}},
        {"type": "CreateInstance", "id": "vm1", "template": VM_TEMPLATE},  # refused: exists
        {"type": "StopInstance", "id": "vm1", "source": "user", "cmd_id": "stop-vm1"},
    )
    done = await orch(environ, "publish", "--file", "-", "--json-out", stdin=lines)
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["type"] for r in results] == [
        "CreateNetwork", "CreateInstance", "CreateInstance", "StopInstance"]
    seqs = [r["seq"] for r in results]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    assert not any(r["duplicate"] for r in results)

    # The same idempotency key again: stored once, reported as a duplicate.
    done = await orch(environ, "publish", "StopInstance", "vm1", "--key", "stop-vm1")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"duplicate StopInstance instance/vm1 seq={seqs[3]}\n"
    # The same key for another command is dropped by the server too: that is an error.
    done = await orch(environ, "publish", "StartInstance", "vm1", "--key", "stop-vm1",
                      "--json-out")
    assert done.returncode == 1
    assert json.loads(done.stdout)["conflict"] is True
    assert done.stderr == (f"error: 1 command(s) not published: idempotency key 'stop-vm1' of"
                           f" instance/vm1 was already used for a different command"
                           f" (seq {seqs[3]}); use a new --key\n")

    async def settled() -> bool:
        state = await entity(pg, "instance", "vm1")
        return bool(state) and state["status"] == "placed" and state["power"] == "stopped"

    await eventually(settled)

    done = await orch(environ, "get", "instance/vm1")
    assert done.returncode == 0, done.stderr
    assert ANSI not in done.stdout  # piped: no colours
    for word in ("instance/vm1", "placed", "h1", "stopped", "template.image", "debian-12"):
        assert word in done.stdout

    done = await orch(environ, "get", "instance/vm1", "--json")
    doc = json.loads(done.stdout)
    assert (doc["kind"], doc["id"], doc["state"]["host"]) == ("instance", "vm1", "h1")

    done = await orch(environ, "get", "instances")
    assert done.returncode == 0, done.stderr
    assert re.search(r"vm1\s+.*placed\s+.*h1\s+.*stopped", done.stdout)

    done = await orch(environ, "get", "instance/ghost")
    assert (done.returncode, done.stderr) == (1, "error: no instance/ghost\n")
    done = await orch(environ, "get", "vm/x")
    assert done.returncode == 2 and done.stderr.startswith("error: unknown kind 'vm'")

    done = await orch(environ, "tail", "instance/vm1", "--json")
    assert done.returncode == 0, done.stderr
    outcomes = [json.loads(line) for line in done.stdout.splitlines()]
    seen = [(o["type"], o["accepted"]) for o in outcomes]
    assert seen[:2] == [("CreateInstance", True), ("CreateInstance", False)]
    # The address and placement (follow-ups) and the stop race: any may be folded first.
    assert sorted(seen[2:]) == [("NicAddressed", True), ("Placed", True), ("StopInstance", True)]
    assert "already exists" in outcomes[1]["reason"]
    assert outcomes[0]["commands"] == ["network/net1:AttachPort"]
    assert [o["seq"] for o in outcomes] == sorted(o["seq"] for o in outcomes)

    done = await orch(environ, "tail", "instance/vm1")
    assert done.returncode == 0, done.stderr
    assert ANSI not in done.stdout
    assert len(done.stdout.splitlines()) == 5
    assert re.search(r"CreateInstance\s+REJECTED instance vm1 already exists", done.stdout)
    assert "jobs: job.h1.instance.vm1" in done.stdout
    # On a pipe, a timeline loads nothing that only other verbs need: its imports were most
    # of its time.
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-X", "importtime", *ORCH[1:], "tail", "instance/vm1"],
        env=environ, capture_output=True, text=True, timeout=60)
    loaded = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
    assert "asyncpg" in loaded
    assert not loaded & {"nats", "structlog", "rich", "pydantic", "orchestrator.deciders"}

    done = await orch(environ, "replay", "--verify")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verify: OK" in done.stdout
    done = await orch(environ, "replay", "--verify", "--json", "--schema", "replay2")
    report = json.loads(done.stdout)
    assert report["verified"] is True and report["commands"] >= 9

    done = await orch(environ, "dead-letters")
    assert (done.returncode, done.stdout) == (0, "no dead letters\n")

    # SIGTERM is a clean stop: exit 0, and the JSON log says so.
    os.killpg(replica.pid, signal.SIGTERM)
    assert await asyncio.to_thread(replica.wait, 15) == 0
    events = [json.loads(line)["event"]
              for line in (env.root / "replica.log").read_text().splitlines()
              if line.startswith("{")]
    assert events[0] == "replica_started" and events[-1] == "replica_stopped"


async def test_invalid_input_publishes_nothing(env: Env, js: JetStreamContext) -> None:
    environ = env.environ()
    before = await stored(js)

    lines = jsonl(
        {"type": "CreateNetwork", "id": "net1", "vni": 7, "cidr": "10.7.0.0/24"},
        {"type": "StopInstance", "id": "vm1"},
        {"type": "CreateInstance", "id": "vm1", "template": {**VM_TEMPLATE, "vcpus": "two"}},
    )
    done = await orch(environ, "publish", "--file", "-", stdin=lines)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: line 3: CreateInstance: Expected `int`, got `str`")
    assert "$.template.vcpus" in done.stderr

    done = await orch(environ, "publish", "-f", "-", stdin='{"type": "StopInstance"\n')
    assert done.returncode == 2 and done.stderr.startswith("error: line 1: not valid JSON")

    not_utf8 = env.root / "latin1.jsonl"
    not_utf8.write_bytes(b'{"type": "StopInstance", "id": "caf\xe9"}\n')
    done = await orch(environ, "publish", "-f", str(not_utf8))
    assert (done.returncode, done.stderr) == (
        2, f"error: {not_utf8} is not UTF-8: byte 35 is 0xe9\n")
    deep = "[" * 5000 + "]" * 5000
    done = await orch(environ, "publish", "-f", "-", stdin=deep + "\n")
    assert (done.returncode, done.stderr) == (2, "error: line 1: JSON nested too deeply\n")
    done = await orch(environ, "publish", "StopInstance", "vm1", "--json", f'{{"x": {deep}}}')
    assert (done.returncode, done.stderr) == (2, "error: --json: JSON nested too deeply\n")

    done = await orch(environ, "publish", "CreateInstance", "vm1", "--json",
                      json.dumps({"template": VM_TEMPLATE}), "--set", "template.memory_mib=1")
    assert done.returncode == 2 and "$.template.memory_mib" in done.stderr
    assert done.stderr.count("\n") == 1

    for args, needle in [
        (("StopInstance", "VM 1"), "$.id"),
        (("StopInstance", "vm1", "--set", "powr=stopped"), "unknown field `powr`"),
        (("StopInstance", "vm1", "--json", '{"v": 1, "v": 2}'), "duplicate field `v`"),
        (("StopInstance", "vm1", "--set", "v=0"), "`$.v`"),
        (("Reboot", "vm1"), "unknown command type 'Reboot'"),
        (("RegisterHost", "h1", "--set", "vcpus=8", "--set", "memory_mib=1024"),
         "may not come from source 'user'"),
        ((), "nothing to publish"),
    ]:
        done = await orch(environ, "publish", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("error: ") and needle in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1

    assert await stored(js) == before


async def test_tail_follow_shows_new_commands(env: Env, js: JetStreamContext,
                                              processes: Processes) -> None:
    environ = env.environ()
    processes.orch("orchestrator", env=environ, name="replica")
    tail = await asyncio.create_subprocess_exec(
        *ORCH, "tail", "instance/vm2", "--follow", "--json", env=environ,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert tail.stderr is not None
        await asyncio.sleep(1.0)  # let it reach the follow phase before anything exists
        assert tail.returncode is None

        done = await orch(environ, "publish", "CreateInstance", "vm2",
                          "--json", json.dumps({"template": VM_TEMPLATE}))
        assert done.returncode == 0, done.stderr
        first = json.loads(await read_line(tail))
        assert (first["type"], first["id"], first["accepted"]) == ("CreateInstance", "vm2", True)
        # No host registered: the scheduler answers, and that shows up too.
        second = json.loads(await read_line(tail))
        assert second["type"] == "PlacementFailed" and second["source"] == "system"

        done = await orch(environ, "publish", "StartInstance", "vm2")
        assert done.returncode == 0, done.stderr
        third = json.loads(await read_line(tail))
        assert third["type"] == "StartInstance" and third["seq"] > second["seq"]

        tail.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(tail.wait(), 10) == 0
        assert await tail.stderr.read() == b""
    finally:
        stop(tail)
        await tail.wait()


async def test_schema(tmp_path: Path) -> None:
    done = await orch(dict(os.environ), "schema")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    for name in ("CreateInstance", "RegisterHost", "Outcome", "Job_InstanceSpec_",
                 "Job_NetworkSpec_", "NicSpec", "RemotePort"):
        assert name in doc["$defs"]

    out = tmp_path / "schema.json"
    done = await orch(dict(os.environ), "schema", "--out", str(out))
    assert done.returncode == 0 and json.loads(out.read_text()) == doc


async def test_no_stack_is_one_line(tmp_path: Path) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    environ["ORCH_HOME"] = str(tmp_path / "nowhere")
    done = await orch(environ, "get", "host")
    assert done.returncode == 1
    assert done.stderr.startswith("error: no stack found") and done.stderr.count("\n") == 1

    done = await orch(environ, "--nats", "nats://127.0.0.1:1", "publish", "StopInstance", "vm1")
    assert done.returncode == 1
    assert done.stderr.startswith("error: cannot connect to NATS at nats://127.0.0.1:1")


@pytest.mark.parametrize("servers", [1, 3])
async def test_up_then_stop(tmp_path: Path, servers: int) -> None:
    root = tmp_path / "stack"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    up = await asyncio.create_subprocess_exec(
        *ORCH, "up", "--dir", str(root), "--servers", str(servers), env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )
    try:
        exports = ""
        while not exports.startswith("export "):
            exports = await read_line(up, timeout=60)
        assert "ORCH_NATS_URL=nats://127.0.0.1:" in exports
        assert "ORCH_PG_DSN=postgresql://" in exports
        assert (root / "stack.json").exists()

        again = await orch(environ, "up", "--dir", str(root))
        assert again.returncode == 1 and "already running" in again.stderr

        # The stack file is enough for the other verbs.
        done = await orch({**environ, "ORCH_HOME": str(root)}, "publish", "StopInstance", "vm1")
        assert done.returncode == 0, done.stderr
        url = exports.split("ORCH_NATS_URL=")[1].split()[0]
        nc = await connect(url, "test")
        try:
            info = await nc.jetstream().stream_info(CMD_STREAM)
            assert (info.config.num_replicas, info.state.messages) == (servers, 1)
        finally:
            await nc.close()

        # A server of the stack dies: `up` reaps it, says so, and starts it again.
        killed = json.loads((root / "stack.json").read_text())["nats_pids"][0]
        os.kill(killed, signal.SIGKILL)
        assert up.stderr is not None
        warning = (await asyncio.wait_for(up.stderr.readline(), 30)).decode()
        assert re.fullmatch(r"warning: nats-server nats://127\.0\.0\.1:\d+ exited with code -9;"
                            r" restarted as pid \d+\n", warning), warning
        record = json.loads((root / "stack.json").read_text())
        assert killed not in record["nats_pids"] and record["nats_pids"][0] == int(
            warning.split()[-1])
        done = await orch({**environ, "ORCH_HOME": str(root)}, "publish", "StopInstance", "vm1")
        assert done.returncode == 0, done.stderr

        up.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(up.wait(), 60) == 0
        assert not (root / "stack.json").exists()
    finally:
        # The servers run in sessions of their own: a failed test stops them through `up`.
        if up.returncode is None:
            up.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(up.wait(), 60)
        stop(up)
        await up.wait()


async def test_demo(tmp_path: Path) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    done = await orch(environ, "demo", cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert ANSI not in out
    timeline = out.split("timeline of instance/vm1", 1)[1].split("timeline of network", 1)[0]
    assert re.search(r"CreateInstance\s+ACCEPTED Created", timeline)
    assert re.search(r"Placed\s+ACCEPTED PlacedOn", timeline)
    assert re.search(r"StopInstance\s+ACCEPTED PowerSet", timeline)
    assert "REJECTED CreateInstance: Object missing required field `template`" in timeline
    assert "REJECTED network net1 has 1 members: vm1" in out
    assert re.search(r"web\s+.*active\s+.*5\s+.*5\s+.*lb1", out)
    if unavailable() is None:  # on the fabric: packets crossed hosts on net2
        assert re.search(r"app1 \S+ on (h\d) .* app2 \S+ on (?!\1)h\d", out), out
        assert re.search(r"ping \S+: 3 packets transmitted, 3 received", out), out
        assert re.search(r"tcp app1 -> \S+:8080 answered: 'app2'", out), out
        assert re.search(r"tcp app2 -> \S+:8080 answered: 'app1'", out), out
        assert "orch get network/net2" in out and "orch hosts" in out
        # app2 migrated onto app1's host, and answers there.
        assert re.search(r"Applied\s+ACCEPTED Switched", out), out
        assert re.search(r"tcp app1 -> \S+:8080 answered 'app2', now on h\d", out), out
        assert "namespaces removed" in out
    else:
        assert "skipped (no ping, no TCP: the hosts are not namespaces here)" in out
        assert "skipped: libvirt's test driver does not migrate" in out
    assert not (tmp_path / ".orch" / "demo").exists()


async def test_replay_to_a_sequence_or_a_time(env: Env, js: JetStreamContext,
                                              pg: asyncpg.Connection) -> None:
    """`replay --to` folds a prefix of the log: up to a sequence, or up to a moment."""
    environ = env.environ()

    async def replayed(to: str) -> tuple[dict, set[str]]:
        done = await orch(environ, "replay", "--to", to, "--json")
        assert done.returncode == 0, done.stderr
        nets = await pg.fetch("SELECT id FROM replay.entities WHERE kind = 'network'"
                              " AND state->>'status' <> 'deleted'")
        return json.loads(done.stdout), {r["id"] for r in nets}

    def net(id_: str, vni: int) -> dict:
        return {"type": "CreateNetwork", "id": id_, "vni": vni, "cidr": f"10.{vni}.0.0/24"}

    done = await orch(environ, "publish", "--file", "-", "--json-out",
                      stdin=jsonl(net("n1", 1), net("n2", 2)))
    assert done.returncode == 0, done.stderr
    first = [json.loads(line)["seq"] for line in done.stdout.splitlines()]
    before = (await js.get_msg(CMD_STREAM, first[0])).time
    between = (await js.get_msg(CMD_STREAM, first[-1])).time
    await asyncio.sleep(0.05)  # stored timestamps: the next batch is clearly later
    done = await orch(environ, "publish", "--file", "-", stdin=jsonl(
        net("n3", 3), {"type": "DeleteNetwork", "id": "n1"}))
    assert done.returncode == 0, done.stderr
    assert before is not None and between is not None

    report, nets = await replayed(str(first[0]))
    assert (report["commands"], report["last_seq"], nets) == (1, first[0], {"n1"})
    report, nets = await replayed(between.isoformat())
    assert (report["commands"], report["last_seq"], nets) == (2, first[-1], {"n1", "n2"})
    # A time with no zone is UTC; one before the first command folds nothing.
    earlier = (before - datetime.timedelta(seconds=1)).astimezone(datetime.UTC)
    report, nets = await replayed(earlier.replace(tzinfo=None).isoformat())
    assert (report["commands"], nets) == (0, set())
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    report, nets = await replayed(later.isoformat())
    assert (report["commands"], nets) == (4, {"n2", "n3"})

    for bad in ("yesterday", "0"):
        done = await orch(environ, "replay", "--to", bad)
        assert done.returncode == 2 and done.stderr.startswith("error: --to:"), done.stderr
        assert len(done.stderr.splitlines()) == 1
