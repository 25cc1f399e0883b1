"""A libvirtd per fabric host: its own mount and network namespace (PLATFORM-FACTS,
"Live migration between two hosts on one machine").

`HostLibvirtd(netns, underlay_ip, root_dir)` runs `libvirtd --listen` inside the host's
network namespace and in a private mount namespace where `/etc/libvirt`, `/run/libvirt`,
`/var/lib/libvirt`, `/var/cache/libvirt` and `/var/log/libvirt` are bind mounts of
directories under `root_dir`. So its sockets, state and taps are its own, and the system
libvirtd (if any) is untouched. The agent in the root namespace reaches it through the unix
socket in the private run dir (`uri`); other daemons reach it over TCP on the underlay
(`tcp_uri`, for migration).

`stop()` (also on a failed `start()`) destroys and undefines every domain, kills the daemon
and every process left in its mount namespace (QEMU), and removes `root_dir`.

`host_libvirtds(fabric, root)` is the composition tests use: one daemon per fabric host
(or per host it is given), all started at once (each is ready ~8 s after its start: its
QEMU driver probes QEMU's capabilities into a fresh cache), all stopped on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import libvirt

from orchestrator.fabric import Fabric
from orchestrator.fabric import _alive as alive

START_TIMEOUT_S = 30.0
DIRS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt",
        "cache": "/var/cache/libvirt", "log": "/var/log/libvirt"}

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


class HostLibvirtd:
    """One host's own libvirtd; a context manager."""

    def __init__(self, netns: str, underlay_ip: str, root_dir: Path) -> None:
        self.netns = netns
        self.underlay_ip = underlay_ip
        self.root = Path(root_dir)
        self.host_uuid = str(uuid.uuid4())
        self.proc: subprocess.Popen[bytes] | None = None
        self._mnt_ns: tuple[int, int] | None = None
        self.started_s: float | None = None  # seconds until it was ready for domains

    @property
    def socket(self) -> Path:
        return self.root / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        """From the root namespace: the unix socket in its private run dir."""
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def tcp_uri(self) -> str:
        """From inside any host namespace (another daemon: migration)."""
        return f"qemu+tcp://{self.underlay_ip}/system"

    def __enter__(self) -> HostLibvirtd:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- lifecycle --------------------------------------------------------------------------

    def _configure(self) -> None:
        for sub in DIRS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        etc = self.root / "etc"
        (etc / "libvirtd.conf").write_text(
            "listen_tls = 0\nlisten_tcp = 1\n"
            f'listen_addr = "{self.underlay_ip}"\n'
            'auth_tcp = "none"\nauth_unix_rw = "none"\nauth_unix_ro = "none"\n'
            'unix_sock_group = "root"\nunix_sock_rw_perms = "0700"\n'
            f'host_uuid = "{self.host_uuid}"\n'
            f'log_outputs = "3:file:{DIRS["log"]}/libvirtd.log"\n')
        (etc / "qemu.conf").write_text(
            'user = "root"\ngroup = "root"\ndynamic_ownership = 0\n'
            'security_driver = "none"\ncgroup_controllers = [ ]\nnamespaces = [ ]\n'
            'stdio_handler = "file"\n'
            f'migration_host = "{self.underlay_ip}"\n'
            f'migration_address = "{self.underlay_ip}"\n')

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        started = time.monotonic()
        try:
            self._configure()
            mounts = " && ".join(f"mount --bind {self.root / sub} {target}"
                                 for sub, target in DIRS.items())
            script = f"{mounts} && exec libvirtd --listen -p {self.root / 'libvirtd.pid'}"
            # ip netns exec and unshare both exec: the pid is libvirtd's own.
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, "unshare", "-m", "--propagation",
                 "private", "sh", "-c", script],
                stdout=subprocess.DEVNULL, stderr=(self.root / "stderr").open("wb"),
                start_new_session=True)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"libvirtd in {self.netns} exited "
                                       f"{self.proc.returncode}: {self._stderr()}")
                if self._answers():
                    break
                if time.monotonic() - started > timeout_s:
                    raise TimeoutError(f"libvirtd in {self.netns} does not answer within "
                                       f"{timeout_s}s: {self._stderr()}")
                time.sleep(0.1)
            with contextlib.suppress(OSError):
                st = os.stat(f"/proc/{self.proc.pid}/ns/mnt")
                self._mnt_ns = (st.st_dev, st.st_ino)
            self.started_s = time.monotonic() - started
        except BaseException:
            self.stop()
            raise

    def _stderr(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "stderr").read_text(errors="replace")[-1000:]
        return ""

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError:
            return False
        try:
            # The socket answers at once; the QEMU driver probes QEMU's capabilities into
            # its fresh cache first (~8 s), and a domain could not be defined before.
            conn.getCapabilities()
        except libvirt.libvirtError:
            return False
        finally:
            conn.close()
        return True

    def connect(self) -> libvirt.virConnect:
        return libvirt.open(self.uri)

    def stop(self) -> None:
        """Every guest destroyed, the daemon and its children killed, its dirs removed."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(libvirt.libvirtError):
                conn = self.connect()
                try:
                    for dom in conn.listAllDomains(0):
                        with contextlib.suppress(libvirt.libvirtError):
                            if dom.isActive():
                                dom.destroy()
                        with contextlib.suppress(libvirt.libvirtError):
                            dom.undefine()
                finally:
                    conn.close()
        leftovers = self.processes()
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(alive(p) for p in leftovers):
            time.sleep(0.01)
        self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)

    def processes(self) -> list[int]:
        """Processes in this daemon's mount namespace (itself, and QEMU it started)."""
        if self._mnt_ns is None:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                st = os.stat(f"/proc/{entry}/ns/mnt")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == self._mnt_ns:
                found.append(int(entry))
        return found


@contextlib.contextmanager
def host_libvirtds(fabric: Fabric, root: Path,
                   hosts: Iterable[str] | None = None) -> Iterator[dict[str, HostLibvirtd]]:
    """A libvirtd per fabric host (or per host named in `hosts`: LB nodes need none), by
    host name; all started in parallel, all stopped."""
    wanted = None if hosts is None else set(hosts)
    chosen = [h for h in fabric.hosts if wanted is None or h.name in wanted]
    daemons = {h.name: HostLibvirtd(h.netns, h.underlay_ip, Path(root) / f"libvirt-{h.name}")
               for h in chosen}
    try:
        # Every daemon starts at once: their ~8 s start-ups overlap.
        with ThreadPoolExecutor(len(daemons)) as pool:
            for future in [pool.submit(d.start) for d in daemons.values()]:
                future.result()
        for h in chosen:
            proc = daemons[h.name].proc
            if proc is not None:
                h.daemons["libvirtd"] = proc.pid
        yield daemons
    finally:
        for daemon in daemons.values():
            daemon.stop()
