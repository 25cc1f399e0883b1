"""`orch demo` (what `make demo` runs): a short scenario on a private stack, then teardown.

Everything runs here: an embedded nats-server and PostgreSQL under ``root``, one
orchestrator replica as an asyncio task, a publisher, and two agent processes (hosts h1
and h2). The agents are separate programs (``python -m agents``): the orchestrator and
the agents meet only on the bus.

Where network namespaces can be made (root, or CAP_NET_ADMIN), the hosts are a fabric
(`orchestrator.fabric`: each host a namespace on an underlay bridge) and the agents run
namespace guests (``--guests netns --netns NS --underlay-ip IP``): the private network is
real (VXLAN between the hosts), and the demo shows a ping and a TCP answer crossing from a
guest on one host to a guest on the other. Two LB nodes (n1, n2) serve the pool's load
balancer there, announcing its VIP by BGP to an edge router (`orchestrator.edge`), and the
demo connects to the VIP from a client behind the router. Elsewhere each agent gets a
private in-memory libvirt ``test:///`` hypervisor, and the demo says that it skipped the
network and load-balancer parts and why.

Commands are sent in phases and the projection must settle between phases, because
some commands depend on follow-ups of earlier ones that live in other partitions (the
scheduler must know the hosts before an instance asks for a place; an instance must have
joined its network before the network's deletion can be refused because of it). At the
end every instance must be applied by its agent, and each agent is asked what its
hypervisor really runs.
"""

import asyncio
import collections
import contextlib
import ipaddress
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import nats
import uvloop
from nats.aio.client import Client
from nats.js import JetStreamContext
from rich.console import Console
from rich.table import Table
from rich.text import Text

from events.bus import Publisher, publish_raw
from events.heartbeats import read_heartbeats
from events.subjects import CMD_STREAM, command_msg_id, command_subject, inventory_subject
from events.topology import ensure_topology
from orchestrator import queries, render
from orchestrator.children import ChildExited, Children, uninterruptible
from orchestrator.deciders.lb import LoadBalancer, healthy_ports
from orchestrator.edge import Edge
from orchestrator.embedded import Stack, StackInfo, read_stack_file
from orchestrator.fabric import Fabric, unavailable
from orchestrator.replica import Replica, ReplicaConfig
from orchestrator.store import connect_pg
from schemas.codec import command_from_dict

DEMO_TIMEOUT_S = 60.0
SHOWN_KINDS = ("host", "instance", "network", "pool", "lb")
AGENT_HOSTS = ("h1", "h2")
# On the fabric: two LB nodes behind an edge router with a client (orchestrator/edge.py).
LB_NODES = ("n1", "n2")
VIP_CONNECTIONS = 20
DEFAULT_VIP = "198.51.100.10"  # without the fabric (no router, nothing announces it)
AGENT_RESYNC_S = 5.0
AGENT_STOP_GRACE_S = 3.0  # SIGTERM, then SIGKILL after this
INVENTORY_TIMEOUT_S = 5.0
GUEST_PORT = 8080  # namespace guests answer their instance id on it (agents.guest_service)
PING_COUNT = 3
AGENTS_DIR = "agents"  # under the demo directory: the agents' logs and their temp files
# What a stale demo directory (a run that was killed) may contain; anything else is not ours.
_DEMO_ENTRIES = {"nats", "pg", "stack.json", "stack.json.tmp", AGENTS_DIR}


class DemoError(RuntimeError):
    """The demo could not run or did not converge; the message says why, in one line."""


@dataclass(frozen=True, slots=True)
class Step:
    source: str
    doc: dict[str, Any]
    # Set: published as is on this kind's subject, bypassing validation, to show a rejection.
    raw_kind: str | None = None
    fabric_only: bool = False  # LB nodes: only where there are namespaces to be them


_WEB = {"vcpus": 1, "memory_mib": 512, "image": "tiny", "nics": [{"network": "net2"}],
        "rules": [{"protocol": "tcp", "port": 8080, "source": "10.20.0.0/24"}]}
