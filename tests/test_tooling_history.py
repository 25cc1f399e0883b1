"""`orch tail --diff` and `orch get --at`: an entity's history folded again, against a real
nats-server and PostgreSQL; `get --at` agrees with `replay --to`; bad input is one line."""

import asyncio
import datetime
import json

import asyncpg
import msgspec
from conftest import Env, Processes, eventually, settled
from nats.js import JetStreamContext
from test_cli import orch
from test_tooling_wait import on_a_tty

from events.subjects import CMD_STREAM

TINY = {"vcpus": 1, "memory_mib": 128, "image": "tiny"}


async def world(env: Env, js: JetStreamContext, pg: asyncpg.Connection,
                processes: Processes) -> list[int]:
    """A host, a network and an instance on it, stopped, stopped again (a no-op), started;
    every command folded. Returns the seqs of the commands published here."""
    environ = env.environ()
    # No agent: no report or re-issue moves the timelines while they are read.
    processes.orch("orchestrator", "--id", "r1", "--deadline", "3600", env=environ, name="r1")
    seqs = []
    for args in (["-s", "admin", "RegisterHost", "h1", "--set", "vcpus=8",
                  "--set", "memory_mib=8192"],
                 ["CreateNetwork", "net1", "--set", "vni=9", "--set", "cidr=10.9.0.0/24"],
                 ["CreateInstance", "vm1", "--json", json.dumps(
                     {"template": {**TINY, "nics": [{"network": "net1"}]}})],
                 ["StopInstance", "vm1"], ["StopInstance", "vm1"], ["StartInstance", "vm1"]):
        done = await orch(environ, "publish", *args, "--wait", "--json-out")
        assert done.returncode == 0, done.stderr
        seqs.append(json.loads(done.stdout)["seq"])
        await asyncio.sleep(0.02)  # distinct stored times, for the points between them
    await eventually(lambda: settled(pg, js))
    return seqs


async def test_tail_diff_shows_what_each_command_changed(
        env: Env, js: JetStreamContext, pg: asyncpg.Connection, processes: Processes) -> None:
    environ = env.environ()
    seqs = await world(env, js, pg, processes)
    stop, noop, start = seqs[3:]
    done = await orch(environ, "tail", "instance/vm1", "--diff", "--json")
    assert done.returncode == 0, done.stderr
    docs = {d["seq"]: d for d in map(json.loads, done.stdout.splitlines())}
    changes = {d["seq"]: {c["field"]: (c["before"], c["after"]) for c in d["changes"]}
               for d in docs.values()}
    state = msgspec.json.decode(await pg.fetchval(
        "SELECT state FROM entities WHERE kind = 'instance' AND id = 'vm1'"))
    assert changes[stop]["power"] == ("running", "stopped")
    gen = changes[stop]["generation"]
    assert gen[1] == gen[0] + 1
    assert changes[noop] == {}  # accepted, and nothing changed
    assert changes[start]["power"] == ("stopped", "running")
    assert changes[start]["generation"][1] == state["generation"]  # as the projection has it

    done = await orch(environ, "tail", "instance/vm1", "--diff")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.lstrip().startswith(f"{stop} "))
    block = lines[at + 1:next(i for i in range(at + 1, len(lines))
                              if not lines[i].startswith(" " * 8))]
    assert "        power: running → stopped" in block
    assert f"        generation: {gen[0]} → {gen[1]}" in block
    after_noop = lines[lines.index(next(x for x in lines if x.lstrip().startswith(f"{noop} ")))
                       + 1]
    assert after_noop.lstrip().startswith(f"{start} ")  # nothing under the no-op


