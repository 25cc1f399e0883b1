"""The service of namespace guests: one process per host answers for every guest on it.

Each guest (a network namespace made by `agents.drivers.netns_guest`) gets a TCP and a UDP
socket on `PORT`, opened *inside its namespace* (setns around socket(), then back), so one
small process serves 30 guests for the memory of one. Every answer is the guest's id:

- TCP: a request that starts like HTTP (`GET `, `HEAD `) gets `HTTP/1.0 200` with the id as
  its body; anything else (nothing sent, or other bytes) gets `<id>\\n`; then the connection
  is closed. A client that sends nothing is answered after `SNIFF_S`, or at once when it
  half-closes (`nc -N`).
- UDP: any datagram is answered with `<id>\\n`.

What to serve is a directory, written by the driver: `<dir>/guests/<id>` holds
`{"id": ..., "netns": ...}`. A line `sync` on the control socket `<dir>/control.sock`
makes the service read it again (`sync ID`: that guest's record alone) and reply with what
it serves (`{"pid": N, "serving": {id: netns}}`; after `sync ID`, that guest alone, so
that an agent converging each of N guests in turn does not read N answers N times): the
driver knows a guest answers before it reports it running. SIGHUP also makes it read the
directory again.

It runs detached from the agent (`--daemonize`: its own session, reparented to init) so an
agent that dies or restarts leaves every guest answering. `<dir>/service.lock` (flock)
keeps it single; `<dir>/service.pid` names it. With `--netns` it moves itself into the
host's namespace first: it then lives where the host's guests live, and whoever tears the
host down finds it among the namespace's processes.

Standard library only (no import of this project), so it starts fast and stays small.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import json
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

PORT = 8080
SNIFF_S = 0.25  # how long a silent TCP client waits for its plain answer
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"OPTIONS ")

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(netns: str | int) -> Iterator[None]:
    """Run the block with the calling thread in another network namespace (a name under
    /run/netns, or an open namespace fd), and come back. Sockets made inside stay there."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(NETNS_DIR / netns, os.O_RDONLY) if isinstance(netns, str) else netns
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)
        if isinstance(netns, str):
            os.close(target)


