"""Child processes a run supervises (agents, replicas): own sessions, logs, always stopped.

Each child gets its own session, so a Ctrl-C aimed at the parent does not reach it: the
parent stops its children itself, in order, SIGTERM to each group and SIGKILL after a
grace period. Used by `orch demo`, the benchmarks and the tests.
"""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path


class ChildExited(RuntimeError):
    """A child that should run until stopped has exited."""


class Children:
    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        tmp = workdir / "tmp"  # e.g. `--libvirt test` node files: gone with the workdir
        tmp.mkdir(parents=True, exist_ok=True)
        self.env = {**env, "TMPDIR": str(tmp)}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def start(self, name: str, *module_args: str,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Run ``python -m <module_args>`` as child ``name`` (with ``env`` instead of the
        children's own, if given; its temporary files still go to the workdir)."""
        if name in self.procs:
            raise ValueError(f"a child named {name} was started already")
        env = {**env, "TMPDIR": self.env["TMPDIR"]} if env is not None else self.env
        with self.log_path(name).open("ab") as log:
            proc = self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", *module_args], env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return proc

    def check(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise ChildExited(f"{name} exited with code {proc.returncode}"
                                  f" ({self.log_path(name)}: {self.log_tail(name, 1)})")

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            text = self.log_path(name).read_text(errors="replace")
        except OSError as exc:
            return f"log unreadable: {exc}"
        return "\n".join(text.strip().splitlines()[-lines:]) or "log empty"

    def stop(self, grace_s: float = 5.0) -> list[str]:
        """SIGTERM every child's group, SIGKILL what is left after grace_s; who was killed."""
        live = {name: p for name, p in self.procs.items() if p.poll() is None}
        for proc in live.values():
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        killed = []
        for name, proc in live.items():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
            if proc.poll() is None:
                killed.append(name)
            # Whatever is left in its group (it, or a helper it started) goes now.
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        return killed


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if proc.poll() is None:  # a reaped child's pid may belong to someone else by now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


@contextlib.contextmanager
def uninterruptible() -> Iterator[None]:
    """Teardown must finish: a second Ctrl-C would leave servers and children behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT,
                                                                     signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
