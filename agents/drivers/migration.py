"""Live migration, the agent's side: what `VmDriver` needs beyond libvirt calls.

- `MigrationTarget`: the URI template of the destination's libvirtd (an agent setting,
  default ``qemu+tcp://{address}/system``: `address` is the destination's underlay IPv4
  from the job, `host` its name);
- `progress_mib`: libvirt's job statistics as the (processed, remaining) MiB that a
  `MigrationProgress` report carries;
- `report_id`: the idempotency keys of the reports a migration sends (progress, arrival):
  derived from what they are about, so a redelivered report dedupes, and a new attempt
  (another start time) does not;
- `Migration`: one running outgoing migration, which the monitor (deadline) and the
  runtime's interrupt (a newer job without ``outgoing``) both may abort, once;
- `event_loop()`: libvirt's default event loop, in one daemon thread of the process, so
  that lifecycle events reach the callbacks of the connections opened afterwards.

No I/O here besides that thread and `Migration.abort` (the domain's abortJob).
"""

from __future__ import annotations

import hashlib
import string
import threading
from dataclasses import dataclass, field

import libvirt
import structlog

from schemas.specs import Outgoing

log = structlog.get_logger()

DEFAULT_MIGRATION_URI = "qemu+tcp://{address}/system"
MIB = 1 << 20
PROGRESS_S = 0.5  # how often a running migration reports its progress

# LIVE: the guest runs while its memory is copied (paused only for the last iteration).
# PEER2PEER: the source libvirtd drives the migration to the destination's libvirtd itself
# (the agent's connection only starts and watches it; the destination is reached over the
# underlay, which the agent may not even see).
# PERSIST_DEST: the destination defines it persistently (the domain outlives its QEMU, and
# its metadata can be updated in its config by the destination's next job).
# UNDEFINE_SOURCE: on success the source keeps no definition: nothing there that a later
# job could start again as a second copy.
MIGRATE_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
                 | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)


class MigrationTarget:
    """The destination libvirtd's URI, from a template with ``{address}`` and ``{host}``."""

    FIELDS = frozenset({"address", "host"})

    def __init__(self, template: str = DEFAULT_MIGRATION_URI) -> None:
        try:
            used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        except ValueError as exc:
            raise ValueError(f"migration URI template {template!r}: {exc}") from exc
        unknown = used - self.FIELDS
        if unknown or not used & self.FIELDS:
            raise ValueError(f"migration URI template {template!r}: it may use only "
                             f"{{address}} and {{host}}, and needs one of them")
        self.template = template

    def uri(self, address: str, host: str) -> str:
        return self.template.format(address=address, host=host)


def progress_mib(stats: dict[str, int]) -> tuple[int, int] | None:
    """(processed, remaining) MiB of a migration job's statistics, None if there is no
    job (or libvirt says nothing of its data yet). ``data_*`` covers memory and disks;
    ``memory_*`` stands in when an older libvirt gives only those."""
    if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
        return None
    for prefix in ("data", "memory"):
        processed = stats.get(f"{prefix}_processed")
        remaining = stats.get(f"{prefix}_remaining")
        if processed is not None and remaining is not None:
            return max(0, processed) // MIB, max(0, remaining) // MIB
    return None


def report_id(kind: str, host: str, instance_id: str, *parts: object) -> str:
    """An idempotency key (<= 128 characters of the key alphabet) for a report."""
    tail = "-".join(str(p) for p in parts)
    key = f"{kind}-{host}-{instance_id}-{tail}".replace("_", ".")
    if len(key) <= 128:
        return key
    digest = hashlib.sha256(f"{host}/{instance_id}".encode()).hexdigest()[:32]
    return f"{kind}-{digest}-{tail}"[:128]


@dataclass
class Migration:
    """An outgoing migration in flight: the domain, the job's generation and target, its
    deadline (epoch ms; a newer job may bring it forward), and why it was aborted (the
    first reason wins; None while nobody asked)."""

    instance_id: str
    generation: int
    dom: libvirt.virDomain
    dest: str
    address: str
    deadline_at: int
    reason: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def newer_job(self, outgoing: Outgoing | None, now_ms: int) -> str | None:
        """Why a newer job for the instance ends this migration (None: it does not).
        Without ``outgoing`` the fold no longer wants it moved; with another target it
        wants it elsewhere; with a deadline that has passed (the fold's abort while memory
        moves) at once; a later deadline is ignored, an earlier one is kept."""
        if outgoing is None:
            return "aborted"
        if (outgoing.dest, outgoing.address) != (self.dest, self.address):
            return f"aborted: the destination is now {outgoing.dest} ({outgoing.address})"
        self.deadline_at = min(self.deadline_at, outgoing.deadline_at)
        if self.deadline_at <= now_ms:
            return "aborted"
        return None

    def abort(self, reason: str) -> bool:
        """Ask libvirt to abort (once); False if it was asked already or refused (the
        migration is over, or past the point where it can be cancelled)."""
        with self._lock:
            if self.reason is not None:
                return False
            self.reason = reason
        try:
            self.dom.abortJob()
        except libvirt.libvirtError as exc:
            log.info("migration_abort_refused", instance=self.instance_id, reason=reason,
                     error=str(exc))
            return False
        log.info("migration_abort_asked", instance=self.instance_id, reason=reason)
        return True


_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None


def event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread (once per
    process). Call it before opening a connection whose events are wanted."""
    global _loop_thread
    with _loop_lock:
        if _loop_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except Exception:  # one bad iteration must not end the events
                    log.exception("libvirt_event_loop_error")

        _loop_thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
        _loop_thread.start()


__all__ = ["DEFAULT_MIGRATION_URI", "MIGRATE_FLAGS", "PROGRESS_S", "Migration",
           "MigrationTarget", "event_loop", "progress_mib", "report_id"]
