"""Health checks of an LB node's backends: probes, thresholds, transitions.

Each (balancer, backend, service) is a target, probed every ``interval`` with a
``timeout``: a TCP connect to the backend's address and target port, or, when the target
has an HTTP path, a GET of it that must answer 2xx or 3xx; for a UDP service, a datagram
that must be answered (an ICMP port unreachable, or silence, fails it). `Threshold` (pure) turns the
probes into a state, HAProxy's way: ``rise`` successes in a row make it healthy, ``fall``
failures in a row unhealthy; it starts unknown, so the first crossing either way is
reported too. Each crossing calls ``report(Transition)``: the node tells the fold, which
decides the healthy set (a node never changes its own tables on what it sees). A job
whose view of a backend (``fold_healthy``) contradicts what the node knows makes it
report its state again: a report lost on the way is repaired by the next job.

The prober runs an asyncio loop on a thread of its own inside the node's network
namespace (a socket belongs to the namespace of the thread that made it), so probes leave
from the node itself, through its port on the backends' network. `update()` may be called
from any thread; a target whose address, port and check stay the same keeps its state
across updates (a new job is no reason to forget what was seen).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from agents.guest_service import in_netns

HTTP_READ_LIMIT = 4096
log = structlog.get_logger()


@dataclass(frozen=True)
class Check:
    interval_s: float
    timeout_s: float
    rise: int
    fall: int
    protocol: str = "tcp"  # udp: a datagram that must be answered
    http_path: str | None = None  # tcp: a GET of it, instead of a connect only


@dataclass(frozen=True)
class Target:
    lb: str
    instance: str
    port: int  # the service's port: what the fold's report names
    ip: str
    target_port: int
    check: Check
    generation: int  # of the job that asked for it
    # What the fold counts it, in that job (None: unknown). A state the node knows and the
    # fold does not reflect is reported again with the next job (a lost report, say).
    fold_healthy: bool | None = None


@dataclass(frozen=True)
class Transition:
    target: Target
    healthy: bool
    detail: str  # what the last probe saw
    seq: int  # crossings of this target seen by this prober, from 1


@dataclass
class Threshold:
    """Consecutive results against rise and fall: the state, None until first crossed."""

    rise: int
    fall: int
    healthy: bool | None = None
    run: int = 0  # length of the current run of equal results
    last: bool | None = None

    def observe(self, ok: bool) -> bool:
        """Count one probe result; True when it made the state cross a threshold."""
        self.run = self.run + 1 if ok == self.last else 1
        self.last = ok
        if ok and self.healthy is not True and self.run >= self.rise:
            self.healthy = True
            return True
        if not ok and self.healthy is not False and self.run >= self.fall:
            self.healthy = False
            return True
        return False


def _identity(t: Target) -> tuple[object, ...]:
    return (t.lb, t.instance, t.port, t.ip, t.target_port, t.check.protocol,
            t.check.http_path)


class _Answer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.answer.done():
            self.answer.set_result(f"answered {len(data)} bytes")

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


async def _udp(ip: str, port: int) -> str:
    transport, answer = await asyncio.get_running_loop().create_datagram_endpoint(
        _Answer, remote_addr=(ip, port))
    try:
        transport.sendto(b"health\n")
        return await answer.answer
    finally:
        transport.close()


async def probe(ip: str, port: int, check: Check) -> tuple[bool, str]:
    """One probe: (ok, what was seen)."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(check.timeout_s):
            if check.protocol == "udp":
                return True, await _udp(ip, port)
            reader, writer = await asyncio.open_connection(ip, port)
            try:
                if check.http_path is None:
                    return True, "connected"
                writer.write(f"GET {check.http_path} HTTP/1.0\r\nHost: {ip}\r\n"
                             "Connection: close\r\n\r\n".encode())
                await writer.drain()
                status = (await reader.readline())[:HTTP_READ_LIMIT].decode("latin-1")
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        return False, f"no answer within {check.timeout_s * 1000:.0f} ms"
    except OSError as exc:
        return False, exc.strerror or type(exc).__name__
    parts = status.split()
    if len(parts) >= 2 and parts[0].startswith("HTTP/") and parts[1][:1] in "23":
        return True, f"HTTP {parts[1]} in {(time.monotonic() - started) * 1000:.0f} ms"
    return False, f"HTTP answer {status.strip()[:80]!r}"


