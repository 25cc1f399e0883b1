"""`orch publish --wait`: each command's outcome, and with `applied` every job it caused
settled by its agent; bounded by `--timeout`."""

import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from rich.console import Console
from rich.text import Text

from events.bus import Published
from orchestrator import queries
from orchestrator.cli.causes import POLL_S, Progress, Reader, reader
from orchestrator.cli.output import EXIT_FAILURE, EXIT_OK, EXIT_TIMEOUT, print_json
from orchestrator.logview import log_line, trace_tree
from orchestrator.trace import Node, failures, to_json, waiting_for
from schemas.commands import Command
from schemas.outcomes import Outcome


@dataclass(slots=True)
class Waited:
    seq: int
    doc: dict[str, Any]  # what --json-out prints for it besides the outcome
    outcome: Outcome | None = None
    tree: Node | None = None
    missing: list[str] = field(default_factory=list)
    done: bool = False

    @property
    def failed(self) -> list[str]:
        if self.outcome is None:
            return []
        if self.tree is None:
            return [] if self.outcome.accepted else [f"rejected: {self.outcome.reason}"]
        return failures(self.tree)


async def wait_and_report(nats_url: str, pg_dsn: str, items: list[tuple[str, Command]],
                          results: list[Published], applied: bool, timeout: float | None,
                          json_out: bool, out: Console) -> int:
    """Wait for what the published commands caused, print it; the exit code."""
    waited = [Waited(r.seq, {"seq": r.seq, "duplicate": r.duplicate, "cmd_id": cmd.cmd_id,
                             "type": type(cmd).__name__, "kind": cmd.kind, "id": cmd.id})
              for (_, cmd), r in zip(items, results, strict=True)]
    progress = Progress(Console(stderr=True), enabled=not json_out)
    try:
        async with reader(nats_url, pg_dsn, "orch-publish-wait") as r:
            settled = await wait_all(r, waited, applied, timeout, progress)
    finally:
        progress.close()
    code, error = report(waited, applied, settled, json_out, out, timeout)
    if error is not None:
        print(f"error: {error}", file=sys.stderr, flush=True)
    return code


async def wait_all(r: Reader, items: list[Waited], applied: bool, timeout: float | None,
                   progress: Progress) -> bool:
    """Poll until every item is settled or the time runs out; True if all settled."""
    deadline = None if timeout is None else time.monotonic() + timeout
    tracer = r.tracer()
    while True:
        open_ = [w for w in items if not w.done]
        try:
            found = await queries.outcomes_at(r.conn, [w.seq for w in open_
                                                        if w.outcome is None])
        except asyncpg.UndefinedTableError:
            found = {}  # no replica has migrated the database yet: it will
        for w in open_:
            w.outcome = w.outcome or found.get(w.seq)
            if w.outcome is None:
                w.missing = [f"the outcome of seq {w.seq}"]
                continue
            if not applied:
                w.done, w.missing = True, []
                continue
            # A tree once complete stays so; until then it is read again, as it grows.
            w.tree = await tracer.tree(w.outcome)
            w.missing = waiting_for(w.tree, applied=True)
            w.done = not w.missing
        left = [w for w in items if not w.done]
        if not left:
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        progress.update(f"waiting for {len(left)} of {len(items)} command(s):"
                        f" {left[0].missing[0] if left[0].missing else ''}")
        await asyncio.sleep(POLL_S)


def report(items: list[Waited], applied: bool, settled: bool, as_json: bool,
           out: Console, timeout: float | None) -> tuple[int, str | None]:
    """Print each command's result and a summary; the exit code, and an error line if any."""
    for w in items:
        if as_json:
            doc = dict(w.doc)
            doc["outcome"] = w.outcome
            if applied and w.tree is not None and w.outcome is not None:
                doc["trace"] = to_json(w.tree, w.outcome.at)
            doc["status"] = status(w)
            if w.missing and not w.done:
                doc["missing"] = w.missing
            print_json(doc)
        elif w.outcome is None:
            out.print(Text(f"seq {w.seq}: no outcome yet", style="yellow"))
        elif len(items) == 1 and applied and w.tree is not None:
            out.print(trace_tree(w.tree))
        else:
            line = log_line(w.outcome)
            if applied:
                line.append(f"  [{status(w)}]", style="green" if status(w) == "applied"
                            else "red" if status(w) in ("rejected", "failed") else "yellow")
            out.print(line, soft_wrap=True)
    counts: dict[str, int] = {}
    for w in items:
        counts[status(w)] = counts.get(status(w), 0) + 1
    if len(items) > 1 and not as_json:
        out.print(Text(f"{len(items)} commands: "
                       + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))))
    if not settled:
        missing = [m for w in items if not w.done for m in w.missing]
        shown = "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more"
                                           if len(missing) > 5 else "")
        return EXIT_TIMEOUT, f"timed out after {timeout:g} s waiting for: {shown}"
    failed = [f for w in items for f in w.failed]
    if failed:
        return EXIT_FAILURE, f"{len(failed)} failure(s): {failed[0]}"
    return EXIT_OK, None


def status(w: Waited) -> str:
    if w.outcome is None:
        return "unfolded"
    if not w.outcome.accepted:
        return "rejected"
    if w.tree is None:
        return "accepted"
    if w.failed:
        return "failed"
    return "applied" if w.done else "pending"
