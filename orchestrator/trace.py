"""The tree of what one command caused, built from the keys that name each cause. Pure.

- A follow-up's idempotency key is ``fx-<seq>-<n>``: the seq of the command that sent it.
- A job is ``(host, kind, id, generation, attempt)``; the agent's report on it has the key
  ``<verdict>-<host>-<id>-<generation>-<attempt>`` (applied-..., failed-...), and the
  reconciler's re-issue of it the key ``rc-<id>-<generation>-<attempt>``.

So every node's children are found by key, whatever the command types and entity kinds:
the tree grows with new kinds unchanged. The I/O that finds them is orchestrator/tracer.py.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from schemas.commands import FOLLOW_UP_PREFIX
from schemas.jobs import Job
from schemas.outcomes import Outcome

APPLIED_PREFIX = "applied-"  # the key of an agent's report that it applied a job
RECONCILE_PREFIX = "rc-"
DEGRADED = "Degraded"  # the event of an entity whose retries ran out

# notice: a job no agent answers (a host's own job, which its agent only reads).
JobStatus = Literal["applied", "superseded", "failed", "pending", "notice"]
UNANSWERED_KINDS = ("host",)


@dataclass(frozen=True, slots=True)
class JobRef:
    host: str
    kind: str
    id: str
    generation: int
    attempt: int
    removal: bool  # no spec: the host must remove the entity

    @classmethod
    def of(cls, job: Job) -> "JobRef":
        return cls(job.host, job.kind, job.id, job.generation, job.attempt, job.spec is None)

    @property
    def subject(self) -> str:
        return f"job.{self.host}.{self.kind}.{self.id}"

    @property
    def report_suffix(self) -> str:
        """How the key of every report on this job ends."""
        return f"-{self.host}-{self.id}-{self.generation}-{self.attempt}"

    @property
    def reconcile_key(self) -> str:
        return f"{RECONCILE_PREFIX}{self.id}-{self.generation}-{self.attempt}"

    def answers(self, o: Outcome) -> bool:
        """A report of the job's host on it, or the reconciler's re-issue of it."""
        if (o.kind, o.id) != (self.kind, self.id):
            return False
        return ((o.source == self.host and o.cmd_id.endswith(self.report_suffix))
                or o.cmd_id == self.reconcile_key)


@dataclass(frozen=True, slots=True)
class Expected:
    """A follow-up named in its parent's outcome: where it goes and the key it carries."""

    kind: str
    id: str
    type: str
    key_prefix: str  # fx-<seq>-


def expected_follow_ups(o: Outcome) -> list[Expected]:
    """From an outcome's `commands` (``kind/id:Type``)."""
    out = []
    for subject in o.commands:
        target, _, type_ = subject.partition(":")
        kind, _, id_ = target.partition("/")
        out.append(Expected(kind, id_, type_, f"{FOLLOW_UP_PREFIX}{o.seq}-"))
    return out


def follow_up_parent(cmd_id: str) -> int | None:
    """The seq of the command a follow-up key names, or None for any other key."""
    if not cmd_id.startswith(FOLLOW_UP_PREFIX):
        return None
    seq, _, n = cmd_id[len(FOLLOW_UP_PREFIX):].partition("-")
    return int(seq) if seq.isdigit() and n.isdigit() else None


@dataclass(slots=True)
class Node:
    """A command (``outcome``), a job (``job``), or something expected and not found yet."""

    outcome: Outcome | None = None
    job: JobRef | None = None
    missing: str | None = None  # what is expected, for a placeholder
    status: JobStatus | None = None  # of a job
    superseded_by: int | None = None  # seq of a newer generation's applied report
    children: list["Node"] = field(default_factory=list)

    def walk(self) -> Iterator["Node"]:
        yield self
        for child in self.children:
            yield from child.walk()


def job_status(node: Node) -> JobStatus:
    """Applied when its host says so; failed when a re-issue of it ended degraded; else
    whatever the re-issue's own job came to."""
    assert node.job is not None
    if node.job.kind in UNANSWERED_KINDS:
        return "notice"
    if node.superseded_by is not None:
        return "superseded"
    for child in node.children:
        o = child.outcome
        if o is None:
            continue
        if o.cmd_id.startswith(APPLIED_PREFIX) and o.source == node.job.host and o.accepted:
            return "applied"
        if o.cmd_id == node.job.reconcile_key:
            if DEGRADED in o.events:
                return "failed"
            reissued = [c for c in child.children if c.job is not None]
            if any(c.status in ("applied", "superseded") for c in reissued):
                return "applied"
            if any(c.status == "failed" for c in reissued):
                return "failed"
    return "pending"


def waiting_for(root: Node, applied: bool) -> list[str]:
    """What a wait on ``root`` still lacks: follow-ups not folded yet, and with ``applied``
    jobs no report settled. Empty: the wait is over."""
    out = []
    for node in root.walk():
        if node.missing is not None:
            out.append(node.missing)
        elif applied and node.job is not None and node.status == "pending":
            out.append(f"{node.job.subject} generation {node.job.generation}"
                       f" attempt {node.job.attempt}: no report yet")
    return out


def failures(root: Node) -> list[str]:
    """Rejected commands and jobs that ran out of retries, anywhere in the tree."""
    out = []
    for node in root.walk():
        o = node.outcome
        if o is not None and not o.accepted:
            out.append(f"{o.type} {o.kind}/{o.id} rejected: {o.reason}")
        if o is not None and DEGRADED in o.events:
            out.append(f"{o.kind}/{o.id} degraded: {o.reason or 'retries ran out'}")
        if node.job is not None and node.status == "failed" and not any(
                c.outcome is not None and DEGRADED in c.outcome.events for c in node.walk()):
            out.append(f"{node.job.subject} generation {node.job.generation} failed")
    return out


def to_json(node: Node, root_at: int) -> dict[str, Any]:
    doc: dict[str, Any]
    if node.outcome is not None:
        o = node.outcome
        doc = {"seq": o.seq, "at": o.at, "latency_ms": o.at - root_at, "cmd_id": o.cmd_id,
               "type": o.type, "source": o.source, "kind": o.kind, "id": o.id,
               "accepted": o.accepted}
        if o.reason:
            doc["reason"] = o.reason
        if o.events:
            doc["events"] = list(o.events)
    elif node.job is not None:
        j = node.job
        doc = {"job": j.subject, "host": j.host, "kind": j.kind, "id": j.id,
               "generation": j.generation, "attempt": j.attempt, "removal": j.removal,
               "status": node.status}
        if node.superseded_by is not None:
            doc["superseded_by"] = node.superseded_by
    else:
        doc = {"missing": node.missing}
    if node.children:
        doc["children"] = [to_json(c, root_at) for c in node.children]
    return doc