_VM1 = {"vcpus": 2, "memory_mib": 2048, "image": "tiny", "nics": [{"network": "net1"}]}
NET2_CIDR = "10.20.0.0/24"
# One guest per host (equal empty hosts: the second goes where the first did not), each
# answering on GUEST_PORT to anyone on the network.
_APP = {"vcpus": 1, "memory_mib": 256, "image": "tiny", "nics": [{"network": "net2"}],
        "rules": [{"protocol": p, "port": GUEST_PORT, "source": NET2_CIDR}
                  for p in ("tcp", "udp")]}
APPS = ("app1", "app2")
STOPPED = {"vm1": "stopped"}  # what the scenario stops: it must be observed so

PHASES: list[tuple[str, list[Step]]] = [
    ("register two hosts and two LB nodes", [
        # Equal hosts: the scheduler (most free memory first) then spreads the instances.
        Step("admin", {"type": "RegisterHost", "id": "h1", "vcpus": 16, "memory_mib": 32768}),
        Step("admin", {"type": "RegisterHost", "id": "h2", "vcpus": 16, "memory_mib": 32768}),
        *(Step("admin", {"type": "RegisterHost", "id": node, "vcpus": 2, "memory_mib": 2048,
                         "role": "lb"}, fabric_only=True) for node in LB_NODES),
    ]),
    ("a private network with a guest on each host", [
        Step("user", {"type": "CreateNetwork", "id": "net2", "vni": 200, "cidr": NET2_CIDR}),
        *(Step("user", {"type": "CreateInstance", "id": app, "template": _APP})
          for app in APPS),
    ]),
    ("a network, an instance on it, a pool of 3 behind a load balancer", [
        Step("user", {"type": "CreateNetwork", "id": "net1", "vni": 100,
                      "cidr": "10.0.0.0/24"}),
        Step("user", {"type": "CreateInstance", "id": "vm1", "template": _VM1}),
        Step("user", {"type": "CreatePool", "id": "web", "size": 3, "template": _WEB}),
        # Same partition as the pool's creation, so the pool exists when it is attached.
        Step("user", {"type": "CreateLoadBalancer", "id": "lb1", "vip": "@VIP@",
                      "pool": "web", "services": [{"port": 80, "target_port": 8080, "health": {
                          "interval_ms": 500, "timeout_ms": 300, "http_path": "/"}}]}),
    ]),
    ("scale, stop, and two commands that must be refused", [
        Step("user", {"type": "ScalePool", "id": "web", "size": 5}),
        Step("user", {"type": "StopInstance", "id": "vm1"}),
        Step("user", {"type": "CreateInstance", "id": "vm1", "power": "running"},
             raw_kind="instance"),
        Step("user", {"type": "DeleteNetwork", "id": "net1"}),
    ]),
]


# ---- the run ------------------------------------------------------------------------


def _prepare(root: Path) -> None:
    here = Path.cwd()
    if root.resolve() == here or root.resolve() in here.parents:
        raise DemoError(f"{root} would remove the current directory: use a subdirectory")
    if read_stack_file(root) is not None:
        raise DemoError(f"a stack is already running in {root}: stop it first")
    if root.exists():
        entries = {p.name for p in root.iterdir()}
        if not entries <= _DEMO_ENTRIES:
            raise DemoError(f"{root} exists and is not a demo directory: remove it or use --dir")
        shutil.rmtree(root)  # left over by a killed run


