"""`orch get --at` and `orch trace` fold an entity from a snapshot of the projection where
one can serve (the current code's, its checkpoint of the entity's partition at or before
the point), against a real nats-server and PostgreSQL: they agree with `replay --to` and
with the fold from the first command, whether a snapshot served, was of other code, or
came after the point."""

import json

import asyncpg
import msgspec
from conftest import Env, Processes, eventually, settled
from nats.js import JetStreamContext
from test_cli import orch
from test_tooling_history import world

from events.subjects import CMD_STREAM, partition_of
from orchestrator.snapshots import CODE_VERSION

PARTITIONS = 8


async def snapshot(environ: dict[str, str], pg: asyncpg.Connection) -> tuple[int, int]:
    """A snapshot taken now; its id and its checkpoint of vm1's partition."""
    done = await orch(environ, "snapshot", "--keep", "10", "--json")
    assert done.returncode == 0, done.stderr
    id_ = json.loads(done.stdout)["id"]
    checkpoints = await pg.fetchval("SELECT checkpoints FROM snapshots WHERE id = $1", id_)
    return id_, checkpoints[partition_of("instance", "vm1", PARTITIONS)]


async def tamper(pg: asyncpg.Connection, snapshot_id: int, value: object,
                 field: str = "power") -> None:
    """vm1's row in the snapshot gets ``value`` in ``field``: a state the fold never had."""
    await pg.execute("UPDATE snapshot_entities SET state = jsonb_set(state, $2, $3)"
                     " WHERE snapshot = $1 AND kind = 'instance' AND id = 'vm1'",
                     snapshot_id, [field], json.dumps(value).encode())


async def states_at(environ: dict[str, str], point: int) -> dict[str, object]:
    done = await orch(environ, "get", "instance/vm1", "--at", str(point), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def test_get_at_and_trace_from_a_snapshot_agree_with_the_whole_fold(
        env: Env, js: JetStreamContext, pg: asyncpg.Connection, processes: Processes) -> None:
    environ = env.environ()
    await world(env, js, pg, processes)
    await pg.execute("DELETE FROM snapshot_entities; DELETE FROM snapshots")  # the leader's
    last = (await js.stream_info(CMD_STREAM)).state.last_seq
    early_id, early = await snapshot(environ, pg)
    seqs = []
    for type_ in ("StopInstance", "StartInstance", "StopInstance"):
        done = await orch(environ, "publish", type_, "vm1", "--wait", "--json-out")
        assert done.returncode == 0, done.stderr
        seqs.append(json.loads(done.stdout)["seq"])
    await eventually(lambda: settled(pg, js))
    late_id, late = await snapshot(environ, pg)
    assert early <= last < seqs[0] <= seqs[2] <= late
    points = sorted({last, *seqs, late})

    saved = await pg.fetch("SELECT id, code FROM snapshots")
    await pg.execute("UPDATE snapshots SET code = 'other'")
    # No snapshot of this code: folded from the first command, the reference for each point.
    whole = {p: await states_at(environ, p) for p in points}
    assert [whole[p]["state"]["power"] for p in (last, *seqs)] == [
        "running", "stopped", "running", "stopped"]
    for p in points:  # replay --to agrees, as without snapshots
        done = await orch(environ, "replay", "--to", str(p), "--schema", "snap_check")
        assert done.returncode == 0, done.stderr
        replayed = msgspec.json.decode(await pg.fetchval(
            "SELECT state FROM snap_check.entities WHERE kind = 'instance' AND id = 'vm1'"))
        assert whole[p]["state"] == replayed, p
    await pg.execute("DROP SCHEMA snap_check CASCADE")
    tree = await orch(environ, "trace", str(seqs[1]), "--json")
    assert tree.returncode == 0, tree.stderr

    # Of other code, a snapshot is never used, whatever its rows say.
    await tamper(pg, early_id, "stopped")
    assert {p: await states_at(environ, p) for p in points} == whole

    # Of this code: used at and after its checkpoint (the tampered row shows through, so
    # it is read), never before it; the latest one that can serve is taken.
    for row in saved:
        await pg.execute("UPDATE snapshots SET code = $2 WHERE id = $1", row["id"], row["code"])
    assert all(row["code"] == CODE_VERSION for row in saved)
    assert (await states_at(environ, last))["state"]["power"] == "stopped"
    await tamper(pg, early_id, "running")  # as it was
    assert {p: await states_at(environ, p) for p in points} == whole
    await tamper(pg, late_id, "running")
    assert (await states_at(environ, late))["state"]["power"] == "running"
    assert {p: await states_at(environ, p) for p in points if p < late} == {
        p: whole[p] for p in points if p < late}
    await tamper(pg, late_id, whole[late]["state"]["power"])

    # A trace folds the command's entity from a snapshot before the command: the same tree.
    assert early < seqs[1] <= late
    again = await orch(environ, "trace", str(seqs[1]), "--json")
    assert again.returncode == 0 and again.stdout == tree.stdout, again.stderr
    generation = whole[last]["state"]["generation"]
    await tamper(pg, early_id, generation + 100, "generation")
    changed = await orch(environ, "trace", str(seqs[1]), "--json")
    assert changed.returncode == 0, changed.stderr
    [job] = json.loads(changed.stdout)["children"]
    [before] = json.loads(tree.stdout)["children"]
    assert job["generation"] == before["generation"] + 100
