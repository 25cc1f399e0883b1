"""Test harness: a real PostgreSQL for the session, a fresh nats-server and database per test.

Every server, database, and process started here is stopped or dropped at teardown,
whether the test passed or not.
"""

import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import asyncpg
import pytest
from nats.js import JetStreamContext

from events.bus import connect
from events.subjects import CMD_STREAM
from events.topology import ensure_topology
from orchestrator.children import Children
from orchestrator.embedded import NatsCluster, NatsServer, PostgresServer
from orchestrator.queries import fold_progress
from orchestrator.store import Store, connect_pg, create_pool

PARTITIONS = 8
T = TypeVar("T")


HANG_S = 120.0  # a test running this long prints every task's stack: hangs get diagnosed


@pytest.fixture(autouse=True)
async def hang_report() -> AsyncIterator[None]:
    async def watch() -> None:
        await asyncio.sleep(HANG_S)
        print(f"\n--- still running after {HANG_S:.0f} s; tasks:", file=sys.stderr)
        for task in asyncio.all_tasks():
            task.print_stack(file=sys.stderr)

    watchdog = asyncio.create_task(watch())
    try:
        yield
    finally:
        watchdog.cancel()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    server = PostgresServer(tmp_path_factory.mktemp("pg") / "data")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Env:
    """One isolated world: its own nats-server or cluster (and store) and its own database."""

    nats: NatsServer | NatsCluster
    pg_dsn: str
    root: Path

    @property
    def nats_url(self) -> str:
        return self.nats.url

    def environ(self) -> dict[str, str]:
        return {**os.environ, "ORCH_NATS_URL": self.nats_url, "ORCH_PG_DSN": self.pg_dsn}


@contextlib.asynccontextmanager
async def isolated(postgres: PostgresServer, nats: NatsServer | NatsCluster,
                   root: Path) -> AsyncIterator[Env]:
    """A world around ``nats`` with a database of its own; both gone afterwards."""
    db = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres.dsn)
    try:
        await admin.execute(f"CREATE DATABASE {db}")
        try:
            try:
                nats.start()
                yield Env(nats=nats, pg_dsn=postgres.dsn.rsplit("/", 1)[0] + f"/{db}",
                          root=root)
            finally:
                nats.stop()
        finally:
            await admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
async def env(postgres: PostgresServer, tmp_path: Path) -> AsyncIterator[Env]:
    async with isolated(postgres, NatsServer(tmp_path / "nats"), tmp_path) as world:
        yield world


@pytest.fixture
async def js(env: Env) -> AsyncIterator[JetStreamContext]:
    nc = await connect(env.nats_url, "test")
    ctx = nc.jetstream()
    await ensure_topology(ctx, PARTITIONS)
    try:
        yield ctx
    finally:
        await nc.close()


@pytest.fixture
async def store(env: Env) -> AsyncIterator[Store]:
    pool = await create_pool(env.pg_dsn)
    s = Store(pool)
    await s.migrate(PARTITIONS)
    try:
        yield s
    finally:
        try:
            await asyncio.wait_for(pool.close(), 10)
        except TimeoutError:  # a connection still held by a stuck task: do not hang on it
            pool.terminate()


@pytest.fixture
async def pg(env: Env, store: Store) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect_pg(env.pg_dsn)
    try:
        yield conn
    finally:
        await conn.close()


class Processes(Children):
    """Orchestrator CLI processes of a test (replicas, agents), always stopped."""

    def orch(self, *args: str, env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
        return self.start(name, "orchestrator.cli", *args, env=env)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path, dict(os.environ))
    try:
        yield procs
    finally:
        procs.stop(grace_s=10.0)


async def eventually(predicate: Callable[[], Awaitable[T]], timeout: float = 30.0,
                     interval: float = 0.1) -> T:
    """Await an async predicate until it returns something truthy; fail with its last value."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: last value {value!r}")
        await asyncio.sleep(interval)


async def settled(pg: asyncpg.Connection, js: JetStreamContext) -> bool:
    """Every stored command is folded and every outbox row is published.

    The log's end is read before and after: if it moved (a follow-up was relayed while
    the counts were read), the answer cannot be trusted yet.
    """
    last = (await js.stream_info(CMD_STREAM)).state.last_seq
    folded, outbox = await fold_progress(pg)
    again = (await js.stream_info(CMD_STREAM)).state.last_seq
    return last > 0 and last == again and folded == last and outbox == 0