async def test_get_at_agrees_with_replay_to(
        env: Env, js: JetStreamContext, pg: asyncpg.Connection, processes: Processes) -> None:
    environ = env.environ()
    seqs = await world(env, js, pg, processes)
    last = (await js.stream_info(CMD_STREAM)).state.last_seq
    times = [(await js.get_msg(CMD_STREAM, s)).time for s in (seqs[2], seqs[3])]
    assert all(times)
    between = times[0] + (times[1] - times[0]) / 2
    before_creation = times[0] - datetime.timedelta(microseconds=1)  # vm1's CreateInstance
    points = [str(seqs[0]), str(seqs[2]), str(seqs[3] + 1), str(last), between.isoformat(),
              before_creation.isoformat()]
    entities = [("instance", "vm1"), ("network", "net1"), ("host", "h1"),
                ("scheduler", "default")]
    compared = 0
    for point in points:
        done = await orch(environ, "replay", "--to", point, "--schema", "at_check", "--json")
        assert done.returncode == 0, done.stderr
        replayed = {(r["kind"], r["id"]): msgspec.json.decode(r["state"]) for r in
                    await pg.fetch("SELECT kind, id, state FROM at_check.entities")}
        for kind, id_ in entities:
            done = await orch(environ, "get", f"{kind}/{id_}", "--at", point, "--json")
            if (kind, id_) not in replayed:
                assert done.returncode == 1, (point, kind, done.stdout)
                assert "did not exist yet" in done.stderr and done.stderr.count("\n") == 1
                continue
            assert done.returncode == 0, (point, kind, done.stderr)
            assert json.loads(done.stdout)["state"] == replayed[kind, id_], (point, kind)
            compared += 1
    assert compared >= 15
    # Before its creation the instance did not exist, a moment later it did.
    done = await orch(environ, "get", "instance/vm1", "--at", before_creation.isoformat())
    assert done.returncode == 1 and "did not exist yet" in done.stderr
    done = await orch(environ, "get", "instance/vm1", "--at", str(seqs[2]))
    assert done.returncode == 0 and f"instance/vm1 as of seq {seqs[2]}" in done.stdout
    await pg.execute("DROP SCHEMA at_check CASCADE")


async def test_bad_input_is_one_line_and_exit_2(
        env: Env, js: JetStreamContext, pg: asyncpg.Connection, processes: Processes) -> None:
    environ = env.environ()
    await world(env, js, pg, processes)
    first = (await js.get_msg(CMD_STREAM, 1)).time
    assert first is not None
    future = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)).isoformat()
    for args, needle in [
        (("trace", "99999"), "no command at seq 99999"),
        (("trace", "no-such-key"), "no folded command has cmd id 'no-such-key'"),
        (("trace", "bad key!"), "neither a seq nor a cmd id"),
        (("get", "instance/vm1", "--at", future), "is in the future"),
        (("get", "instance/vm1", "--at", (first - datetime.timedelta(seconds=5)).isoformat()),
         "before the log's first command"),
        (("get", "instance/vm1", "--at", "99999"), "past the log's end"),
        (("get", "instance/vm1", "--at", "03:12 yesterday"), "neither a sequence nor"),
        (("get", "instance", "--at", "1"), "give KIND/ID"),
        (("log", "--since", "last tuesday"), "neither a sequence nor"),
        (("log", "--since", future), "is in the future"),
        (("log", "--kind", "vm"), "unknown kind 'vm'"),
    ]:
        done = await orch(environ, *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stderr.startswith("error: ") and needle in done.stderr, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and done.stdout == "", args


async def test_replay_verify_names_the_fields_that_differ(
        env: Env, js: JetStreamContext, pg: asyncpg.Connection, processes: Processes) -> None:
    environ = env.environ()
    await world(env, js, pg, processes)
    done = await orch(environ, "replay", "--verify")
    assert done.returncode == 0 and "verify: OK" in done.stdout, done.stdout + done.stderr
    assert done.stderr == ""  # on a pipe: no progress
    code, drawn = await asyncio.to_thread(on_a_tty, environ, "replay", "--verify")
    assert code == 0 and "commands/s" in drawn, drawn  # its bar, on a TTY
    # The projection tampered with behind the fold's back: one field, and one entity gone.
    await pg.execute("UPDATE entities SET state = jsonb_set(state, '{power}', '\"paused\"')"
                     " WHERE kind = 'instance' AND id = 'vm1'")
    await pg.execute("DELETE FROM entities WHERE kind = 'network' AND id = 'net1'")
    done = await orch(environ, "replay", "--verify")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "verify: FAILED, 2 entities differ (live → replayed):" in done.stdout
    lines = done.stdout.splitlines()
    at = lines.index("instance/vm1")
    assert lines[at + 1] == "        power: paused → running"
    assert lines[lines.index("network/net1") + 1] == "        only in the replay"
    done = await orch(environ, "replay", "--verify", "--json")
    doc = json.loads(done.stdout)
    assert doc["verified"] is False
    assert doc["differences"]["instance/vm1"] == [
        {"field": "power", "live": "paused", "replayed": "running"}]
    assert {c["field"] for c in doc["differences"]["network/net1"]} >= {"vni", "cidr"}
