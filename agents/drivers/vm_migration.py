"""`VmDriver`'s part of a live migration, the calls of both sides (what they do, and why,
is in `agents.drivers.vm`'s docstring): a mixin of the driver, on its own state
(connection, ports, reporter, the migrations under way here)."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import libvirt
import structlog

from agents.drivers.domains import DOMAIN_PREFIX, domain_name
from agents.drivers.errors import DriverError, PermanentDriverError, TransientDriverError
from agents.drivers.migration import (
    MIGRATE_FLAGS,
    PROGRESS_S,
    Migration,
    progress_mib,
    report_id,
)
from agents.net import names
from agents.net.names import port_name as tap_name
from schemas import commands as c
from schemas.specs import InstanceSpec, Outgoing

log = structlog.get_logger()


class LiveMigration:
    """The methods of `VmDriver` that move a guest; see `agents.drivers.vm`."""

    # -- migration: the destination ----------------------------------------------------------

    def _receive(self, instance_id: str, spec: InstanceSpec, generation: int) -> str:
        """The guest is coming here: everything it needs but its domain, which libvirt
        brings. "incoming", or "running" once it has arrived (a re-apply after it did)."""
        name = domain_name(instance_id)
        with self._state_lock:  # first: an arrival while this runs reports this generation
            self._incoming[instance_id] = (spec, generation)
        with self._errors(f"libvirtd of {self.host}"):
            self._connection().getLibVersion()  # it answers, or the migration cannot come
        if self.ports is not None and self.underlay_ip is not None:
            from agents.net.firewall import PortPolicy

            for i, nic in enumerate(spec.nics):
                bridge = names.bridge_name(nic.vni)
                with self._net(f"segment bridge {bridge}"):
                    present = self.ports.host.rtnl.link(bridge) is not None
                if not present:  # the network's job makes it, maybe right now
                    raise TransientDriverError(
                        f"incoming {name}: segment bridge {bridge} (VNI {nic.vni}) is not "
                        f"here yet")
                port = tap_name(instance_id, i)
                # Written before the tap exists (the rules name it), so that the tap can be
                # plugged the moment libvirt creates it.
                with self._net(f"firewall of {port}"):
                    self.ports.firewall.converge(PortPolicy(
                        port, bridge, nic.mac, nic.ip, spec.template.rules))
        dom = self._lookup(instance_id)
        if dom is None:
            return "incoming"
        self._ours(dom, instance_id)
        if self._observed(dom, name) != "running":
            return "incoming"  # on its way (paused), or a definition left inactive
        self._plug(instance_id, spec)  # it has arrived already
        return "running"

    def _on_lifecycle(self, _conn: libvirt.virConnect, dom: libvirt.virDomain, event: int,
                      detail: int, _opaque: object) -> None:
        """libvirt's event thread: only hand over what matters, to the arrivals thread."""
        name = dom.name()
        if not name.startswith(DOMAIN_PREFIX):
            return
        instance_id = name[len(DOMAIN_PREFIX):]
        if (event, detail) == (libvirt.VIR_DOMAIN_EVENT_STARTED,
                               libvirt.VIR_DOMAIN_EVENT_STARTED_MIGRATED):
            what = "started"
        elif (event, detail) == (libvirt.VIR_DOMAIN_EVENT_RESUMED,
                                 libvirt.VIR_DOMAIN_EVENT_RESUMED_MIGRATED):
            what = "resumed"
        else:
            return
        with self._state_lock:
            if instance_id not in self._incoming:
                return
            if self._arrivals is None:
                self._arrivals = ThreadPoolExecutor(1, thread_name_prefix=f"arrivals-{self.host}")
            # One thread, in order: the plug of "started" is done before "resumed" reports.
            self._arrivals.submit(self._arrival, instance_id, what)

    def _arrival(self, instance_id: str, what: str) -> None:
        with self._state_lock:
            entry = self._incoming.get(instance_id)
        if entry is None:
            return  # a newer job came meanwhile: it converges the guest itself
        spec, generation = entry
        if what == "started" or instance_id not in self._plugged_on_arrival:
            # QEMU runs (paused) and its taps exist: on their segments now, before it resumes.
            try:
                self._plug(instance_id, spec)
            except DriverError as exc:
                log.warning("arrival_plug_failed", instance=instance_id, stage=what,
                            error=str(exc))
            else:
                with self._state_lock:
                    self._plugged_on_arrival.add(instance_id)
            if what == "started":
                return
        log.info("migration_arrived", instance=instance_id, host=self.host,
                 generation=generation)
        self._report(c.Applied(cmd_id=report_id("arrived", self.host, instance_id, generation),
                               id=instance_id, generation=generation, observed="running"))
        # Then its metadata names this host (it still names the source): observe() and
        # generations() see it here, and an agent restarted before the next job adopts it.
        try:
            dom = self._lookup(instance_id)
            if dom is not None:
                meta = self._ours(dom, instance_id)
                with self._errors(f"metadata of {domain_name(instance_id)}"):
                    self._set_metadata(dom, instance_id, generation, meta.get("digest", ""))
        except DriverError as exc:
            log.warning("arrival_metadata_failed", instance=instance_id, error=str(exc))

    def _report(self, cmd: c.Command) -> None:
        if self._reporter is None:
            log.warning("report_unsent", type=type(cmd).__name__, id=cmd.id)
            return
        self._reporter(cmd)

    # -- migration: the source ----------------------------------------------------------------

    def _send(self, instance_id: str, spec: InstanceSpec, out: Outgoing,
              generation: int) -> str:
        """Migrate the guest to ``out.dest``, once per generation: "migrated", or a
        PermanentDriverError saying why not (the same again on a re-apply)."""
        with self._state_lock:
            known = self._outcomes.get(instance_id)
        if known is not None and known[0] == generation:
            _gen, observed, error = known
            if error is not None:
                raise PermanentDriverError(error)
            assert observed is not None
            return observed
        try:
            observed = self._send_once(instance_id, out, generation)
        except PermanentDriverError as exc:
            with self._state_lock:
                self._outcomes[instance_id] = (generation, None, str(exc))
            raise
        with self._state_lock:
            self._outcomes[instance_id] = (generation, observed, None)
            self._moved[instance_id] = (generation, out)
        return observed

    def _send_once(self, instance_id: str, out: Outgoing, generation: int) -> str:
        name = domain_name(instance_id)
        uri = self.migration_target.uri(out.address, out.dest)
        dom = self._lookup(instance_id)
        here = False
        if dom is not None:
            self._ours(dom, instance_id)
            with self._errors(f"state of {name}"):
                here = self._is_active(dom)
        if not here:  # gone already: a migration before this agent's restart, or never here
            if self._runs_at(uri, instance_id):
                return "migrated"
            raise PermanentDriverError(
                f"{name} runs nowhere: not on {self.host}, not on {out.dest} ({uri})")
        assert dom is not None
        # A peer-to-peer migration goes on in libvirtd when the agent that asked for it
        # dies: a restarted agent watches that one (a second would be refused).
        with self._errors(f"jobs of {name}"):
            job = dom.jobStats()
        in_flight = (job.get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_NONE
                     and job.get("operation") == libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT)
        left_ms = out.deadline_at - time.time() * 1000
        if left_ms <= 0 and not in_flight:
            raise PermanentDriverError(
                f"deadline passed {-left_ms / 1000:.1f}s before the migration of {name} to "
                f"{out.dest} could start")
        migration = Migration(instance_id, generation, dom, out.dest, out.address,
                              out.deadline_at)
        with self._state_lock:
            self._migrations[instance_id] = migration
        try:
            return self._migrate(migration, uri, out, adopted=in_flight)
        finally:
            with self._state_lock:
                self._migrations.pop(instance_id, None)

    def _migrate(self, migration: Migration, uri: str, out: Outgoing, *,
                 adopted: bool = False) -> str:
        """libvirt's migration in a thread (``adopted``: one that runs already, watched
        until its job ends); this one reports its progress and aborts it at its deadline
        (``migration.deadline_at``, which a newer job may bring forward). libvirt's
        outcome is the outcome, whoever asked to abort."""
        instance_id, dom = migration.instance_id, migration.dom
        params: dict[str, int] = {}
        if self.migration_bandwidth_mib is not None:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = self.migration_bandwidth_mib
        failure: list[BaseException] = []
        ended: list[float] = []
        done = threading.Event()

        def run() -> None:
            try:
                if not adopted:
                    dom.migrateToURI3(uri, params, MIGRATE_FLAGS)
                    return
                while dom.jobStats().get("type", libvirt.VIR_DOMAIN_JOB_NONE) != (
                        libvirt.VIR_DOMAIN_JOB_NONE):
                    time.sleep(0.05)
            except libvirt.libvirtError as exc:
                # Watched: the domain is gone or stopped here, so its job has ended.
                if not adopted or exc.get_error_code() not in (
                        libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                    failure.append(exc)  # handed to the apply thread
            except BaseException as exc:
                failure.append(exc)
            finally:
                ended.append(time.monotonic())
                done.set()

        started = time.monotonic()
        started_ms = int(time.time() * 1000)

        def deadline() -> float:  # monotonic
            if migration.reason is not None:
                return math.inf  # asked once; libvirt ends it (or completes it)
            return started + (migration.deadline_at - started_ms) / 1000

        next_report = started + PROGRESS_S
        seq = 0
        last: tuple[int, int] | None = None
        log.info("migration_started", instance=instance_id, dest=out.dest, uri=uri,
                 generation=migration.generation,
                 deadline_s=round(deadline() - started, 3), adopted=adopted)
        threading.Thread(target=run, name=f"migrate-{instance_id}", daemon=True).start()
        while not done.wait(max(0.0, min(next_report, deadline()) - time.monotonic())):
            now = time.monotonic()
            if now >= deadline():
                migration.abort("deadline exceeded")
            if now >= next_report:
                next_report = now + PROGRESS_S
                try:
                    figures = progress_mib(dom.jobStats())
                except libvirt.libvirtError:
                    figures = None  # it is ending: the outcome comes next
                if figures is not None:
                    last, seq = figures, seq + 1
                    self._progress(migration, started_ms, seq, *figures)
        seconds = ended[0] - started
        if adopted and not failure and not self._runs_at(uri, instance_id):
            # Its job ended, and not with the guest there: libvirt's reason, if it kept one.
            with self._errors(f"jobs of {domain_name(instance_id)}"):
                try:
                    reason = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED).get(
                        "errmsg", "")
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
                    reason = ""
            failure.append(RuntimeError(
                "the migration running when this agent started ended without moving it"
                + (f": {reason}" if reason else "")))
        if not failure:
            stats = self._completed_stats(uri, instance_id)
            total = progress_mib(stats) if stats else None
            processed = total[0] if total else (sum(last) if last else 0)
            self._progress(migration, started_ms, seq + 1, processed, 0)
            log.info("migration_done", instance=instance_id, dest=out.dest,
                     seconds=round(seconds, 3), downtime_ms=stats.get("downtime"),
                     processed_mib=processed, asked_to_abort=migration.reason)
            return "migrated"
        exc = failure[0]
        detail = str(exc) or repr(exc)
        log.warning("migration_failed", instance=instance_id, dest=out.dest,
                    seconds=round(seconds, 3), reason=migration.reason, error=detail)
        if migration.reason is not None:
            raise PermanentDriverError(
                f"{migration.reason}: migration to {out.dest} after {seconds:.1f}s: {detail}")
        raise PermanentDriverError(f"migration to {out.dest} failed after {seconds:.1f}s: "
                                   f"{detail}")

    def _progress(self, migration: Migration, started_ms: int, seq: int, processed: int,
                  remaining: int) -> None:
        self._report(c.MigrationProgress(
            cmd_id=report_id("migration", self.host, migration.instance_id,
                             migration.generation, started_ms, seq),
            id=migration.instance_id, generation=migration.generation,
            processed_mib=processed, remaining_mib=remaining))

    def interrupt(self, instance_id: str, spec: InstanceSpec | None, generation: int) -> None:
        """A newer job came while this instance's job is being applied (the runtime calls
        this without the entity's lock): one without ``outgoing``, or with another target,
        or with a deadline that has passed (the fold's abort while memory moves) aborts a
        migration that an older job started. The outgoing apply then says how it ended."""
        with self._state_lock:
            migration = self._migrations.get(instance_id)
        if migration is None or generation <= migration.generation:
            return
        why = migration.newer_job(spec.outgoing if spec is not None else None,
                                  int(time.time() * 1000))
        if why is not None:
            migration.abort(why)

    @contextlib.contextmanager
    def _remote(self, uri: str) -> Iterator[libvirt.virConnect]:
        """A connection to another host's libvirtd, opened from this host's namespace
        (the underlay is there; the socket stays in it)."""
        from agents.guest_service import in_netns

        try:
            with in_netns(self.netns) if self.netns else contextlib.nullcontext():
                conn = libvirt.open(uri)
        except (libvirt.libvirtError, OSError) as exc:
            raise TransientDriverError(f"cannot reach {uri}: {exc}") from exc
        try:
            yield conn
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def _runs_at(self, uri: str, instance_id: str) -> bool:
        """Whether the instance's domain runs on the libvirtd at ``uri``."""
        with self._remote(uri) as conn:
            try:
                return self._power(conn.lookupByName(domain_name(instance_id))) == "running"
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return False
                raise TransientDriverError(
                    f"{domain_name(instance_id)} at {uri}: {exc}") from exc

    def _completed_stats(self, uri: str, instance_id: str) -> dict[str, int]:
        """libvirt's statistics of the migration that just completed, as the destination
        holds them (the source's domain is gone); {} if they cannot be read."""
        try:
            with self._remote(uri) as conn:
                dom = conn.lookupByName(domain_name(instance_id))
                # Kept: reading them would delete them otherwise.
                return dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED
                                    | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED)
        except (libvirt.libvirtError, TransientDriverError) as exc:
            log.info("migration_stats_unread", instance=instance_id, error=str(exc))
            return {}

    def _not_moved_away(self, instance_id: str, dom: libvirt.virDomain | None) -> None:
        """Refuse to start a guest here that this driver migrated away and that runs there:
        a job for this host that comes after a migration libvirt completed (the fold may
        have rolled back on an abort that came too late)."""
        with self._state_lock:
            moved = self._moved.get(instance_id)
        if moved is None:
            return
        with self._errors(f"state of {domain_name(instance_id)}"):
            back = dom is not None and self._is_active(dom)
        if back:  # it came back: a migration here
            with self._state_lock:
                self._moved.pop(instance_id, None)
            return
        generation, out = moved
        if self._runs_at(self.migration_target.uri(out.address, out.dest), instance_id):
            raise PermanentDriverError(
                f"{domain_name(instance_id)} runs on {out.dest} since its migration at "
                f"generation {generation}: not starting a second copy on {self.host}")
        with self._state_lock:
            self._moved.pop(instance_id, None)