def run(root: Path, console: Console, timeout_s: float = DEMO_TIMEOUT_S) -> None:
    """Run the whole demo; raise DemoError (or KeyboardInterrupt) after tearing down."""
    _prepare(root)
    made_parent = not root.parent.exists()
    stack = Stack(root)
    agents = Children(root / AGENTS_DIR, dict(os.environ))
    skipped = unavailable()  # None: the hosts can be namespaces on a fabric
    fabric = Fabric([*AGENT_HOSTS, *LB_NODES]) if skipped is None else None
    edge: Edge | None = None
    try:
        console.print(f"[bold]orch demo[/]: starting nats-server and PostgreSQL in {root}")
        try:
            info = stack.start()
        except (RuntimeError, OSError) as exc:
            raise DemoError(f"the embedded stack did not start: {exc}".splitlines()[0]) from None
        console.print(f"  nats  {info.nats_url}\n  pg    {info.pg_dsn}")
        if fabric is not None:
            edge = _start_fabric(fabric, info, agents, console)
        else:
            for host in AGENT_HOSTS:
                agents.start(host, "agents", "--host", host, "--nats", info.nats_url,
                             "--libvirt", "test", "--resync", str(AGENT_RESYNC_S))
            console.print(f"  agents {', '.join(AGENT_HOSTS)} (libvirt test:///, one private"
                          f" hypervisor each; logs in {agents.workdir})")
        uvloop.run(_scenario(info, agents, console, timeout_s, fabric, edge, skipped))
    finally:
        with uninterruptible():
            killed = agents.stop(AGENT_STOP_GRACE_S)
            if killed:
                console.print(f"agents {', '.join(killed)} did not exit within"
                              f" {AGENT_STOP_GRACE_S:.0f} s of SIGTERM: killed", style="dim")
            if edge is not None:  # the router (its namespaces go with the fabric's)
                edge.teardown()
            if fabric is not None:  # its namespaces, guests and their service processes
                fabric.teardown()
            stack.stop()
            shutil.rmtree(root, ignore_errors=True)
            if made_parent:
                with contextlib.suppress(OSError):  # only if still empty
                    root.parent.rmdir()
    gone = ", namespaces removed" if fabric is not None else ""
    console.print(f"agents and stack stopped, demo directory removed{gone}")


def _start_fabric(fabric: Fabric, info: StackInfo, agents: Children,
                  console: Console) -> Edge:
    """The hosts as namespaces on an underlay bridge, an agent of namespace guests each;
    the LB nodes' agents, announcing by BGP to the edge's router."""
    try:
        fabric.setup()
        edge = Edge(fabric, list(LB_NODES), avoid=[ipaddress.IPv4Network(NET2_CIDR)])
        edge.setup()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        raise DemoError(f"the fabric of hosts could not be made: {exc}".splitlines()[0]) \
            from None
    console.print(f"  fabric {fabric.fabric_netns}: underlay {fabric.underlay} on bridge"
                  f" {fabric.bridge}, {fabric.setup_s or 0:.2f} s")
    for h in fabric.hosts:
        if h.name in LB_NODES:
            _, router_ip = edge.uplink(h.name)
            agents.start(h.name, "agents", "--host", h.name, "--nats", info.nats_url, "--lb",
                         "--netns", h.netns, "--underlay-ip", h.underlay_ip,
                         "--bgp-peer", router_ip, "--bgp-peer-asn", str(edge.router_asn),
                         "--bgp-asn", str(edge.node_asn), "--resync", str(AGENT_RESYNC_S))
            console.print(f"  agent {h.name}: LB node, namespace {h.netns}, BGP to the"
                          f" router {router_ip}")
            continue
        agents.start(h.name, "agents", "--host", h.name, "--nats", info.nats_url,
                     "--guests", "netns", "--netns", h.netns, "--underlay-ip", h.underlay_ip,
                     "--resync", str(AGENT_RESYNC_S))
        console.print(f"  agent {h.name}: namespace {h.netns}, underlay {h.underlay_ip},"
                      " namespace guests")
    console.print(f"  router {edge.router} (bird2, ECMP) and client {edge.client}"
                  f" {edge.client_ip}; VIPs from {edge.vips}")
    console.print(f"  (agents' logs in {agents.workdir})")
    return edge


@dataclass(slots=True)
class Watch:
    """What must stay alive while the demo waits, and the time it has left."""

    replica: asyncio.Task[None]
    agents: Children
    deadline: float
    timeout_s: float

    def check(self) -> None:
        if self.replica.done():
            exc = None if self.replica.cancelled() else self.replica.exception()
            raise DemoError(f"the orchestrator replica stopped: {exc!r}")
        try:
            self.agents.check()
        except ChildExited as exc:
            raise DemoError(f"an agent stopped: {exc}") from None

    def expired(self) -> bool:
        return time.monotonic() > self.deadline


