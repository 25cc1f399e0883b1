"""`orch demo` (what `make demo` runs): a short scenario on a private stack, then teardown.

Everything runs here: an embedded nats-server and PostgreSQL under ``root``, one
orchestrator replica as an asyncio task, and a publisher. Commands are sent in phases and
the projection must settle between phases, because some commands depend on follow-ups of
earlier ones that live in other partitions (the scheduler must know the hosts before an
instance asks for a place; an instance must have joined its network before the network's
deletion can be refused because of it).
"""

import asyncio
import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from rich.console import Console
from rich.text import Text

from events.bus import Publisher, publish_raw
from events.subjects import CMD_STREAM, command_subject
from events.topology import ensure_topology
from orchestrator import queries, render
from orchestrator.embedded import Stack, read_stack_file
from orchestrator.replica import Replica, ReplicaConfig
from orchestrator.store import connect_pg
from schemas.codec import command_from_dict

DEMO_TIMEOUT_S = 60.0
SHOWN_KINDS = ("host", "instance", "network", "pool", "lb")
# What a stale demo directory (a run that was killed) may contain; anything else is not ours.
_DEMO_ENTRIES = {"nats", "pg", "stack.json", "stack.json.tmp"}


class DemoError(RuntimeError):
    """The demo could not run or did not converge; the message says why, in one line."""


@dataclass(frozen=True, slots=True)
class Step:
    source: str
    doc: dict[str, Any]
    # Set: published as is on this kind's subject, bypassing validation, to show a rejection.
    raw_kind: str | None = None


_WEB = {"vcpus": 1, "memory_mib": 512, "image": "nginx-1.27"}
_VM1 = {"vcpus": 2, "memory_mib": 2048, "image": "debian-12", "nics": [{"network": "net1"}]}

PHASES: list[tuple[str, list[Step]]] = [
    ("register two hosts", [
        # Equal hosts: the scheduler (most free memory first) then spreads the instances.
        Step("admin", {"type": "RegisterHost", "id": "h1", "vcpus": 16, "memory_mib": 32768}),
        Step("admin", {"type": "RegisterHost", "id": "h2", "vcpus": 16, "memory_mib": 32768}),
    ]),
    ("a network, an instance on it, a pool of 3 behind a load balancer", [
        Step("user", {"type": "CreateNetwork", "id": "net1", "vni": 100,
                      "cidr": "10.0.0.0/24"}),
        Step("user", {"type": "CreateInstance", "id": "vm1", "template": _VM1}),
        Step("user", {"type": "CreatePool", "id": "web", "size": 3, "template": _WEB}),
        # Same partition as the pool's creation, so the pool exists when it is attached.
        Step("user", {"type": "CreateLoadBalancer", "id": "lb1", "vip": "10.0.0.100",
                      "pool": "web", "services": [{"port": 80, "target_port": 8080}]}),
    ]),
    ("scale, stop, and two commands that must be refused", [
        Step("user", {"type": "ScalePool", "id": "web", "size": 5}),
        Step("user", {"type": "StopInstance", "id": "vm1"}),
        Step("user", {"type": "CreateInstance", "id": "vm1", "power": "running"},
             raw_kind="instance"),
        Step("user", {"type": "DeleteNetwork", "id": "net1"}),
    ]),
]


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
    try:
        console.print(f"[bold]orch demo[/]: starting nats-server and PostgreSQL in {root}")
        try:
            info = stack.start()
        except (RuntimeError, OSError) as exc:
            raise DemoError(f"the embedded stack did not start: {exc}".splitlines()[0]) from None
        console.print(f"  nats  {info.nats_url}\n  pg    {info.pg_dsn}")
        asyncio.run(_scenario(info.nats_url, info.pg_dsn, console, timeout_s))
    finally:
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)
        if made_parent:
            with contextlib.suppress(OSError):  # only if still empty
                root.parent.rmdir()
    console.print("stack stopped, demo directory removed")


async def _scenario(nats_url: str, pg_dsn: str, console: Console, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    stop = asyncio.Event()
    replica = Replica(ReplicaConfig(nats_url, pg_dsn, replica_id="demo", tick_s=0.2))
    replica_task = asyncio.create_task(replica.run(stop), name="replica")
    nc: Client | None = None
    conn: asyncpg.Connection | None = None
    try:
        nc = await nats.connect(nats_url, name="orch-demo", connect_timeout=5)
        js = nc.jetstream()
        await ensure_topology(js)
        conn = await connect_pg(pg_dsn)
        publisher = Publisher(js)
        for n, (title, steps) in enumerate(PHASES, 1):
            console.print(f"\n[bold]{n}. {title}[/]")
            for i, step in enumerate(steps):
                await _publish(js, publisher, step, f"demo-{n}-{i}", console)
            folded = await _settle(js, conn, replica_task, deadline, timeout_s)
            console.print(f"  settled: {folded} commands folded (follow-ups included)")
        await _show(conn, console)
    finally:
        stop.set()
        try:
            await asyncio.wait_for(replica_task, 15)
        except TimeoutError:
            pass  # wait_for has cancelled it
        except Exception:  # its failure was already reported by _settle
            pass
        if conn is not None:
            await conn.close()
        if nc is not None:
            await nc.close()


async def _publish(js: JetStreamContext, publisher: Publisher, step: Step, cmd_id: str,
                   console: Console) -> None:
    doc = {"cmd_id": cmd_id, **step.doc}
    type_, id_ = doc["type"], doc["id"]
    if step.raw_kind is not None:
        subject = command_subject(step.source, step.raw_kind, id_)
        await publish_raw(js, [(subject, msgspec.json.encode(doc), cmd_id)])
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
        row = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM history)"
            " + (SELECT count(*) FROM dead_letters d"
            "    WHERE NOT EXISTS (SELECT 1 FROM history h WHERE h.seq = d.seq)) AS folded,"
            " (SELECT count(*) FROM outbox) AS outbox"
        )
    except asyncpg.UndefinedTableError:  # the replica has not created its tables yet
        return stored, 0, 0
    return stored, row["folded"], row["outbox"]


async def _settle(js: JetStreamContext, conn: asyncpg.Connection,
                  replica_task: asyncio.Task[None], deadline: float, timeout_s: float) -> int:
    """Wait until every stored command is folded and every follow-up relayed, twice running.

    An empty outbox means every follow-up was published (rows go only after their acks),
    so once the folded count catches up with the stream nothing more is on its way.
    """
    streak = 0
    while True:
        if replica_task.done():
            exc = None if replica_task.cancelled() else replica_task.exception()
            raise DemoError(f"the orchestrator replica stopped: {exc!r}")
        stored, folded, outbox = await _folded(js, conn)
        streak = streak + 1 if stored and folded == stored and outbox == 0 else 0
        if streak >= 2:
            return folded
        if time.monotonic() > deadline:
            raise DemoError(f"did not converge within {timeout_s:.0f} s: {folded} of {stored}"
                            f" commands folded, {outbox} outbox rows pending")
        await asyncio.sleep(0.2)


async def _show(conn: asyncpg.Connection, console: Console) -> None:
    console.print("\n[bold]state of the world[/]")
    for kind in SHOWN_KINDS:
        rows = await queries.list_entities(conn, kind)
        console.print(render.entity_table(kind, rows, title=f"{kind}s"))
    for kind, id_ in (("instance", "vm1"), ("network", "net1")):
        console.print(f"\n[bold]timeline of {kind}/{id_}[/]")
        console.print(render.timeline(await queries.timeline(conn, kind, id_)))
    console.print()
    dead = await queries.dead_letters(conn)
    console.print(render.dead_letters_table(reversed(dead)))
