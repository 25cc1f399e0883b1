"""PostgreSQL crashes under load: the replicas ride it out and the fold resumes, exactly once.

Each test runs a PostgreSQL server of its own (the session's is shared by other tests) and
SIGKILLs its postmaster, as a crash would: the backends notice and exit, and the restarted
server recovers from its WAL. Commits are asynchronous (see store.create_pool), so the last
ones acknowledged before the crash may be lost: they must be folded again.

`pytest -s tests/test_pg_chaos.py` prints how long the fold took to catch up after
PostgreSQL came back, and how many commands it folded meanwhile.
"""

import asyncio
import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from nats.js import JetStreamContext

from events.bus import Publisher, read_stream
from events.meta import delivery
from events.subjects import CMD_STREAM, EVT_STREAM
from orchestrator.embedded import NatsServer, PostgresServer
from orchestrator.leader import LEADER_LOCK
from orchestrator.queries import fold_progress
from orchestrator.store import Store
from schemas.codec import command_from_dict
from tests.conftest import PARTITIONS, Env, Processes, eventually, settled

STEP, PACE_S = 20, 0.1  # the load: networks created every PACE_S (and every 5th deleted)
# What reaching PostgreSQL can raise while it is down or starting up (a pooled connection
# that has just heard of its backend's death is in the middle of an "operation").
UNREACHABLE = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
               asyncpg.InternalClientError)
LEADER = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1 AND granted"


@dataclass
class OwnPostgres(Env):
    postgres: PostgresServer


def _group_members(pgid: int) -> list[int]:
    """Processes of a group still running (zombies excluded: nobody may reap them here)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue
        if state != "Z" and int(group) == pgid:
            members.append(int(stat.parent.name))
    return members


def _stop_postgres(server: PostgresServer, crash: bool) -> None:
    """Stop the server (SIGKILL to the postmaster alone, if ``crash``) and wait until its
    backends are gone too: a new postmaster refuses shared memory they still hold."""
    pgid = server.pid  # its own session: the group is the postmaster's pid
    if crash:
        os.kill(server.pid, signal.SIGKILL)
    server.stop()  # after a SIGKILL, this only reaps the postmaster
    deadline = time.monotonic() + 10.0
    while _group_members(pgid):
        if time.monotonic() > deadline:  # backends that missed their postmaster's death
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        time.sleep(0.05)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[OwnPostgres]:
    """Overrides conftest's: a nats-server and a PostgreSQL server of this test's own."""
    server = PostgresServer(tmp_path / "pg")
    nats = NatsServer(tmp_path / "nats")
    try:
        await asyncio.to_thread(server.start)
        nats.start()
        yield OwnPostgres(nats=nats, pg_dsn=server.dsn, root=tmp_path, postgres=server)
    finally:
        nats.stop()
        with contextlib.suppress(RuntimeError):  # never started
            await asyncio.to_thread(_stop_postgres, server, False)
        shutil.rmtree(tmp_path / "pg", ignore_errors=True)
        shutil.rmtree(tmp_path / "nats", ignore_errors=True)


class Load:
    """Commands published at a steady pace until stopped: networks created, some deleted."""

    def __init__(self, js: JetStreamContext) -> None:
        self.publisher = Publisher(js)
        self.sent = 0
        self.stop = asyncio.Event()
        self.started = asyncio.get_running_loop().time()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            items = []
            for _ in range(STEP):
                items.append(("user", command_from_dict(dict(
                    type="CreateNetwork", cmd_id=f"c{n}", id=f"n{n}", vni=1 + n,
                    cidr="10.0.0.0/24"))))
                if n % 5 == 4:
                    items.append(("user", command_from_dict(dict(
                        type="DeleteNetwork", cmd_id=f"d{n}", id=f"n{n - 2}"))))
                n += 1
            await self.publisher.publish_many(items)
            self.sent += len(items)
            await asyncio.sleep(PACE_S)

    async def finish(self) -> int:
        self.stop.set()
        await self.task
        return self.sent


async def _progress(pool: asyncpg.Pool) -> tuple[int, int] | None:
    """Commands folded and outbox rows not relayed, or None while PostgreSQL is away."""
    try:
        return await fold_progress(pool)
    except UNREACHABLE:
        return None


@dataclass(frozen=True, slots=True)
class Recovery:
    backlog: int  # commands stored and not folded when PostgreSQL came back
    resumed_s: float  # from its return until the fold committed again
    caught_up_s: float  # until everything stored at its return was folded
    folded: int  # commands folded in between


async def _recover(pool: asyncpg.Pool, js: JetStreamContext, back_at: float,
                   timeout_s: float = 60.0) -> Recovery:
    """Watch the fold from PostgreSQL's return until it has folded what was stored then."""
    loop = asyncio.get_running_loop()
    target = (await js.stream_info(CMD_STREAM)).state.last_seq
    start = resumed = folded = None
    while loop.time() < back_at + timeout_s:
        progress = await _progress(pool)
        now = loop.time()
        if progress is not None:
            folded = progress[0]
            if start is None:
                start = folded
            if resumed is None and folded > start:
                resumed = now
            if folded >= target:
                return Recovery(target - start, (resumed or now) - back_at, now - back_at,
                                folded - start)
        await asyncio.sleep(0.05)
    raise AssertionError(f"the fold did not catch up within {timeout_s:.0f} s of PostgreSQL's"
                         f" return: {start} folded then, {folded} now, {target} stored")