async def _scenario(info: StackInfo, agents: Children, console: Console,
                    timeout_s: float, fabric: Fabric | None, edge: Edge | None,
                    skipped: str | None) -> None:
    stop = asyncio.Event()
    replica = Replica(ReplicaConfig(info.nats_url, info.pg_dsn, replica_id="demo", tick_s=0.2))
    replica_task = asyncio.create_task(replica.run(stop), name="replica")
    watch = Watch(replica_task, agents, time.monotonic() + timeout_s, timeout_s)
    nc: Client | None = None
    conn: asyncpg.Connection | None = None
    try:
        nc = await nats.connect(info.nats_url, name="orch-demo", connect_timeout=5)
        js = nc.jetstream()
        await ensure_topology(js)
        conn = await connect_pg(info.pg_dsn)
        publisher = Publisher(js)
        for n, (title, steps) in enumerate(PHASES, 1):
            console.print(f"\n[bold]{n}. {title}[/]")
            for i, step in enumerate(steps):
                if step.fabric_only and edge is None:
                    continue
                await _publish(js, publisher, step, f"demo-{n}-{i}", console,
                               edge.vip(0) if edge is not None else DEFAULT_VIP)
            folded = await _settle(js, conn, watch)
            console.print(f"  settled: {folded} commands folded (follow-ups included)")
            if n == 1 and fabric is not None:
                # Placement needs the hosts; a NIC's segment needs their VTEPs.
                await _underlays_known(conn, watch)
        console.print(f"\n[bold]{len(PHASES) + 1}. the agents apply what is wanted[/]")
        applied = await _converge(conn, watch)
        stopped = ", ".join(f"{i} observed {p}" for i, p in STOPPED.items())
        console.print(f"  converged: {applied} instances applied by their agents ({stopped})")
        await _settle(js, conn, watch)
        await _show(nc, conn, console, "guests" if fabric is not None else "libvirt")
        console.print("\n[bold]the private network net2 across hosts[/]")
        if fabric is not None:
            await _cross_hosts(nc, conn, fabric, console)
        else:
            console.print(f"  skipped (no ping, no TCP: the hosts are not namespaces here):"
                          f" {skipped}; run as root or with CAP_NET_ADMIN to see it",
                          style="yellow")
        console.print("\n[bold]the load balancer lb1: its VIP from a client behind the"
                      " router[/]")
        if edge is not None:
            await _through_the_vip(conn, edge, console, watch)
        else:
            console.print("  skipped: without namespaces there are no LB nodes to serve it"
                          " (it waits for them: see its reason above)", style="yellow")
        console.print(f"\n[bold]moving {APPS[1]} to {APPS[0]}'s host (orch migrate)[/]")
        if fabric is not None:
            await _move(js, publisher, conn, fabric, console, watch)
        else:
            console.print("  skipped: libvirt's test driver does not migrate", style="yellow")
    finally:
        stop.set()
        try:
            await asyncio.wait_for(replica_task, 15)
        except TimeoutError:
            pass  # wait_for has cancelled it
        except Exception:  # its failure was already reported by Watch.check
            pass
        if conn is not None:
            await conn.close()
        if nc is not None:
            await nc.close()


async def _publish(js: JetStreamContext, publisher: Publisher, step: Step, cmd_id: str,
                   console: Console, vip: str) -> None:
    doc = {"cmd_id": cmd_id, **step.doc}
    if doc.get("vip") == "@VIP@":
        doc["vip"] = vip
    type_, id_ = doc["type"], doc["id"]
    if step.raw_kind is not None:
        subject = command_subject(step.source, step.raw_kind, id_)
        msg_id = command_msg_id(step.source, step.raw_kind, id_, cmd_id)
        await publish_raw(js, [(subject, msgspec.json.encode(doc), msg_id)])
        console.print(f"  sent raw {type_} {step.raw_kind}/{id_} (unvalidated: no template)",
                      style="yellow")
        return
    cmd = command_from_dict(doc)
    published = await publisher.publish(step.source, cmd)
    line = render.published_line(type_, cmd.kind, id_, published.seq, published.duplicate)
    console.print(Text("  ").append_text(line).append(f"  ({step.source})", style="dim"))