def netns_socket(netns: str | None, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket created in namespace `netns` (None: this thread's own)."""
    if netns is None:
        return socket.socket(family, kind, proto)
    with in_netns(netns):
        return socket.socket(family, kind, proto)


def answer(guest_id: str, request: bytes) -> bytes:
    """What a TCP client gets, given the first bytes it sent."""
    body = f"{guest_id}\n".encode()
    if request.startswith(HTTP_METHODS):
        head = (f"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}"
                "\r\nConnection: close\r\n\r\n").encode()
        return head if request.startswith(b"HEAD ") else head + body
    return body


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, guest_id: str) -> None:
        self.reply = f"{guest_id}\n".encode()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(self.reply, addr)


class _Guest:
    """The sockets of one guest, and the namespace (by inode) they were opened in."""

    def __init__(self, guest_id: str, netns: str, inode: int, server: asyncio.Server,
                 udp: asyncio.DatagramTransport) -> None:
        self.id, self.netns, self.inode = guest_id, netns, inode
        self.server, self.udp = server, udp

    def close(self) -> None:
        self.server.close()
        self.udp.close()


class Service:
    def __init__(self, directory: Path, port: int = PORT) -> None:
        self.dir = directory
        self.guests_dir = directory / "guests"
        self.port = port
        self.serving: dict[str, _Guest] = {}
        self._sync_lock = asyncio.Lock()

    def _wanted(self, only: str | None = None) -> dict[str, str]:
        wanted: dict[str, str] = {}
        paths = self.guests_dir.glob("*") if only is None else [self.guests_dir / only]
        for path in paths:
            if path.name.startswith(".") or not path.exists():
                continue  # a record being written, or none
            try:
                record = json.loads(path.read_text())
                wanted[str(record["id"])] = str(record["netns"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                print(f"bad record {path}: {exc!r}", file=sys.stderr, flush=True)
        return wanted

    @staticmethod
    def _inode(netns: str) -> int | None:
        try:
            return os.stat(NETNS_DIR / netns).st_ino
        except OSError:
            return None

    async def _open(self, guest_id: str, netns: str, inode: int) -> _Guest:
        loop = asyncio.get_running_loop()
        fd = os.open(NETNS_DIR / netns, os.O_RDONLY)
        try:
            if os.fstat(fd).st_ino != inode:
                raise OSError(f"namespace {netns} was replaced while opening it")
            with in_netns(fd):
                tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        finally:
            os.close(fd)
        try:
            for sock in (tcp, udp):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("0.0.0.0", self.port))
                sock.setblocking(False)
            tcp.listen(128)

            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                try:
                    try:
                        request = await asyncio.wait_for(reader.read(1024), SNIFF_S)
                    except TimeoutError:
                        request = b""
                    writer.write(answer(guest_id, request))
                    await writer.drain()
                except OSError:
                    pass  # the client went away: nothing to answer
                finally:
                    writer.close()

            server = await asyncio.start_server(handle, sock=tcp)
            transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(guest_id), sock=udp)
        except BaseException:
            tcp.close()
            udp.close()
            raise
        return _Guest(guest_id, netns, inode, server, transport)

    async def sync(self, only: str | None = None) -> dict[str, str]:
        """Serve exactly the guests of the directory whose namespace exists (or read the
        record of guest `only` alone: one guest's change costs no scan of all)."""
        async with self._sync_lock:
            wanted = self._wanted(only)
            for guest_id, guest in list(self.serving.items()):
                if only is not None and guest_id != only:
                    continue
                if wanted.get(guest_id) != guest.netns or self._inode(guest.netns) != guest.inode:
                    guest.close()  # gone, moved, or its namespace replaced
                    del self.serving[guest_id]
            for guest_id, netns in wanted.items():
                if guest_id in self.serving:
                    continue
                inode = self._inode(netns)
                if inode is None:
                    continue
                try:
                    self.serving[guest_id] = await self._open(guest_id, netns, inode)
                except OSError as exc:
                    print(f"cannot serve {guest_id} in {netns}: {exc!r}", file=sys.stderr,
                          flush=True)
            return {i: g.netns for i, g in self.serving.items() if only in (None, i)}

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            words = line.decode(errors="replace").split()
            if words and words[0] == "sync" and len(words) <= 2:
                only = words[1] if len(words) == 2 and "/" not in words[1] else None
                reply = {"pid": os.getpid(), "serving": await self.sync(only)}
            else:
                reply = {"error": f"unknown request {line[:40]!r}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()

    async def run(self) -> None:
        self.guests_dir.mkdir(parents=True, exist_ok=True)
        control = self.dir / "control.sock"
        with contextlib.suppress(FileNotFoundError):
            control.unlink()
        await self.sync()
        server = await asyncio.start_unix_server(self._control, path=str(control))
        pidfile = self.dir / "service.pid"
        pidfile.write_text(f"{os.getpid()}\n")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.sync()))
        try:
            await stop.wait()
        finally:
            server.close()
            for guest in self.serving.values():
                guest.close()
            with contextlib.suppress(FileNotFoundError):
                control.unlink()
            with contextlib.suppress(FileNotFoundError):
                pidfile.unlink()


def _daemonize(log: Path) -> None:
    """Leave the caller: a new session, reparented to init, stdio to the log."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(null)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="state directory of the host")
    parser.add_argument("--netns", help="move into this host namespace first")
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--daemonize", action="store_true")
    args = parser.parse_args(argv)
    directory: Path = args.dir
    directory.mkdir(parents=True, exist_ok=True)
    lock = os.open(directory / "service.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # one is running already: it serves the directory
    if args.netns:
        fd = os.open(NETNS_DIR / args.netns, os.O_RDONLY)
        _setns(fd)  # for good: this process lives in the host's namespace
        os.close(fd)
    if args.daemonize:
        _daemonize(directory / "service.log")  # the lock is inherited by the daemon
    asyncio.run(Service(directory, args.port).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