def _events(processes: Processes, name: str, event: str) -> list[dict]:
    lines = processes.log_path(name).read_text(errors="replace").splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    return [r for r in records if r.get("event") == event]


def _logged_at(record: dict) -> float:
    return datetime.datetime.fromisoformat(record["timestamp"]).timestamp()


async def _folded_once(js: JetStreamContext, pool: asyncpg.Pool, env: Env, sent: int) -> None:
    """Every command sent is stored once, every stored one (the fold's follow-ups too) has
    one history row, and its outcome was published once; a replay of the log reproduces
    the live projection."""
    stored = [m async for batch in read_stream(js, CMD_STREAM, "cmd.>") for m in batch]
    assert sum(m.subject.split(".")[2] == "user" for m in stored) == sent
    seqs = [delivery(m.reply).stream_seq for m in stored]
    assert sorted(await pool.fetchval("SELECT array_agg(seq) FROM history")) == seqs
    assert (await js.stream_info(EVT_STREAM)).state.messages == len(seqs)
    verify = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "orchestrator.cli", "replay", "--verify"],
        env=env.environ(), capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr


async def _replicas(env: OwnPostgres, store: Store, processes: Processes,
                    lease_s: float) -> None:
    """Two replicas (tick 1 s), sharing the partitions, and a leader among them."""
    orch = ["orchestrator", "--batch", "200", "--deadline", "3600", "--lease", str(lease_s)]
    for name in ("r1", "r2"):
        processes.orch(*orch, "--id", name, env=env.environ(), name=name)
    await eventually(lambda: store.pool.fetchval(
        "SELECT count(DISTINCT owner) = 2 AND count(owner) = $1 FROM partitions", PARTITIONS))
    await eventually(lambda: store.pool.fetchval(f"SELECT ({LEADER}) = 1", LEADER_LOCK))


@dataclass(frozen=True, slots=True)
class Outage:
    crashed_at: float  # wall clock, as in the logs
    back_at: float
    recovery: Recovery


async def _crash_under_load(env: OwnPostgres, js: JetStreamContext, store: Store,
                            processes: Processes, lease_s: float, outage_s: float) -> Outage:
    """Two replicas folding a steady load; PostgreSQL SIGKILLed, restarted ``outage_s``
    later; every command folded once afterwards."""
    await _replicas(env, store, processes, lease_s)
    pool = store.pool
    load = Load(js)
    await eventually(lambda: pool.fetchval("SELECT count(*) > 300 FROM history"))

    crashed_at = time.time()
    await asyncio.to_thread(_stop_postgres, env.postgres, True)
    await asyncio.sleep(outage_s)
    processes.check()
    await asyncio.to_thread(env.postgres.start)
    loop = asyncio.get_running_loop()
    back_at, down_s = loop.time(), time.time() - crashed_at
    recovery = await _recover(pool, js, back_at)
    # The load goes on a little while after the catch-up, then everything settles.
    await asyncio.sleep(2.0)
    sent = await load.finish()
    await eventually(lambda: settled(pool, js), timeout=60, interval=0.5)
    processes.check()  # no replica exited
    for name in ("r1", "r2"):
        assert _events(processes, name, "tick_failed"), processes.log_tail(name)  # felt it
        # Leadership is only lost to the crash (a check of it that failed by itself would
        # hand it from one replica to the other all the time).
        lost = _events(processes, name, "leadership_lost")
        assert all(_logged_at(e) > crashed_at for e in lost), lost
    await eventually(lambda: pool.fetchval(f"SELECT ({LEADER}) = 1", LEADER_LOCK))
    await _folded_once(js, pool, env, sent)
    rate = sent / (loop.time() - load.started)
    print(f"\nPostgreSQL down {down_s:.1f} s (lease {lease_s:.0f} s), load {rate:.0f}"
          f" commands/s: {recovery.backlog} commands waiting at its return; the fold resumed"
          f" after {recovery.resumed_s:.2f} s and caught up after {recovery.caught_up_s:.2f} s,"
          f" folding {recovery.folded} commands meanwhile")
    assert recovery.resumed_s < 10.0, recovery
    return Outage(crashed_at, crashed_at + down_s, recovery)