async def _folded(js: JetStreamContext, conn: asyncpg.Connection) -> tuple[int, int, int]:
    """(messages stored in CMD, messages folded, outbox rows not yet relayed)."""
    stored = (await js.stream_info(CMD_STREAM)).state.messages
    try:
        folded, outbox = await queries.fold_progress(conn)
    except asyncpg.UndefinedTableError:  # the replica has not created its tables yet
        return stored, 0, 0
    return stored, folded, outbox


async def _settle(js: JetStreamContext, conn: asyncpg.Connection, watch: Watch) -> int:
    """Wait until every stored command is folded and every follow-up relayed, twice running.

    An empty outbox means every follow-up was published (rows go only after their acks),
    so once the folded count catches up with the stream nothing more is on its way.
    """
    streak = 0
    while True:
        watch.check()
        stored, folded, outbox = await _folded(js, conn)
        streak = streak + 1 if stored and folded == stored and outbox == 0 else 0
        if streak >= 2:
            return folded
        if watch.expired():
            raise DemoError(f"did not converge within {watch.timeout_s:.0f} s: {folded} of"
                            f" {stored} commands folded, {outbox} outbox rows pending")
        await asyncio.sleep(0.2)


def _applied(id_: str, state: dict[str, Any]) -> bool:
    if state["status"] == "deleted" or state.get("host") is None:
        return True  # nothing for an agent to do, or not yet placed (shown as such)
    if state["observed_generation"] != state["generation"]:
        return False
    return id_ not in STOPPED or state.get("observed") == STOPPED[id_]


def _lagging(states: dict[str, dict[str, Any]]) -> list[str]:
    """Instances whose agent has not yet applied what is wanted of them, by id."""
    return [id_ for id_, state in sorted(states.items()) if not _applied(id_, state)]


async def _converge(conn: asyncpg.Connection, watch: Watch) -> int:
    """Wait until every placed instance is applied; return how many there are."""
    while True:
        watch.check()
        rows = await queries.list_entities(conn, "instance")
        states = {r.id: r.state for r in rows}
        late = _lagging(states)
        if states and not late:
            return sum(1 for s in states.values() if s.get("host") and s["status"] != "deleted")
        if watch.expired():
            raise DemoError(f"the agents did not apply within {watch.timeout_s:.0f} s:"
                            f" {', '.join(late) or 'no instances'} not converged")
        await asyncio.sleep(0.1)


async def _underlays_known(conn: asyncpg.Connection, watch: Watch) -> None:
    """Wait until every host is up with its underlay address known to the fold."""
    while True:
        watch.check()
        rows = await queries.list_entities(conn, "host")
        known = {r.id for r in rows if r.state.get("underlay")}
        if known >= {*AGENT_HOSTS, *LB_NODES}:
            return
        if watch.expired():
            raise DemoError(f"the agents did not report their underlay within"
                            f" {watch.timeout_s:.0f} s: only {sorted(known)}")
        await asyncio.sleep(0.1)


def _rtt(fabric: Fabric, netns: str, address: str) -> str:
    """The ping's summary from `netns` to `address`: packets and round-trip times."""
    fabric.wait_ping(netns, address, within_s=5.0)
    out = fabric.exec(netns, "ping", "-n", "-q", "-c", str(PING_COUNT), "-i", "0.2", "-W", "1",
                      address, check=False).stdout
    lines = [line.strip() for line in out.splitlines() if "transmitted" in line or "rtt" in line]
    return "; ".join(lines) or f"no answer: {out.strip()}"


