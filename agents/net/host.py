"""One host network namespace as this process drives it: a thread inside it, its sockets.

A network namespace belongs to a thread, not to a process: a thread that called
``setns(CLONE_NEWNET)`` sees that namespace, and every socket it opens stays there for
good, whichever thread uses it afterwards. So `HostNet` keeps one thread per namespace
that entered it at start. That thread opens the netlink sockets (used from any thread,
each behind its lock), and runs what must execute inside the namespace: libnftables
(it opens its own netlink socket when called) and sysctl writes (/proc/sys/net is the
calling thread's namespace: see `HostNet.sysctl`). It also serialises every nft
transaction of the process on that namespace, which makes allocating a port's mark a
simple read-then-write.

One `HostNet` per namespace and process is shared (`HostNet.open`): the network driver and
the guest drivers of one agent use the same one.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import json
import os
import queue
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import ClassVar, TypeVar

import nftables

from agents.net.errors import NetError, PermanentNetError, TransientNetError
from agents.net.netlink import NETLINK_NETFILTER, NetlinkSocket
from agents.net.rtnl import Rtnl

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"  # where `ip netns add` puts the namespaces it names
DEFAULT_TIMEOUT = 5.0
SYSCTL_FDS = 64  # sysctl files kept open per namespace, the most recently used


def _setns(netns: str) -> None:
    path = netns if netns.startswith("/") else os.path.join(NETNS_DIR, netns)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise TransientNetError(f"network namespace {netns} does not exist") from exc
    try:
        if hasattr(os, "setns"):  # Python 3.12
            os.setns(fd, CLONE_NEWNET)
        else:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                code = ctypes.get_errno()
                raise PermanentNetError(f"cannot enter network namespace {netns}: "
                                        f"{os.strerror(code)}")
    finally:
        os.close(fd)


class NamespaceThread:
    """A thread inside a network namespace (None: this process's own) running calls there,
    one at a time, each waited for at most ``timeout`` seconds."""

    def __init__(self, netns: str | None, timeout: float) -> None:
        self.netns = netns
        self.timeout = timeout
        self._calls: queue.SimpleQueue[tuple[Callable[[], object],
                                             concurrent.futures.Future[object]] | None]
        self._calls = queue.SimpleQueue()
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(started,),
                                        name=f"netns-{netns or 'self'}", daemon=True)
        self._thread.start()
        started.result(timeout)

    def _run(self, started: concurrent.futures.Future[None]) -> None:
        try:
            if self.netns is not None:
                _setns(self.netns)
        except BaseException as exc:
            started.set_exception(exc)
            return
        started.set_result(None)
        while (item := self._calls.get()) is not None:
            call, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as exc:
                future.set_exception(exc)

    def submit(self, call: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Queue ``call`` to run inside the namespace; its future."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._calls.put((call, future))  # type: ignore[arg-type]
        return future

    def wait(self, future: concurrent.futures.Future[T], what: str,
             timeout: float | None = None) -> T:
        """The result of a call run in the namespace, waited for at most ``timeout``."""
        wait = self.timeout if timeout is None else timeout
        try:
            return future.result(wait)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()  # if it has not started yet, it never will
            raise TransientNetError(f"{what}: no answer within {wait:g} s in network "
                                    f"namespace {self.netns or '(own)'}") from exc

    def call(self, call: Callable[[], T], what: str, timeout: float | None = None) -> T:
        """Run ``call`` inside the namespace and return its result (or raise its error)."""
        return self.wait(self.submit(call), what, timeout)

    def is_current(self) -> bool:
        return threading.current_thread() is self._thread

    def close(self) -> None:
        self._calls.put(None)
        self._thread.join(self.timeout)


class HostNet:
    """Sockets and the namespace thread of one host namespace. Use `open` to share it."""

    _shared: ClassVar[dict[str | None, HostNet]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, netns: str | None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.netns = netns
        self.timeout = timeout
        self.thread = NamespaceThread(netns, timeout)
        try:
            # Sysctl files are opened on a thread of their own: they do not queue behind
            # the nft transactions of the namespace thread (plugs waited there).
            self.sysctl_thread = NamespaceThread(netns, timeout)
        except BaseException:
            self.thread.close()
            raise
        try:
            self.rtnl: Rtnl = self.thread.call(lambda: Rtnl(timeout), "open rtnetlink")
            self.nfnl: NetlinkSocket = self.thread.call(
                lambda: NetlinkSocket(NETLINK_NETFILTER, timeout), "open nfnetlink")
        except BaseException:
            self.thread.close()
            self.sysctl_thread.close()
            raise
        self._users = 0
        self.announced = 0  # gratuitous ARPs sent to local ports (agents.net.announce)
        self._nft: nftables.Nftables | None = None  # created and used in the thread only
        self._locks: dict[object, threading.RLock] = {}
        self._locks_lock = threading.Lock()
        self._packet: socket.socket | None = None
        self._sysctls: OrderedDict[str, int] = OrderedDict()  # path -> its open file
        self._sysctls_lock = threading.Lock()

    @classmethod
    def open(cls, netns: str | None, timeout: float = DEFAULT_TIMEOUT) -> HostNet:
        """The process's shared HostNet of ``netns``; `close` it when done."""
        with cls._shared_lock:
            host = cls._shared.get(netns)
            if host is None:
                host = cls._shared[netns] = cls(netns, timeout)
            host._users += 1
            return host

    def close(self) -> None:
        with self._shared_lock:
            self._users -= 1
            if self._users > 0:
                return
            if self._shared.get(self.netns) is self:
                del self._shared[self.netns]
        self.rtnl.close()
        self.nfnl.close()
        if self._packet is not None:
            self._packet.close()
        with self._sysctls_lock:
            for fd in self._sysctls.values():
                os.close(fd)
            self._sysctls.clear()
        self.thread.close()
        self.sysctl_thread.close()

    def __enter__(self) -> HostNet:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def lock(self, key: object) -> threading.RLock:
        """A (reentrant) lock of this namespace shared by the process (per segment VNI)."""
        with self._locks_lock:
            lock = self._locks.get(key)
            if lock is None:
                lock = self._locks[key] = threading.RLock()
            return lock

    def packet_socket(self) -> socket.socket:
        """The namespace's AF_PACKET socket for sending frames out of a named device (it
        receives nothing: protocol 0). Kept open: closing one waits for an RCU grace period,
        which per plugged port cost more than the frames it sent."""
        with self.lock("packet"):
            if self._packet is None:
                try:
                    self._packet = self.inside(
                        lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0),
                        "open a packet socket")
                except OSError as exc:
                    raise TransientNetError(f"no packet socket in network namespace "
                                            f"{self.netns or '(own)'}: {exc}") from exc
            return self._packet

    def inside(self, call: Callable[[], T], what: str, timeout: float | None = None) -> T:
        """Run ``call`` in the namespace thread (nft, sysctl); directly if already there."""
        if self.thread.is_current():
            return call()
        return self.thread.call(call, what, timeout)

    def nft(self, commands: list[dict[str, object]], what: str) -> None:
        """Run nft commands (libnftables' JSON) in the namespace, as one transaction."""
        if not commands:
            return

        def run() -> tuple[int, str]:
            if self._nft is None:
                self._nft = nftables.Nftables()
                self._nft.set_json_output(True)
            rc, _out, err = self._nft.cmd(json.dumps({"nftables": commands}))
            return rc, err

        rc, err = self.inside(run, what)
        if rc != 0:
            text = " ".join(line.strip() for line in err.splitlines()
                            if line.strip() and not line.lstrip().startswith("^"))
            raise TransientNetError(f"{what}: nft refused the transaction: {text[:500]}")

    def sysctl(self, key: str, value: str, *, optional: bool = False) -> None:
        """Write a sysctl of this namespace (``net.bridge.bridge-nf-call-iptables``) if it
        differs; ``optional``: one the kernel does not have is fine (IPv6's, without IPv6).

        A /proc/sys file answers for the namespace of the thread that opened it, whichever
        thread reads it later: the files are opened on the sysctl thread and kept (the
        `SYSCTL_FDS` most recent), so that a sysctl read again (a bridge's, br_netfilter's
        at every firewall converge) costs a pread in the caller, not a hop to that thread
        (1-2 ms each on a busy machine, some of them under a segment's lock). A file whose
        device went away answers ENOENT for good (even if a device of that name is back):
        it is opened again.
        """
        path = "/proc/sys/" + key.replace(".", "/")
        wanted = value.encode()
        try:
            for _attempt in range(3):
                with self._sysctls_lock:  # a file is not closed (evicted) while in use
                    fd = self._sysctls.get(path)
                    if fd is not None:
                        try:
                            if os.pread(fd, 64, 0).strip() != wanted:
                                os.pwrite(fd, wanted, 0)
                            self._sysctls.move_to_end(path)
                            return
                        except FileNotFoundError:  # its device went away
                            os.close(self._sysctls.pop(path))
                # Opened outside the lock: the others' sysctls (some under a segment's
                # lock) do not wait for this one's hop.
                fd = self._open_sysctl(path, key, optional)
                if fd is None:
                    return
                with self._sysctls_lock:
                    if path in self._sysctls:  # opened meanwhile by another caller
                        os.close(fd)
                        continue
                    self._sysctls[path] = fd
                    if len(self._sysctls) > SYSCTL_FDS:
                        os.close(self._sysctls.popitem(last=False)[1])
        except FileNotFoundError as exc:
            raise PermanentNetError(f"sysctl {key} does not exist in network namespace "
                                    f"{self.netns or '(own)'}") from exc
        except OSError as exc:
            raise PermanentNetError(f"sysctl {key}={value}: {exc}") from exc
        raise TransientNetError(f"sysctl {key}: its file vanished three times while written")

    def _open_sysctl(self, path: str, key: str, optional: bool) -> int | None:
        """A sysctl's file opened inside the namespace (None: an optional one missing)."""

        def opened() -> int | None:
            if optional and not os.path.exists(path):
                return None
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)

        if self.thread.is_current() or self.sysctl_thread.is_current():
            return opened()
        return self.sysctl_thread.call(opened, f"open sysctl {key}")


__all__ = ["DEFAULT_TIMEOUT", "HostNet", "NamespaceThread", "NetError"]


def interface_address(netns: str | None, ifname: str) -> str:
    """The first IPv4 address of ``ifname`` in ``netns`` (an agent's --underlay-dev)."""
    from pyroute2 import IPRoute  # only for this one lookup at start

    with IPRoute(**({"netns": netns, "flags": 0} if netns else {})) as ipr:
        links = ipr.link_lookup(ifname=ifname)
        if not links:
            raise LookupError(f"no interface {ifname} in {netns or 'this namespace'}")
        for addr in ipr.get_addr(index=links[0], family=socket.AF_INET):
            return str(addr.get_attr("IFA_ADDRESS"))
    raise LookupError(f"{ifname} has no IPv4 address")