async def test_replicas_ride_out_a_postgres_crash_and_restart(
        env: OwnPostgres, js, store: Store, processes: Processes) -> None:
    """Down for less than a lease: workers that failed to commit are reclaimed (and the
    others started again, from what the restarted server has), and no lease is given up
    for want of proof."""
    await _crash_under_load(env, js, store, processes, lease_s=10.0, outage_s=2.0)
    for name in ("r1", "r2"):
        assert _events(processes, name, "partition_failed"), processes.log_tail(name)
        assert not _events(processes, name, "leases_unproven"), processes.log_tail(name)


async def test_a_postgres_outage_longer_than_the_lease_drops_the_workers_in_time(
        env: OwnPostgres, js, store: Store, processes: Processes) -> None:
    """No lease can be proven once lease_s has gone by since the last renewal: the replicas
    stop their workers then, before PostgreSQL is back, and take partitions again after."""
    lease_s = 5.0
    outage = await _crash_under_load(env, js, store, processes, lease_s, outage_s=8.0)
    for name in ("r1", "r2"):
        [dropped] = _events(processes, name, "leases_unproven")
        assert dropped["partitions"], dropped
        # Renewed at most a tick before the crash, so unproven at most a lease after it.
        at = _logged_at(dropped)
        assert outage.crashed_at < at < outage.crashed_at + lease_s + 1.0, dropped
        assert at < outage.back_at, dropped


async def test_what_a_crash_lost_is_done_again_on_a_quiet_partition(
        env: OwnPostgres, js, store: Store, processes: Processes) -> None:
    """A crash right after the fold caught up loses its last asynchronous commits, and the
    deletions of outbox rows relayed. A worker that outlived the outage without committing
    (nothing more came for it) must not go on from what PostgreSQL no longer has: nothing
    would fold those commands again, or take those rows away."""
    await _replicas(env, store, processes, lease_s=10.0)
    pool = store.pool
    # The WAL writer flushes full pages of WAL at once, the last one wal_writer_delay later
    # (200 ms by default): wait longer, and a crash just after the fold caught up loses the
    # end of it (commits, outbox deletions) for sure, not just most of the time. Two other
    # writers flush WAL too, each now and then: the background writer, before it writes a
    # dirty buffer newer than the WAL on disk (after this test's burst of writes it cleans
    # buffers ahead of their reuse), and an autovacuum, by its synchronous commit. (Once in
    # a `make test` the crash then lost nothing.)
    await pool.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
    await pool.execute("ALTER SYSTEM SET bgwriter_lru_maxpages = 0")
    await pool.execute("ALTER SYSTEM SET autovacuum = off")
    await pool.execute("SELECT pg_reload_conf()")
    load = Load(js)
    await eventually(lambda: pool.fetchval("SELECT count(*) > 300 FROM history"))
    sent = await load.finish()
    await eventually(lambda: settled(pool, js), interval=0.01)
    await asyncio.to_thread(_stop_postgres, env.postgres, True)
    stored = (await js.stream_info(CMD_STREAM)).state.last_seq  # all folded, before
    await asyncio.to_thread(env.postgres.start)
    while (progress := await _progress(pool)) is None:
        await asyncio.sleep(0.05)
    lost = stored - progress[0], progress[1]
    assert lost != (0, 0), "the crash lost nothing: this test shows nothing"
    await eventually(lambda: settled(pool, js), timeout=30, interval=0.5)
    processes.check()
    await _folded_once(js, pool, env, sent)
    print(f"\nlost in the crash: {lost[0]} commits of commands, {lost[1]} outbox rows come"
          " back; all folded or deleted again")
