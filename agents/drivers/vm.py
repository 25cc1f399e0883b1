"""VM driver: converges the libvirt domains of one host to the instance specs it is given.

Two kinds of libvirt URI are supported:

- `test:///<abs path to node xml>`: libvirt's in-memory test driver (state lives in this
  driver's connection). Images are not checked, except that an image whose name starts with
  `missing` does not exist (a PermanentDriverError), so tests can exercise that path.
- `qemu:///system` (any qemu URI): real QEMU guests under TCG (`<domain type='qemu'>`),
  booting the tiny guest image of `agents.guest`. The only image that exists is `tiny`
  (alias `debian`); any other name is a PermanentDriverError.

A domain is *managed* when its name is `orch-<instance id>` and it carries our `<metadata>`
element (namespace NS_URI) with that id; nothing else is ever touched. The metadata also
holds the generation last applied and a digest of the desired definition, so that a domain
is redefined only when what it should be has materially changed.

NICs: with `bridge`, every NIC joins that one flat bridge (legacy). Otherwise each is a bare
tap named `tap_name(id, i)` (= `agents.net.names.port_name`) with the fold's MAC and the
segment's MTU; given `ports` (the `PortPlumbing` of the namespace the taps land in) and
`underlay_ip`, every apply of a running guest plugs its taps into their segments behind
their firewalls (idempotent: a resync repairs a detached tap), and a stop or removal
unplugs them first.

Live migration (issue 11; the fold runs it as a saga, this is one host's part of it; the
methods are in `agents.drivers.vm_migration`, which this driver is made of):

- a job with ``incoming`` (the destination's): the guest is coming here. Check that
  libvirtd answers and that the NICs' segment bridges exist (TransientDriverError until
  they do: the network's job makes them), write the ports' firewalls (they need no tap),
  define and start nothing, and observe "incoming". When libvirt starts the incoming
  domain (lifecycle event STARTED/MIGRATED: QEMU is paused, its taps exist) its taps are
  plugged at once; when it resumes here (RESUMED/MIGRATED) the driver reports
  `Applied(observed="running")` through the reporter at once: the fold repoints the
  port's forwarding entries on that report (PLATFORM-FACTS: that moment is what keeps
  the loss at the hypervisor's own downtime).
- a job with ``outgoing`` (the source's): live-migrate the running domain, peer to peer
  (`migration.MIGRATE_FLAGS`), to the destination's libvirtd (`migration_uri`, a template
  of the destination's underlay address), report `MigrationProgress` every 0.5 s, abort it
  at ``deadline_at``; observe "migrated", or raise PermanentDriverError with libvirt's
  reason (the fold rolls back; nothing here retries a migration). An outcome is
  remembered per generation: a re-apply reports it again and migrates nothing. Without
  that memory (a restarted agent) libvirt decides: not here but running on the
  destination is "migrated".
- `interrupt()`: the runtime's hook when a newer job comes while one is being applied;
  a newer job without ``outgoing``, with another target, or with a deadline that has
  passed (the fold's abort while memory moves) aborts the running migration (libvirt
  decides whether it still could: the outgoing apply then says what really happened).
  The fold sends the destination each generation of the move too (``incoming``): the
  arrival reports the newest one given.
- once arrived (and reported), the domain's metadata names this host and the incoming
  generation; a normal job adopts it as it is (no restart: same digest); a removal also
  removes the firewalls of the instance's taps that are gone with a guest that left (or
  never came).

Never two running copies: the guest is never started here by an incoming job, and a
guest that this driver migrated away is not started again here while it runs there.

All calls are synchronous libvirt calls: the agent runs them in a thread. Two calls for the
same instance must not run concurrently (the agent's work queue guarantees it).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from xml.sax.saxutils import quoteattr

import libvirt
import msgspec
import structlog

from agents.drivers.domains import DOMAIN_PREFIX, domain_name
from agents.drivers.errors import DriverError, PermanentDriverError, TransientDriverError
from agents.drivers.migration import (
    DEFAULT_MIGRATION_URI,
    Migration,
    MigrationTarget,
    event_loop,
)
from agents.drivers.vm_migration import LiveMigration
from agents.guest import READY_MARKER, GuestImage, build_guest_image
from agents.net.names import port_name as tap_name
from schemas import commands as c
from schemas.ids import mac_address
from schemas.specs import InstanceSpec, InstanceTemplate, NicSpec, Outgoing

if TYPE_CHECKING:
    from agents.net.ports import PortPlumbing

NS_URI = "urn:orch:instance:1"
NS_PREFIX = "orch"
# Names of images the qemu driver can boot: all are the built-in tiny guest.
KNOWN_IMAGES = frozenset({"tiny", "debian"})
# qboot (shipped by qemu-system-data) boots a direct kernel ~1.5 s faster than SeaBIOS.
QBOOT = Path("/usr/share/qemu/qboot.rom")
DEFAULT_CONSOLE_DIR = Path("/var/log/orch-guests")
DEFAULT_NIC_PREFIX = 24  # Nic.ip carries no prefix length; the network's CIDR is not in the spec

Observed = Literal["running", "stopped"]
Reporter = Callable[[c.Command], None]
# A removal looks for firewalls of this many NICs of a guest that is gone (taps are named
# by instance and index; the spec that said how many is not in a removal).
NIC_SCAN = 64

log = structlog.get_logger()

# libvirt prints every error on stderr by default, including the expected "no domain".
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


# Errors that retrying the same request cannot fix. Anything else is treated as transient:
# the orchestrator bounds retries and alerts when they run out.
_PERMANENT_CODES = frozenset(
    {
        libvirt.VIR_ERR_XML_ERROR,
        libvirt.VIR_ERR_XML_DETAIL,
        libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
        libvirt.VIR_ERR_INVALID_ARG,
        libvirt.VIR_ERR_NO_SUPPORT,
    }
)
# Errors that mean the connection itself is gone: drop it, the next call reconnects.
_CONNECTION_CODES = frozenset(
    {
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_INVALID_CONN,
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_SYSTEM_ERROR,
        libvirt.VIR_ERR_AUTH_FAILED,
        libvirt.VIR_ERR_AUTH_UNAVAILABLE,
    }
)


def domain_uuid(instance_id: str) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, NS_URI + "/" + instance_id)


class VmDriver(LiveMigration):
    def __init__(
        self,
        uri: str,
        host: str,
        guest: GuestImage | None = None,
        bridge: str | None = None,
        *,
        console_dir: Path = DEFAULT_CONSOLE_DIR,
        shutdown_grace: float = 5.0,
        nic_prefix: int = DEFAULT_NIC_PREFIX,
        ports: PortPlumbing | None = None,
        underlay_ip: str | None = None,
        netns: str | None = None,
        migration_uri: str = DEFAULT_MIGRATION_URI,
        migration_bandwidth_mib: int | None = None,
    ) -> None:
        """`bridge`: every NIC on that one flat bridge (legacy). Otherwise each NIC is a
        bare tap; with `ports` (the plumbing of the namespace libvirtd puts taps in) and
        `underlay_ip`, the driver plugs each running guest's taps into their segments
        behind their firewalls, and unplugs them when the guest stops or goes.

        Migration: `migration_uri` is the template of a destination libvirtd's URI
        (`{address}`: its underlay IPv4, `{host}`: its name); `netns` is the host's
        namespace, where the underlay is (None: the agent's own), from which this driver
        asks a destination whether a guest runs there; `migration_bandwidth_mib` caps a
        migration's bandwidth (None: libvirt's default, unlimited)."""
        if ports is not None and (bridge is not None or underlay_ip is None):
            raise ValueError("ports need an underlay_ip, and exclude a flat bridge")
        self.migration_target = MigrationTarget(migration_uri)
        self.migration_bandwidth_mib = migration_bandwidth_mib
        self.netns = netns
        self.uri = uri
        self.host = host
        self.bridge = bridge
        self.ports = ports
        self.underlay_ip = underlay_ip
        self.console_dir = console_dir
        if not uri.startswith("test:"):
            console_dir.mkdir(parents=True, exist_ok=True)  # virtlogd will not create it
        self.shutdown_grace = shutdown_grace
        self.nic_prefix = nic_prefix
        self.is_test = uri.startswith("test:")
        # The test driver lives in this process's memory: its calls never wait on anything.
        self.blocking = not self.is_test
        self._guest = guest
        # Rendering a definition costs as much as the libvirt calls of a power change.
        self._desired = functools.lru_cache(maxsize=4096)(self._render)
        self._conn: libvirt.virConnect | None = None
        self._conn_lock = threading.Lock()
        self._events_id: int | None = None  # the lifecycle callback on self._conn
        self._reporter: Reporter | None = None
        # Migration state, in memory only (libvirt's state decides after a restart), under
        # _state_lock: the event thread, the runtime's interrupt and applies all read it.
        self._state_lock = threading.Lock()
        self._incoming: dict[str, tuple[InstanceSpec, int]] = {}  # expected here, at gen
        self._plugged_on_arrival: set[str] = set()
        self._migrations: dict[str, Migration] = {}  # outgoing, running now
        self._outcomes: dict[str, tuple[int, str | None, str | None]] = {}  # gen, ok, error
        self._moved: dict[str, tuple[int, Outgoing]] = {}  # migrated away from here
        self._arrivals: ThreadPoolExecutor | None = None  # plugs and reports arrivals
        if not self.is_test:
            event_loop()  # before any connection: its events need the loop

    def set_reporter(self, reporter: Reporter) -> None:
        """Where migration progress and arrivals go (the agent's publisher; any thread)."""
        self._reporter = reporter

    # -- connection -------------------------------------------------------------------------

    def _connection(self) -> libvirt.virConnect:
        with self._conn_lock:
            if self._conn is not None:
                if self.is_test:
                    return self._conn
                with contextlib.suppress(libvirt.libvirtError):
                    if self._conn.isAlive():
                        return self._conn
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise TransientDriverError(f"cannot connect to {self.uri}: {exc}") from exc
            if not self.is_test:
                # Every domain's lifecycle: an incoming guest's arrival is seen here.
                try:
                    self._events_id = conn.domainEventRegisterAny(
                        None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
                except libvirt.libvirtError as exc:
                    with contextlib.suppress(libvirt.libvirtError):
                        conn.close()
                    raise TransientDriverError(
                        f"cannot watch the domains of {self.uri}: {exc}") from exc
            self._conn = conn
            return self._conn

    def close(self) -> None:
        """Close the libvirt connection, and the port plumbing given to this driver."""
        with self._conn_lock:
            if self._conn is not None:
                if self._events_id is not None:
                    with contextlib.suppress(libvirt.libvirtError):
                        self._conn.domainEventDeregisterAny(self._events_id)
                    self._events_id = None
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None
        if self._arrivals is not None:
            self._arrivals.shutdown(wait=True)
            self._arrivals = None
        if self.ports is not None:
            self.ports.close()

    def __enter__(self) -> VmDriver:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate libvirt errors into the driver's transient/permanent errors."""
        try:
            yield
        except libvirt.libvirtError as exc:
            code = exc.get_error_code()
            if code in _CONNECTION_CODES and not self.is_test:
                # Never for test:///: its state lives in the connection, a new one is empty.
                with self._conn_lock:
                    self._conn = None
            if code in _PERMANENT_CODES:
                raise PermanentDriverError(f"{what}: {exc}") from exc
            raise TransientDriverError(f"{what}: {exc}") from exc

    # -- reading ----------------------------------------------------------------------------

    def _lookup(self, instance_id: str) -> libvirt.virDomain | None:
        name = domain_name(instance_id)
        try:
            return self._connection().lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            with self._errors(f"lookup {name}"):
                raise

    @staticmethod
    def _metadata(dom: libvirt.virDomain) -> dict[str, str] | None:
        """Our metadata of a domain (live if running), or None if it has none (unmanaged)."""
        try:
            raw = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS_URI, 0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in (
                libvirt.VIR_ERR_NO_DOMAIN_METADATA,
                libvirt.VIR_ERR_NO_DOMAIN,  # vanished between listing and reading
            ):
                return None
            raise
        try:
            return dict(ET.fromstring(raw).attrib)
        except ET.ParseError:
            return None

    def _managed(self) -> dict[str, tuple[libvirt.virDomain, dict[str, str]]]:
        """Managed domains by instance id: name prefix plus our metadata naming that id and
        this host (agents of several hosts may share one libvirtd, as tests do)."""
        out: dict[str, tuple[libvirt.virDomain, dict[str, str]]] = {}
        with self._errors("list domains"):
            for dom in self._connection().listAllDomains(0):
                name = dom.name()
                if not name.startswith(DOMAIN_PREFIX):
                    continue
                meta = self._metadata(dom)
                if (meta and domain_name(meta.get("id", "")) == name
                        and meta.get("host") == self.host):
                    out[meta["id"]] = (dom, meta)
        return out

    @staticmethod
    def _power(dom: libvirt.virDomain) -> Observed:
        state, _reason = dom.state()
        # Only a domain whose vCPUs run counts as running; paused/crashed/... are converged
        # by apply() like a stopped one.
        running = state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED)
        return "running" if running else "stopped"

    def observe(self) -> dict[str, str]:
        """Power state of every managed instance on this host."""
        result: dict[str, str] = {}
        with self._errors("observe"):
            for instance_id, (dom, _meta) in self._managed().items():
                try:
                    result[instance_id] = self._power(dom)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
        return result

    def generations(self) -> dict[str, int]:
        """The generation last applied to every managed instance on this host."""
        with self._errors("observe"):
            return {i: int(meta.get("generation", "0")) for i, (_, meta) in self._managed().items()}

    def generation(self, instance_id: str) -> int | None:
        """Generation last applied to the instance, None if it has no managed domain."""
        dom = self._lookup(instance_id)
        if dom is None:
            return None
        with self._errors(f"metadata of {domain_name(instance_id)}"):
            meta = self._metadata(dom)
        if not meta or meta.get("id") != instance_id:
            return None
        return int(meta.get("generation", "0"))

    # -- the desired definition -------------------------------------------------------------

    @property
    def guest(self) -> GuestImage:
        if self._guest is None:
            try:
                self._guest = build_guest_image()
            except (OSError, ValueError) as exc:
                raise PermanentDriverError(f"cannot build the guest image: {exc}") from exc
        return self._guest

    def _check_image(self, image: str) -> None:
        if self.is_test:
            if image.startswith("missing"):
                raise PermanentDriverError(f"image {image} does not exist")
        elif image not in KNOWN_IMAGES:
            raise PermanentDriverError(
                f"image {image} does not exist (known: {', '.join(sorted(KNOWN_IMAGES))})"
            )

    def console_log(self, instance_id: str) -> Path:
        return self.console_dir / f"{instance_id}.log"

    def _nic_addresses(self, instance_id: str, tpl: InstanceTemplate,
                       resolved: tuple[NicSpec, ...]) -> list[tuple[str, str | None]]:
        """Each NIC's (MAC, address/prefix): as the fold resolved it, or, for a job of an
        older orchestrator, derived here as then."""
        out = []
        for i, nic in enumerate(tpl.nics):
            if i < len(resolved):
                out.append((resolved[i].mac, f"{resolved[i].ip}/{resolved[i].prefix}"))
            else:
                out.append((mac_address(instance_id, i),
                            f"{nic.ip}/{self.nic_prefix}" if nic.ip else None))
        return out

    def _definition(self, instance_id: str, tpl: InstanceTemplate,
                    resolved: tuple[NicSpec, ...] = ()) -> str:
        """Domain XML for the template, without our metadata (an empty <metadata/> stands in)."""
        addresses = self._nic_addresses(instance_id, tpl, resolved)
        dom = ET.Element("domain", type="test" if self.is_test else "qemu")
        ET.SubElement(dom, "name").text = domain_name(instance_id)
        ET.SubElement(dom, "metadata")
        ET.SubElement(dom, "memory", unit="MiB").text = str(tpl.memory_mib)
        ET.SubElement(dom, "vcpu").text = str(tpl.vcpus)
        os_ = ET.SubElement(dom, "os")
        ET.SubElement(os_, "type", arch="x86_64").text = "hvm"
        if not self.is_test:
            nic_args = " ".join(f"orch.nic={mac}" + (f",{address}" if address else "")
                                for mac, address in addresses)
            if QBOOT.exists():
                ET.SubElement(os_, "loader", type="rom").text = str(QBOOT)
            ET.SubElement(os_, "kernel").text = str(self.guest.kernel)
            ET.SubElement(os_, "initrd").text = str(self.guest.initrd)
            # quiet: kernel output on the serial port is slow under TCG and would interleave
            # with the ready marker; mitigations=off saves ~0.3 s of boot in a test guest.
            ET.SubElement(os_, "cmdline").text = (
                f"console=ttyS0 quiet panic=-1 mitigations=off orch.id={instance_id} {nic_args}"
            ).strip()
            features = ET.SubElement(dom, "features")
            ET.SubElement(features, "acpi")  # the power button: shutdown() works
        ET.SubElement(dom, "on_poweroff").text = "destroy"
        ET.SubElement(dom, "on_reboot").text = "restart"
        ET.SubElement(dom, "on_crash").text = "destroy"
        devices = ET.SubElement(dom, "devices")
        for i, (mac, _) in enumerate(addresses):
            if self.bridge:
                iface = ET.SubElement(devices, "interface", type="bridge")
                ET.SubElement(iface, "source", bridge=self.bridge)
            else:
                # A bare tap with a known name: the network driver plugs it where it belongs.
                iface = ET.SubElement(devices, "interface", type="ethernet")
            ET.SubElement(iface, "mac", address=mac)
            ET.SubElement(iface, "target", dev=tap_name(instance_id, i))
            ET.SubElement(iface, "model", type="virtio")
            if i < len(resolved):  # the segment's MTU: the tap's and the guest's NIC's
                ET.SubElement(iface, "mtu", size=str(resolved[i].mtu))
            if not self.is_test:
                ET.SubElement(iface, "rom", enabled="no")  # no iPXE: we boot a kernel directly
        if not self.is_test:
            serial = ET.SubElement(devices, "serial", type="pty")
            # virtlogd copies the console to a file that survives the guest.
            ET.SubElement(serial, "log", file=str(self.console_log(instance_id)), append="off")
            ET.SubElement(serial, "target", port="0")
            console = ET.SubElement(devices, "console", type="pty")
            ET.SubElement(console, "target", type="serial", port="0")
            ET.SubElement(devices, "controller", type="usb", model="none")
            ET.SubElement(devices, "memballoon", model="none")
        return ET.tostring(dom, encoding="unicode")

    def _render(self, instance_id: str, template: InstanceTemplate,
                resolved: tuple[NicSpec, ...]) -> tuple[str, str, str]:
        """The definition of an instance, the digest of what it is made from, and the
        digest agents before 2026-11 stored (of the XML itself).

        The digest covers the template and this agent's settings, not the XML: an agent
        that renders differently after an upgrade (another MAC scheme, another device)
        leaves running guests alone until their template changes, instead of restarting
        every one of them.
        """
        xml = self._definition(instance_id, template, resolved)
        guest = (str(self._guest.kernel), str(self._guest.initrd)) if self._guest else None
        inputs = msgspec.json.encode((template, self.bridge, self.nic_prefix, guest))
        if resolved:  # a job of an older orchestrator had none: its digest stays the same
            inputs += msgspec.json.encode(resolved)
        return (xml, hashlib.sha256(inputs).hexdigest()[:32],
                hashlib.sha256(xml.encode()).hexdigest()[:32])

    def _with_metadata(self, xml: str, instance_id: str, generation: int, digest: str) -> str:
        attrs = self._metadata_attrs(instance_id, generation, digest)
        element = f"<{NS_PREFIX}:instance xmlns:{NS_PREFIX}={quoteattr(NS_URI)} {attrs}/>"
        if "<metadata />" not in xml:
            raise AssertionError("domain XML without its <metadata /> placeholder")
        return xml.replace("<metadata />", f"<metadata>{element}</metadata>", 1)

    def _metadata_attrs(self, instance_id: str, generation: int, digest: str) -> str:
        attrs = {
            "id": instance_id,
            "generation": str(generation),
            "digest": digest,
            "host": self.host,
        }
        return " ".join(f"{k}={quoteattr(v)}" for k, v in attrs.items())

    def _ours(self, dom: libvirt.virDomain, instance_id: str) -> dict[str, str]:
        """The metadata of the instance's domain; PermanentDriverError if it has none of
        ours (a domain of that name that orch never made is never touched)."""
        name = domain_name(instance_id)
        with self._errors(f"metadata of {name}"):
            meta = self._metadata(dom)
        if not meta or meta.get("id") != instance_id:
            raise PermanentDriverError(f"domain {name} exists but is not managed by orch")
        return meta

    # -- converging -------------------------------------------------------------------------

    def apply(self, instance_id: str, spec: InstanceSpec | None, generation: int) -> str:
        """Converge one instance to `spec` (None: absent); returns the observed power state
        ("incoming" and "migrated" for a migration's jobs, see the module's docstring).

        Idempotent: applying the same spec again changes nothing. A job older than the
        generation already applied (a redelivery overtaken by a newer job) changes nothing
        either, so the domain never regresses.
        """
        name = domain_name(instance_id)
        if spec is not None:
            self._check_image(spec.template.image)
            if spec.incoming:
                return self._receive(instance_id, spec, generation)
            if spec.outgoing is not None:
                return self._send(instance_id, spec, spec.outgoing, generation)
        with self._state_lock:
            self._incoming.pop(instance_id, None)
            self._plugged_on_arrival.discard(instance_id)
        dom = self._lookup(instance_id)
        meta = None
        if dom is not None:
            meta = self._ours(dom, instance_id)
            if int(meta.get("generation", "0")) > generation:
                return self._observed(dom, name)  # stale job: leave the newer state alone

        if spec is None:
            if dom is not None:
                self._unplug(dom)
                self._remove(dom, name)
            # The firewalls of taps gone with a guest that left (or never came).
            self._forget_ports(instance_id)
            with self._state_lock:
                self._moved.pop(instance_id, None)
                self._outcomes.pop(instance_id, None)
            return "absent"

        if spec.power == "running":
            self._not_moved_away(instance_id, dom)
        xml, digest, xml_digest = self._desired(instance_id, spec.template, spec.nics)
        with self._errors(f"define {name}"):
            # A domain an older agent defined, exactly as this one would (no NIC, whose MAC
            # scheme changed), is adopted as it is: upgrading restarts no such guest.
            if dom is None or meta is None or meta.get("digest") not in (digest, xml_digest):
                if dom is not None and self._is_active(dom):
                    # The definition only takes effect at boot: restart to converge.
                    self._stop(dom)
                full = self._with_metadata(xml, instance_id, generation, digest)
                # Same UUID as the existing domain (else libvirt refuses the name), or one
                # derived from the instance id for a new one.
                uid = dom.UUIDString() if dom is not None else str(domain_uuid(instance_id))
                full = full.replace("<metadata>", f"<uuid>{uid}</uuid><metadata>", 1)
                dom = self._connection().defineXML(full)
            elif ((meta.get("generation"), meta.get("digest"), meta.get("host"))
                  != (str(generation), digest, self.host)):
                # Also a guest migrated here: its metadata still names its old host.
                self._set_metadata(dom, instance_id, generation, digest)

        if spec.power != "running":
            self._unplug(dom)
        with self._errors(f"power {name} {spec.power}"):
            if spec.power == "running":
                self._start(dom)
            elif self._is_active(dom):
                self._stop(dom)
        if spec.power == "running":
            self._plug(instance_id, spec)
        return self._observed(dom, name)

    # -- ports ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _net(self, what: str) -> Iterator[None]:
        from agents.net.errors import NetError, NetlinkError, classify

        try:
            yield
        except NetlinkError as exc:
            error = classify(exc)
            cls = TransientDriverError if error.transient else PermanentDriverError
            raise cls(f"{what}: {error}") from exc
        except NetError as exc:
            cls = TransientDriverError if exc.transient else PermanentDriverError
            raise cls(f"{what}: {exc}") from exc

    def _forget_ports(self, instance_id: str) -> None:
        """Remove what is left of the instance's ports here without a domain to name them:
        the firewalls of taps that went with their QEMU (migrated away, or an incoming
        guest that never came)."""
        if self.ports is None:
            return
        with self._net(f"ports of {instance_id}"):
            left = self.ports.firewall.ports() & {tap_name(instance_id, i)
                                                  for i in range(NIC_SCAN)}
        for port in sorted(left):
            with self._net(f"unplug {port}"):
                self.ports.unplug(port)

    def _plug(self, instance_id: str, spec: InstanceSpec) -> None:
        """Each tap of the running guest on its segment (idempotent: the plumbing reads
        the kernel and writes only what differs, so every apply and resync repairs it)."""
        if self.ports is None or self.underlay_ip is None:
            return
        for i, nic in enumerate(spec.nics):
            port = tap_name(instance_id, i)
            with self._net(f"plug {port}"):
                self.ports.plug(port, nic, spec.template.rules, self.underlay_ip)

    def _unplug(self, dom: libvirt.virDomain) -> None:
        """Unplug the domain's taps (before it stops: a tap still on its bridge lets the
        plumbing remove a segment that is left without ports)."""
        if self.ports is None:
            return
        with self._errors(f"interfaces of {dom.name()}"):
            try:
                xml = dom.XMLDesc(0)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return
                raise
        for target in ET.fromstring(xml).iterfind("./devices/interface/target"):
            port = target.get("dev", "")
            if port:
                with self._net(f"unplug {port}"):
                    self.ports.unplug(port)

    def remove(self, instance_id: str) -> bool:
        """Destroy and undefine the instance's managed domain here; False if there is none."""
        dom = self._lookup(instance_id)
        if dom is None:
            return False
        with self._errors(f"metadata of {domain_name(instance_id)}"):
            meta = self._metadata(dom)
        if not meta or meta.get("id") != instance_id or meta.get("host") != self.host:
            return False  # not ours: never touched
        self._unplug(dom)
        self._remove(dom, domain_name(instance_id))
        self._forget_ports(instance_id)
        return True

    def _observed(self, dom: libvirt.virDomain, name: str) -> Observed:
        with self._errors(f"state of {name}"):
            return self._power(dom)

    @staticmethod
    def _is_active(dom: libvirt.virDomain) -> bool:
        return bool(dom.isActive())

    def _set_metadata(
        self, dom: libvirt.virDomain, instance_id: str, generation: int, digest: str
    ) -> None:
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        if self._is_active(dom):
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        # No xmlns here: libvirt puts the element in NS_URI itself (and fails if declared).
        element = f"<instance {self._metadata_attrs(instance_id, generation, digest)}/>"
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, element, NS_PREFIX, NS_URI, flags)

    @staticmethod
    def _start(dom: libvirt.virDomain) -> None:
        state, _ = dom.state()
        if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
            return
        if state == libvirt.VIR_DOMAIN_PAUSED:
            dom.resume()
            return
        if dom.isActive():  # crashed, shutting down, suspended: start from scratch
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
        dom.create()

    def _stop(self, dom: libvirt.virDomain) -> None:
        """ACPI shutdown, then destroy after the grace period (a guest may ignore it)."""
        try:
            if self.shutdown_grace > 0:
                dom.shutdown()
                deadline = time.monotonic() + self.shutdown_grace
                while dom.isActive() and time.monotonic() < deadline:
                    time.sleep(0.1)
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError as exc:
            # It stopped by itself meanwhile: that is what we wanted.
            if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID and not dom.isActive():
                return
            raise

    def _remove(self, dom: libvirt.virDomain, name: str) -> None:
        with self._errors(f"remove {name}"):
            try:
                if dom.isActive():
                    dom.destroy()  # it is going away: no point in a graceful shutdown
                # No UNDEFINE_NVRAM: we never use NVRAM and the test driver rejects the flag.
                dom.undefineFlags(
                    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                )
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:  # already gone
                    raise


__all__ = [
    "DOMAIN_PREFIX",
    "KNOWN_IMAGES",
    "NS_URI",
    "READY_MARKER",
    "DriverError",
    "PermanentDriverError",
    "TransientDriverError",
    "VmDriver",
    "domain_name",
    "mac_address",
    "tap_name",
]