async def _cross_hosts(nc: Client, conn: asyncpg.Connection, fabric: Fabric,
                       console: Console) -> None:
    """Ping and TCP from app1's namespace to app2's, on another host, over VXLAN."""
    guests = []
    for app in APPS:
        row = await queries.get_entity(conn, "instance", app)
        if row is None or not row.state.get("host"):
            raise DemoError(f"instance {app} was not placed")
        host = fabric.host(row.state["host"])
        # The namespace guest driver names a guest `<host netns>.<instance id>` (short ids).
        guests.append((app, host, host.guest_prefix + app, row.state["nics"][0]["ip"]))
    (a, ha, ns_a, ip_a), (b, hb, _, ip_b) = guests
    where = "another host" if ha.name != hb.name else "the same host (placement put both there)"
    console.print(f"  {a} {ip_a} on {ha.name} ({ha.underlay_ip})  ->  {b} {ip_b} on"
                  f" {hb.name} ({hb.underlay_ip}), {where}")
    try:
        rtt = await asyncio.to_thread(_rtt, fabric, ns_a, ip_b)
    except (TimeoutError, RuntimeError) as exc:
        raise DemoError(f"ping {a} -> {b}: {exc}") from None
    console.print(f"  ping {ip_b}: {rtt}")
    for (src, _, ns, _), (dst, _, _, ip) in ((guests[0], guests[1]), (guests[1], guests[0])):
        try:
            answer = await asyncio.to_thread(Fabric.tcp, ns, ip, GUEST_PORT)
        except OSError as exc:
            raise DemoError(f"tcp {src} -> {ip}:{GUEST_PORT}: {exc}") from None
        console.print(f"  tcp {src} -> {ip}:{GUEST_PORT} answered: {answer.strip()!r}"
                      f" (the guest service says who it is: {dst})")
    row = await queries.get_entity(conn, "network", "net2")
    if row is not None:
        console.print("\n[bold]orch get network/net2[/] (its ports: where each MAC and IP lives)")
        console.print(render.entity_view(row))
    beats = await read_heartbeats(nc.jetstream())
    console.print("\n[bold]orch hosts[/] (each host's underlay: its VTEP)")
    console.print(render.hosts_table(await queries.hosts(conn), beats, int(time.time() * 1000)))


async def _move(js: JetStreamContext, publisher: Publisher, conn: asyncpg.Connection,
                fabric: Fabric, console: Console, watch: Watch) -> None:
    """Migrate app2 onto app1's host, show its timeline of the move, and that it answers
    there (a namespace guest moves with its namespace and ports)."""
    (a, b) = APPS
    first = await queries.get_entity(conn, "instance", a)
    assert first is not None
    to = first.state["host"]
    step = Step("admin", {"type": "MigrateInstance", "id": b, "to": to})
    published = await publisher.publish("admin", command_from_dict(
        {"cmd_id": "demo-migrate", **step.doc}))
    console.print(Text("  ").append_text(render.published_line(
        "MigrateInstance", "instance", b, published.seq, published.duplicate)))
    while True:
        watch.check()
        row = await queries.get_entity(conn, "instance", b)
        if row is not None and row.state.get("host") == to and not row.state.get("migration"):
            break
        if watch.expired():
            raise DemoError(f"{b} did not move to {to} within {watch.timeout_s:.0f} s")
        await asyncio.sleep(0.1)
    await _converge(conn, watch)
    for outcome in await queries.timeline(conn, "instance", b, published.seq - 1):
        console.print(Text("  ").append_text(render.outcome_line(outcome)))
    ns = fabric.host(first.state["host"]).guest_prefix + a
    ip = row.state["nics"][0]["ip"]
    try:
        answer = await asyncio.to_thread(Fabric.tcp, ns, ip, GUEST_PORT)
    except OSError as exc:
        raise DemoError(f"tcp {a} -> {b} after its move: {exc}") from None
    console.print(f"  tcp {a} -> {ip}:{GUEST_PORT} answered {answer.strip()!r}, now on {to}")


