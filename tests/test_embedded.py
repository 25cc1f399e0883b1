"""The embedded development stack: real nats-server and PostgreSQL processes."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.js.api import StorageType

from events.bus import server_urls
from orchestrator.embedded import NatsServer, PostgresServer, Stack, read_stack_file


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers do: TIME_WAIT leftovers of closed connections must not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def _select_one(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("select 1"))
    finally:
        await conn.close()


@pytest.mark.parametrize("servers", [1, 3])
async def test_stack_start_stop(tmp_path: Path, servers: int) -> None:
    root = tmp_path / ".orch"
    stack = Stack(root, servers=servers)
    try:
        info = stack.start()
        urls = server_urls(info.nats_url)
        assert len(urls) == servers
        async with await nats.connect(urls) as nc:
            await nc.jetstream().account_info()
        assert await _select_one(info.pg_dsn) == 1

        record = json.loads((root / "stack.json").read_text())
        assert record["nats_url"] == info.nats_url
        assert record["pg_dsn"] == info.pg_dsn
        assert (record["nats_pids"], record["pg_pid"]) == (stack.nats.pids, stack.pg.pid)
        assert record["started_at"]
        assert read_stack_file(root) == info
        pids = [*stack.nats.pids, stack.pg.pid]
        ports = [*(int(url.rsplit(":", 1)[1]) for url in urls), stack.pg.port]
    finally:
        stack.stop()
    assert not (root / "stack.json").exists()
    assert read_stack_file(root) is None
    assert all(_gone(pid) for pid in pids)
    assert all(_port_free(port) for port in ports)


# With sync_always: the server accepts the setting and keeps its streams (whether it
# fsyncs each write only a power cut would show).
@pytest.mark.parametrize("sync_always", [False, True])
async def test_nats_kill_and_restart_keeps_streams(tmp_path: Path, sync_always: bool) -> None:
    server = NatsServer(tmp_path / "nats", sync_always=sync_always)
    try:
        server.start()
        async with await nats.connect(server.url) as nc:
            js = nc.jetstream()
            await js.add_stream(name="T", subjects=["t.>"], storage=StorageType.FILE)
            await js.publish("t.one", b"x")
        crashed = server.pid
        server.kill()
        assert _gone(crashed)

        assert server.start() == f"nats://127.0.0.1:{server.port}"
        assert server.pid != crashed
        async with await nats.connect(server.url) as nc:
            assert (await nc.jetstream().stream_info("T")).state.messages == 1
    finally:
        server.stop()


async def test_postgres_long_path_restart(tmp_path: Path) -> None:
    # Too deep for a unix socket in the data dir: the server must fall back to a short dir.
    data_dir = tmp_path.joinpath(*["deep" * 6] * 4, "pg")
    assert len(str(data_dir)) > 100
    server = PostgresServer(data_dir)
    try:
        for _ in range(2):  # the second start reuses the cluster (no initdb)
            server.start()
            socket_dir = server._tmp_socket_dir
            assert socket_dir is not None
            assert (socket_dir / f".s.PGSQL.{server.port}").exists()
            assert await _select_one(server.dsn) == 1
            server.stop()
            assert not socket_dir.exists()
    finally:
        server.stop()


def test_a_stack_directory_keeps_its_number_of_servers(tmp_path: Path) -> None:
    """Its projection was folded from one store: a cluster must not start beside it empty."""
    root = tmp_path / ".orch"
    with Stack(root):
        pass
    with pytest.raises(RuntimeError, match="holds the store of a 1-server stack"):
        Stack(root, servers=3).start()
    assert not (root / "nats" / "n0").exists()