@dataclass
class _Probing:
    target: Target
    threshold: Threshold
    task: asyncio.Task[None] | None = None
    seq: int = 0
    detail: str = ""  # what the last probe saw


@dataclass
class Prober:
    """Probes targets from inside ``netns`` (None: this process's own namespace)."""

    netns: str | None
    report: Callable[[Transition], None]
    _loop: asyncio.AbstractEventLoop = field(init=False)
    _thread: threading.Thread = field(init=False)
    _probing: dict[tuple[str, str, int], _Probing] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            try:
                with in_netns(self.netns) if self.netns else contextlib.nullcontext():
                    asyncio.set_event_loop(self._loop)
                    self._loop.call_soon(started.set)
                    self._loop.run_forever()
            except BaseException as exc:  # the namespace is gone, say
                failed.append(exc)
                started.set()

        self._thread = threading.Thread(target=run, name=f"health-{self.netns or 'self'}",
                                        daemon=True)
        self._thread.start()
        started.wait()
        if failed:
            raise failed[0]

    # -- any thread ---------------------------------------------------------------------

    def update(self, lb: str, targets: list[Target]) -> None:
        """Probe exactly ``targets`` for balancer ``lb`` (none: stop probing it)."""
        asyncio.run_coroutine_threadsafe(self._update(lb, targets), self._loop).result(10)

    def states(self) -> dict[tuple[str, str, int], bool | None]:
        """(lb, instance, port) -> healthy as this prober sees it (None: not yet known)."""
        async def read() -> dict[tuple[str, str, int], bool | None]:
            return {key: p.threshold.healthy for key, p in self._probing.items()}

        return asyncio.run_coroutine_threadsafe(read(), self._loop).result(10)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(self._stop_all(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    # -- the prober's loop ----------------------------------------------------------------

    async def _update(self, lb: str, targets: list[Target]) -> None:
        wanted = {(t.lb, t.instance, t.port): t for t in targets if t.lb == lb}
        for key in [k for k in self._probing if k[0] == lb and k not in wanted]:
            await self._stop(self._probing.pop(key))
        for key, target in wanted.items():
            current = self._probing.get(key)
            if current is not None and _identity(current.target) == _identity(target):
                newer = target.generation > current.target.generation
                current.target = target  # new generation or thresholds, same state
                current.threshold.rise = target.check.rise
                current.threshold.fall = target.check.fall
                known = current.threshold.healthy
                if newer and known is not None and target.fold_healthy not in (None, known):
                    self._report(current, f"still {'up' if known else 'down'}: "
                                          f"{current.detail}")
                continue
            if current is not None:
                await self._stop(current)
            probing = _Probing(target, Threshold(target.check.rise, target.check.fall))
            probing.task = asyncio.create_task(self._run(probing))
            self._probing[key] = probing

    async def _run(self, probing: _Probing) -> None:
        while True:
            started = time.monotonic()
            target = probing.target
            ok, probing.detail = await probe(target.ip, target.target_port, target.check)
            if probing.threshold.observe(ok):
                self._report(probing, probing.detail)
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, probing.target.check.interval_s - elapsed))

    def _report(self, probing: _Probing, detail: str) -> None:
        probing.seq += 1
        target, healthy = probing.target, probing.threshold.healthy
        assert healthy is not None
        try:
            self.report(Transition(target, healthy, detail, probing.seq))
        except Exception:  # a reporter's failure must not stop the probing
            log.exception("health_report_failed", lb=target.lb, instance=target.instance,
                          port=target.port)

    @staticmethod
    async def _stop(probing: _Probing) -> None:
        if probing.task is not None:
            probing.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probing.task

    async def _stop_all(self) -> None:
        for probing in self._probing.values():
            await self._stop(probing)
        self._probing.clear()
