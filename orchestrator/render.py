"""Turning projection rows, outcomes and reports into rich renderables: pure, no I/O.

Styles are always attached; the Console decides whether they become colours (only on a TTY).
"""

from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from orchestrator.queries import AlertRow, DeadLetterRow, EntityRow, HostRow
from schemas.heartbeat import Heartbeat
from schemas.outcomes import Outcome

if TYPE_CHECKING:  # replay's imports (a process pool, asyncpg) would cost every `orch` verb
    from orchestrator.replay import ReplayReport
    from orchestrator.snapshots import Snapshot

Column = tuple[str, Callable[[dict[str, Any]], Any]]


def format_ms(ms: int | None) -> str:
    """A JetStream timestamp in ms as UTC ISO 8601 with milliseconds, or '' when unset."""
    if not ms:
        return ""
    stamp = datetime.fromtimestamp(ms / 1000, UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def _scalar(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str | int | float):
        return str(value)
    if isinstance(value, list | tuple) and all(isinstance(v, str | int) for v in value):
        return ", ".join(str(v) for v in value)
    return msgspec.json.encode(value).decode()


def _count(key: str) -> Callable[[dict[str, Any]], int]:
    return lambda s: len(s.get(key) or ())


def _services(s: dict[str, Any]) -> str:
    return ", ".join(
        f"{svc.get('port')}->{svc.get('target_port')}/{svc.get('protocol', 'tcp')}"
        for svc in s.get("services") or ()
    )


def _health_check(h: Mapping[str, Any]) -> str:
    probe = f"GET {h['http_path']}" if h.get("http_path") else "connect"
    return (f"{probe} every {h.get('interval_ms')} ms, timeout {h.get('timeout_ms')} ms,"
            f" rise {h.get('rise')}, fall {h.get('fall')}")


def lb_view(row: EntityRow) -> RenderableType:
    """A balancer as an operator reads it: VIP and services, its two nodes and how far
    each has applied, and every backend's health as each node sees it and as the fold
    decided it (healthy on a service: it gets new flows there)."""
    # The deciders only here: a timeline or a table of hosts need not import them.
    from orchestrator.deciders.lb import LoadBalancer, healthy_ports

    s = row.state
    lb = msgspec.convert(s, LoadBalancer, strict=False)  # JSON keys: "80" is port 80
    head = Table(title=f"lb/{row.id}", title_justify="left", show_header=False, box=None,
                 padding=(0, 2, 0, 0))
    head.add_column(style="bold")
    head.add_column()
    for key in ("status", "vip", "pool", "network", "reason", "generation", "seed"):
        head.add_row(key, _cell(s.get(key)))
    head.add_row("last_seq", str(row.last_seq))
    services = Table("port", "target", "protocol", "strategy", "health check",
                     title="services", title_justify="left", header_style="bold")
    for svc in s.get("services") or ():
        services.add_row(str(svc.get("port")), str(svc.get("target_port")),
                         svc.get("protocol", ""), svc.get("strategy") or "",
                         _health_check(svc.get("health") or {}))
    nodes = Table("slot", "node", "port", "applied", "state", title="nodes",
                  title_justify="left", header_style="bold")
    for i, slot in enumerate(lb.slots):
        if slot.node is None:
            state = Text("waiting for a node", style="yellow")
        elif slot.error:
            state = Text(slot.error, style="red")
        elif slot.observed_generation == lb.generation:
            state = Text("serving", style="green")
        else:
            state = Text("applying", style="yellow")
        nodes.add_row(str(i), slot.node or "", slot.port.ip if slot.port else "",
                      f"{slot.observed_generation}/{lb.generation}", state)
    node_names = [slot.node for slot in lb.slots if slot.node]
    backends = Table("instance", "ip", *[f"seen by {n}" for n in node_names], "healthy on",
                     title="backends", title_justify="left", header_style="bold")
    for instance, b in sorted(lb.backends.items()):
        views = []
        for n in node_names:
            seen = [f"{port} {'up' if b.seen[port][n] else 'down'}"
                    for port in sorted(b.seen) if n in b.seen[port]]
            views.append(", ".join(seen) or "not yet")
        healthy = healthy_ports(lb, b)
        backends.add_row(instance, b.ip, *views,
                         Text(", ".join(map(str, healthy)) or "none",
                              style="green" if healthy else "red"))
    leaving = (Text(f"draining: {', '.join(sorted(lb.leaving))}", style="yellow")
               if lb.leaving else Text(""))
    return Group(head, services, nodes, backends, leaving)


def _life(s: dict[str, Any]) -> str:
    return "deleted" if s.get("deleted") else "active"


# The few fields worth a column when listing a kind; anything else is one `orch get` away.
def _migration(m: Mapping[str, Any] | None) -> str | None:
    """A migration under way, in a few words: "migrating h1 -> h2", "queued (reason)"."""
    if not m:
        return None
    where = f"{m.get('source')} -> {m.get('dest') or m.get('to') or '?'}"
    return f"{m.get('phase')} {where}" + (f" ({m['reason']})" if m.get("reason") else "")


KIND_COLUMNS: dict[str, list[Column]] = {
    "host": [
        ("condition", lambda s: s.get("condition")),
        ("vcpus", lambda s: s.get("vcpus")),
        ("memory_mib", lambda s: s.get("memory_mib")),
    ],
    "instance": [
        ("status", lambda s: s.get("status")),
        ("host", lambda s: s.get("host")),
        ("power", lambda s: s.get("power")),
        ("observed", lambda s: s.get("observed")),
        ("gen", lambda s: s.get("generation")),
        ("pool", lambda s: s.get("pool")),
        ("migration", lambda s: _migration(s.get("migration"))),
        ("error", lambda s: s.get("error")),
    ],
    "network": [
        ("status", lambda s: s.get("status")),
        ("vni", lambda s: s.get("vni")),
        ("cidr", lambda s: s.get("cidr")),
        ("ports", _count("ports")),
        ("hosts", _count("hosts")),
        ("error", lambda s: s.get("error")),
    ],
    "pool": [
        ("status", _life),
        ("size", lambda s: s.get("size")),
        ("members", _count("members")),
        ("balancers", lambda s: s.get("balancers")),
    ],
    "lb": [
        ("status", lambda s: s.get("status")),
        ("vip", lambda s: s.get("vip")),
        ("pool", lambda s: s.get("pool")),
        ("services", _services),
        ("nodes", lambda s: [slot.get("node") for slot in s.get("slots") or ()
                             if slot.get("node")]),
        ("backends", _count("backends")),
        ("reason", lambda s: s.get("reason")),
    ],
    "scheduler": [
        ("hosts", _count("hosts")),
        ("allocations", _count("allocations")),
    ],
}

_STATUS_STYLES = {
    "placed": "green", "active": "green", "up": "green", "running": "green",
    "pending": "yellow", "draining": "yellow", "maintenance": "yellow", "stopped": "yellow",
    "unplaceable": "red", "down": "red", "failed": "red", "deleted": "dim",
}

# Lists of objects shown as tables of their own under `orch get KIND/ID`: (field, columns).
_SUBTABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "network": ("ports", ("instance", "index", "mac", "ip", "host")),
    "instance": ("nics", ("network", "vni", "mac", "ip", "prefix")),
}