async def _through_the_vip(conn: asyncpg.Connection, edge: Edge, console: Console,
                           watch: Watch) -> None:
    """Once both nodes serve every member healthy and the router has a route through
    both: connections from the client, and who answered them."""
    vip = edge.vip(0)
    while True:
        watch.check()
        row = await queries.get_entity(conn, "lb", "lb1")
        members = await queries.get_entity(conn, "pool", "web")
        if row is not None and members is not None:
            lb = msgspec.convert(row.state, LoadBalancer, strict=False)
            healthy = {i for i, b in lb.backends.items() if healthy_ports(lb, b)}
            applied = all(s.node and s.observed_generation == lb.generation
                          for s in lb.slots)
            if applied and healthy == set(members.state["members"]) and \
                    len(edge.router_routes(vip)) == len(LB_NODES):
                break
        if watch.expired():
            raise DemoError(f"lb1 was not served by both nodes within {watch.timeout_s:.0f}"
                            f" s: {row.state if row else 'no such balancer'}")
        await asyncio.sleep(0.2)
    console.print(f"  the router's route to {vip}: nexthops {', '.join(edge.router_routes(vip))}"
                  " (one per LB node, learned by BGP)")
    answers = await asyncio.to_thread(
        lambda: [edge.connect(vip, 80, timeout_s=3.0) for _ in range(VIP_CONNECTIONS)])
    counts = collections.Counter(a or "no answer" for a in answers)
    console.print(f"  {VIP_CONNECTIONS} connections from {edge.client} to {vip}:80, answered"
                  f" by: {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}")
    console.print("\n[bold]orch get lb/lb1[/]")
    console.print(render.entity_view(row))


async def _inventory(nc: Client, host: str) -> dict[str, str] | str:
    """What the host's hypervisor runs, as its agent observes it, or why it is unknown."""
    try:
        reply = await nc.request(inventory_subject(host), b"", timeout=INVENTORY_TIMEOUT_S)
    except (TimeoutError, nats.errors.Error) as exc:
        return f"no answer from the agent of {host}: {type(exc).__name__}"
    inventory: dict[str, str] = msgspec.json.decode(reply.data, type=dict[str, str])
    return inventory


def _inventory_table(host: str, inventory: dict[str, str],
                     states: dict[str, dict[str, Any]], what: str) -> Table:
    table = Table(title=f"{what} on {host}", title_justify="left", header_style="bold")
    libvirt = what == "libvirt"
    for column in ("domain", "libvirt", "wanted") if libvirt else ("guest", "observed", "wanted"):
        table.add_column(column)
    wanted = {i: s["power"] for i, s in states.items()
              if s.get("host") == host and s["status"] != "deleted"}
    for id_ in sorted(inventory.keys() | wanted.keys()):
        real, want = inventory.get(id_, "absent"), wanted.get(id_, "absent")
        style = "green" if real == want else "bold red"
        table.add_row(f"orch-{id_}" if libvirt else id_, Text(real, style=style), want)
    return table


async def _show(nc: Client, conn: asyncpg.Connection, console: Console, what: str) -> None:
    console.print("\n[bold]state of the world[/]")
    for kind in SHOWN_KINDS:
        rows = await queries.list_entities(conn, kind)
        console.print(render.entity_table(kind, rows, title=f"{kind}s"))
    states = {r.id: r.state for r in await queries.list_entities(conn, "instance")}
    console.print("\n[bold]what the hypervisors really run[/] (each agent asked on"
                  f" {inventory_subject('<host>')})")
    for host in AGENT_HOSTS:
        inventory = await _inventory(nc, host)
        if isinstance(inventory, str):
            console.print(inventory, style="red")
        else:
            console.print(_inventory_table(host, inventory, states, what))
    for kind, id_ in (("instance", "vm1"), ("network", "net1")):
        console.print(f"\n[bold]timeline of {kind}/{id_}[/]")
        console.print(render.timeline(await queries.timeline(conn, kind, id_)))
    console.print()
    dead = await queries.dead_letters(conn)
    console.print(render.dead_letters_table(reversed(dead)))
