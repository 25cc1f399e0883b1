"""Rendering the operator's views of the log: outcomes across entities, what a command
changed, the tree of what it caused, and waits. Pure: rich renderables, no I/O.

rich (and render, which uses it) is imported by the functions that build renderables: a
pipe gets plain lines from a process that never loads it (~30 ms of its start-up)."""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from schemas.outcomes import Outcome

if TYPE_CHECKING:  # history imports the fold and its deciders: a plain timeline needs neither
    from rich.text import Text
    from rich.tree import Tree

    from orchestrator.history import Change
    from orchestrator.trace import Node

_STATUS_STYLE = {"applied": "green", "superseded": "green", "notice": "dim", "failed": "bold red",
                 "pending": "yellow"}


@functools.lru_cache(maxsize=1024)
def _second(s: int) -> str:
    return datetime.fromtimestamp(s, UTC).strftime("%Y-%m-%dT%H:%M:%S.")


def _stamp(ms: int | None) -> str:
    """``format_ms(ms)``, each second formatted once: a long timeline's lines share few."""
    return f"{_second(ms // 1000)}{ms % 1000:03d}Z" if ms else ""


def outcome_plain(o: Outcome) -> str:
    """``render.outcome_line(o).plain``, without building styled text: for a pipe."""
    parts = [f"{o.seq:>6}  {_stamp(o.at)}  {o.source:<8} {o.type:<20} "]
    if o.accepted:
        parts.append("ACCEPTED")
        parts.append(f" {', '.join(o.events)}" if o.events else " (no change)")
        if o.reason:
            parts.append(f": {o.reason}")
    else:
        parts.append(f"REJECTED {o.reason or ''}")
    if o.jobs:
        parts.append(f"  jobs: {', '.join(o.jobs)}")
    if o.commands:
        parts.append(f"  -> {', '.join(o.commands)}")
    return "".join(parts)


def _log_cut(o: Outcome) -> int:
    """Where a log line names the entity: after the seq and the time (two fixed-width
    fields), before the source."""
    return len(f"{o.seq:>6}  ") + len(_stamp(o.at)) + 2


def log_plain(o: Outcome) -> str:
    """``log_line(o).plain``, without building styled text: for a pipe."""
    line, cut, head = outcome_plain(o), _log_cut(o), f"{o.kind}/{o.id}"
    return f"{line[:cut]}{head:<24} {line[cut:]}"


def log_line(o: Outcome) -> Text:
    """A timeline entry that names its entity: the log mixes them all."""
    from rich.text import Text

    from orchestrator.render import outcome_line

    line = outcome_line(o)
    head = Text(f"{o.kind}/{o.id}", style="bold")
    head.pad_right(max(0, 24 - len(head)))
    cut = _log_cut(o)
    return line[:cut] + head + Text(" ") + line[cut:]


def _value(v: Any, path: str = "") -> str:
    if v is None:
        return "-"
    if path.endswith("_at") and isinstance(v, int) and v > 0:  # a time, in ms
        return _stamp(v)
    if isinstance(v, str):
        return v
    return msgspec.json.encode(v).decode()


def change_plain(c: Change) -> str:
    return f"        {c.path}: {_value(c.before, c.path)} → {_value(c.after, c.path)}"


def change_line(c: Change) -> Text:
    from rich.text import Text

    line = Text("        ")
    line.append(c.path, style="bold")
    line.append(": ")
    line.append(_value(c.before, c.path), style="red")
    line.append(" → ")
    line.append(_value(c.after, c.path), style="green")
    return line


def change_json(c: Change) -> dict[str, Any]:
    return {"field": c.path, "before": c.before, "after": c.after}


def _label(node: Node, root_at: int) -> Text:
    from rich.text import Text

    line = Text()
    if node.outcome is not None:
        o = node.outcome
        line.append(f"{o.seq} ", style="dim")
        line.append(_stamp(o.at) if o.at == root_at else f"+{o.at - root_at} ms",
                    style="dim")
        line.append(f"  {o.type} ", style="bold")
        line.append(f"{o.kind}/{o.id}")
        line.append(f" from {o.source} ", style="dim")
        if o.accepted:
            line.append("ACCEPTED", style="green")
            if o.events:
                line.append(f" {', '.join(o.events)}")
        else:
            line.append("REJECTED", style="bold red")
            line.append(f" {o.reason or ''}", style="red")
    elif node.job is not None:
        j = node.job
        line.append("job ", style="cyan")
        line.append(f"{j.subject} generation {j.generation} attempt {j.attempt}",
                    style="cyan")
        if j.removal:
            line.append(" (removal)", style="cyan")
        status = node.status or "pending"
        line.append(f"  {status}", style=_STATUS_STYLE[status])
        if node.superseded_by is not None:
            line.append(f" (a newer generation applied, seq {node.superseded_by})", style="dim")
        elif status == "pending":
            line.append(": no report yet", style="yellow")
    else:
        line.append(f"MISSING {node.missing}", style="yellow")
    return line


def trace_tree(root: Node) -> Tree:
    from rich.tree import Tree

    assert root.outcome is not None
    at = root.outcome.at

    def grow(branch: Tree, node: Node) -> None:
        for child in node.children:
            grow(branch.add(_label(child, at)), child)

    tree = Tree(_label(root, at), guide_style="dim")
    grow(tree, root)
    return tree


def verify_lines(differences: dict[tuple[str, str], list[Change]]) -> list[Text]:
    """Each entity the replay disagrees with the projection on, field by field."""
    from rich.text import Text

    if not differences:
        return [Text("verify: OK", style="bold green")]
    lines = [Text(f"verify: FAILED, {len(differences)} entities differ (live → replayed):",
                  style="bold red")]
    for (kind, id_), changes in sorted(differences.items()):
        lines.append(Text(f"{kind}/{id_}", style="bold"))
        if changes and all(c.before is None for c in changes):
            lines.append(Text("        only in the replay", style="yellow"))
        elif changes and all(c.after is None for c in changes):
            lines.append(Text("        only in the live projection", style="yellow"))
        else:
            lines.extend(change_line(c) for c in changes)
    return lines


def verify_json(differences: dict[tuple[str, str], list[Change]]) -> dict[str, Any]:
    return {f"{kind}/{id_}": [{"field": c.path, "live": c.before, "replayed": c.after}
                              for c in changes]
            for (kind, id_), changes in sorted(differences.items())}