def _cell(value: Any) -> Text:
    text = _scalar(value)
    return Text(text, style=_STATUS_STYLES.get(text, ""))


def _generic_columns(rows: list[EntityRow]) -> list[Column]:
    """Scalar fields of an unknown kind, in the order the first row has them."""
    if not rows:
        return []
    return [(key, lambda s, k=key: s.get(k)) for key, value in rows[0].state.items()
            if value is None or isinstance(value, str | int | float | bool)]


def entity_table(kind: str, rows: list[EntityRow], title: str | None = None) -> Table:
    columns = KIND_COLUMNS.get(kind) or _generic_columns(rows)
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("id", style="bold")
    for name, _ in columns:
        table.add_column(name)
    for row in rows:
        table.add_row(row.id, *(_cell(get(row.state)) for _, get in columns))
    return table


def flatten(state: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested objects as dotted keys; lists stay whole (shown compactly)."""
    items: list[tuple[str, Any]] = []
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            items.extend(flatten(value, name + "."))
        elif key.endswith("_at") and isinstance(value, int):
            items.append((name, format_ms(value)))
        else:
            items.append((name, value))
    return items


def entity_view(row: EntityRow) -> RenderableType:
    if row.kind == "lb":
        return lb_view(row)
    table = Table(title=f"{row.kind}/{row.id}", title_justify="left", show_header=False,
                  box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column()
    # The listing's columns first, then the rest by name (jsonb keeps no field order).
    first = [name for name, _ in KIND_COLUMNS.get(row.kind, ())]
    items = sorted(flatten(row.state),
                   key=lambda kv: (first.index(kv[0]) if kv[0] in first else len(first), kv[0]))
    sub = _SUBTABLES.get(row.kind)
    for key, value in items:
        if sub is None or key != sub[0]:
            table.add_row(key, _cell(value))
    table.add_row("last_seq", str(row.last_seq))
    if sub is None or not row.state.get(sub[0]):
        return table
    field, columns = sub
    listed = Table(*columns, title=field, title_justify="left", header_style="bold")
    for item in row.state[field]:
        listed.add_row(*(_scalar((item or {}).get(c)) for c in columns))
    return Group(table, listed)


def outcome_line(o: Outcome) -> Text:
    """One timeline entry: seq, time, source, type, verdict, then what it caused."""
    line = Text()
    line.append(f"{o.seq:>6}  ", style="dim")
    line.append(format_ms(o.at), style="dim")
    line.append(f"  {o.source:<8} ")
    line.append(f"{o.type:<20} ", style="bold")
    if o.accepted:
        line.append("ACCEPTED", style="green")
        line.append(f" {', '.join(o.events)}" if o.events else " (no change)")
        if o.reason:  # why it was decided so: a refusal it records, say
            line.append(f": {o.reason}", style="yellow")
    else:
        line.append("REJECTED", style="bold red")
        line.append(f" {o.reason or ''}", style="red")
    if o.jobs:
        line.append(f"  jobs: {', '.join(o.jobs)}", style="cyan")
    if o.commands:
        line.append(f"  -> {', '.join(o.commands)}", style="magenta")
    return line


def timeline(outcomes: Iterable[Outcome]) -> RenderableType:
    return Group(*(outcome_line(o) for o in outcomes))


def dead_letters_table(rows: Iterable[DeadLetterRow]) -> Table:
    table = Table(title="dead letters", title_justify="left", header_style="bold")
    table.add_column("seq", justify="right")
    table.add_column("subject")
    table.add_column("bytes", justify="right")
    table.add_column("reason", style="red")
    for row in rows:
        table.add_row(str(row.seq), row.subject, str(row.size), row.reason)
    return table


def published_line(type_: str, kind: str, id_: str, seq: int, duplicate: bool) -> Text:
    line = Text()
    line.append("duplicate" if duplicate else "published",
                style="yellow" if duplicate else "green")
    line.append(f" {type_} {kind}/{id_} seq={seq}")
    return line


def replay_lines(report: "ReplayReport", verify: bool) -> list[Text]:
    lines = [
        Text(f"replayed {report.commands} commands up to seq {report.last_seq} "
             f"into schema {report.schema} in {report.seconds:.3f} s "
             f"({report.rate:,.0f} commands/s)"),
        Text(f"entities: {report.entities}, dead letters: {report.dead_letters}"),
    ]
    if report.snapshot is not None:
        s = report.snapshot
        lines.insert(1, Text(f"from snapshot {s.id} (up to seq {s.upto}, {s.entities} entities,"
                             f" taken {s.taken_at.strftime('%Y-%m-%dT%H:%M:%SZ')})"))
    if verify:
        if report.differs:
            lines.append(Text(f"verify: FAILED, {len(report.differs)} entities differ:",
                              style="bold red"))
            lines.extend(Text(f"{kind}/{id_}") for kind, id_ in report.differs)
        else:
            lines.append(Text("verify: OK", style="bold green"))
    return lines


def replay_json(report: "ReplayReport", verify: bool) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": report.schema, "commands": report.commands,
        "dead_letters": report.dead_letters, "last_seq": report.last_seq,
        "seconds": round(report.seconds, 6), "rate": round(report.rate, 1),
        "entities": report.entities,
        "snapshot": None if report.snapshot is None else snapshot_json(report.snapshot),
    }
    if verify:
        doc["verified"] = not report.differs and not any(report.snapshots.values())
        doc["differs"] = [f"{kind}/{id_}" for kind, id_ in report.differs]
        doc["snapshots"] = {str(id_): [f"{kind}/{i}" for kind, i in keys]
                            for id_, keys in report.snapshots.items()}
    return doc


def snapshot_json(s: "Snapshot") -> dict[str, Any]:
    return {"id": s.id, "taken_at": s.taken_at.isoformat(), "code": s.code,
            "current_code": s.current, "upto": s.upto, "checkpoints": list(s.checkpoints),
            "entities": s.entities, "seconds": round(s.seconds, 3)}


def snapshot_table(snapshots: Iterable["Snapshot"]) -> Table:
    table = Table("snapshot", "taken at", "up to seq", "entities", "took", "code")
    for s in snapshots:
        code = s.code if s.current else f"{s.code} (not this code's)"
        table.add_row(str(s.id), s.taken_at.strftime("%Y-%m-%dT%H:%M:%SZ"), str(s.upto),
                      str(s.entities), f"{s.seconds:.2f}s", code)
    return table


def snapshot_check_lines(checked: Mapping[int, list[tuple[str, str]]]) -> list[Text]:
    """Each snapshot, and whether the fold reproduces it at its checkpoints."""
    lines = []
    for id_, keys in sorted(checked.items()):
        if not keys:
            lines.append(Text(f"snapshot {id_}: reproduced", style="green"))
            continue
        shown = ", ".join(f"{kind}/{i}" for kind, i in keys[:10])
        more = f" and {len(keys) - 10} more" if len(keys) > 10 else ""
        lines.append(Text(f"snapshot {id_}: NOT reproduced by this code, {len(keys)} entities"
                          f" differ: {shown}{more}", style="bold red"))
    return lines


def hosts_table(rows: Iterable[HostRow], beats: Mapping[str, Heartbeat], now_ms: int) -> Table:
    table = Table("host", "role", "condition", "underlay", "vcpus", "memory_mib", "serves",
                  "migrations", "last heartbeat", "boot")
    for row in rows:
        beat = beats.get(row.id)
        seen = "never" if beat is None else f"{(now_ms - beat.at_ms) / 1000:.1f}s ago"
        serves = (f"lb: {', '.join(row.balancers) or '-'}" if row.role == "lb"
                  else f"{row.instances} instance{'s' if row.instances != 1 else ''}")
        moves = ", ".join(f"{n} {what}" for n, what in (
            (row.migrating_out, "out"), (row.migrating_in, "in"), (row.queued, "queued")) if n)
        table.add_row(row.id, row.role, row.condition, row.underlay or "", str(row.vcpus),
                      str(row.memory_mib), serves, moves or "-", seen,
                      (beat.boot_id if beat else row.boot_id)[:8])
    return table


def alerts_table(rows: Iterable[AlertRow]) -> Table:
    table = Table("entity", "since", "attempts", "reason")
    for row in rows:
        table.add_row(f"{row.kind}/{row.id}", format_ms(row.since_ms),
                      "" if row.attempts is None else str(row.attempts), row.reason)
    return table
