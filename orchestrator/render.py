"""Turning projection rows, outcomes and reports into rich renderables: pure, no I/O.

Styles are always attached; the Console decides whether they become colours (only on a TTY).
"""

from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from orchestrator.queries import AlertRow, DeadLetterRow, EntityRow, HostRow
from orchestrator.replay import ReplayReport
from schemas.heartbeat import Heartbeat
from schemas.outcomes import Outcome

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


def _life(s: dict[str, Any]) -> str:
    return "deleted" if s.get("deleted") else "active"


# The few fields worth a column when listing a kind; anything else is one `orch get` away.
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
        ("status", _life),
        ("vip", lambda s: s.get("vip")),
        ("pool", lambda s: s.get("pool")),
        ("services", _services),
        ("members", _count("members")),
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


def replay_lines(report: ReplayReport, verify: bool) -> list[Text]:
    lines = [
        Text(f"replayed {report.commands} commands up to seq {report.last_seq} "
             f"into schema {report.schema} in {report.seconds:.3f} s "
             f"({report.rate:,.0f} commands/s)"),
        Text(f"entities: {report.entities}, dead letters: {report.dead_letters}"),
    ]
    if verify:
        if report.differs:
            lines.append(Text(f"verify: FAILED, {len(report.differs)} entities differ:",
                              style="bold red"))
            lines.extend(Text(f"{kind}/{id_}") for kind, id_ in report.differs)
        else:
            lines.append(Text("verify: OK", style="bold green"))
    return lines


def replay_json(report: ReplayReport, verify: bool) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": report.schema, "commands": report.commands,
        "dead_letters": report.dead_letters, "last_seq": report.last_seq,
        "seconds": round(report.seconds, 6), "rate": round(report.rate, 1),
        "entities": report.entities,
    }
    if verify:
        doc["verified"] = not report.differs
        doc["differs"] = [f"{kind}/{id_}" for kind, id_ in report.differs]
    return doc


def hosts_table(rows: Iterable[HostRow], beats: Mapping[str, Heartbeat], now_ms: int) -> Table:
    table = Table("host", "condition", "underlay", "vcpus", "memory_mib", "instances",
                  "last heartbeat", "boot")
    for row in rows:
        beat = beats.get(row.id)
        seen = "never" if beat is None else f"{(now_ms - beat.at_ms) / 1000:.1f}s ago"
        table.add_row(row.id, row.condition, row.underlay or "", str(row.vcpus),
                      str(row.memory_mib), str(row.instances), seen,
                      (beat.boot_id if beat else row.boot_id)[:8])
    return table


def alerts_table(rows: Iterable[AlertRow]) -> Table:
    table = Table("entity", "since", "attempts", "reason")
    for row in rows:
        table.add_row(f"{row.kind}/{row.id}", format_ms(row.since_ms),
                      "" if row.attempts is None else str(row.attempts), row.reason)
    return table
