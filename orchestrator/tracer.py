"""Building the tree of orchestrator/trace.py from the history (PostgreSQL) and, for the
jobs a command emitted, its entity's commands folded again (CMD), from a snapshot before
the command where there is one."""

import asyncpg
from nats.js import JetStreamContext

from orchestrator import queries
from orchestrator.fold import Key
from orchestrator.history import EntityFold
from orchestrator.logreader import fed, resumed_fold
from orchestrator.trace import APPLIED_PREFIX, JobRef, Node, expected_follow_ups, job_status
from schemas.outcomes import Outcome


class Tracer:
    """Reads what it needs once: jobs per command seq are cached, entities' folds resume."""

    def __init__(self, conn: asyncpg.Connection, js: JetStreamContext, partitions: int) -> None:
        self.conn, self.js, self.partitions = conn, js, partitions
        self._jobs: dict[int, list[JobRef]] = {}
        self._folds: dict[Key, EntityFold] = {}

    async def tree(self, root: Outcome) -> Node:
        return await self._command(root)

    async def _command(self, o: Outcome) -> Node:
        node = Node(outcome=o)
        expected = expected_follow_ups(o)
        if expected:
            found = await queries.follow_ups(self.conn, o.seq, [(e.kind, e.id) for e in expected])
            for e in expected:
                match = next((f for f in found
                              if (f.kind, f.id, f.type) == (e.kind, e.id, e.type)), None)
                if match is None:
                    node.children.append(Node(missing=f"{e.type} {e.kind}/{e.id}"
                                                      f" ({e.key_prefix}*): not folded yet"))
                else:
                    found.remove(match)
                    node.children.append(await self._command(match))
        for job in await self._jobs_of(o):
            node.children.append(await self._job(job, o.seq))
        return node

    async def _job(self, job: JobRef, after_seq: int) -> Node:
        node = Node(job=job)
        for answer in await queries.answers(self.conn, job.kind, job.id, after_seq, job.host,
                                            job.report_suffix, job.reconcile_key):
            node.children.append(await self._command(answer))
        node.status = job_status(node)
        if node.status == "pending":
            # The agent applies the newest job of an entity: an older one may never be
            # answered itself, a newer generation's report settles it.
            newer = await queries.newer_report(self.conn, job.kind, job.id, after_seq,
                                               job.host, APPLIED_PREFIX, job.generation + 1)
            if newer is not None:
                node.superseded_by, node.status = newer.seq, "superseded"
        return node

    async def _jobs_of(self, o: Outcome) -> list[JobRef]:
        if not o.jobs:
            return []
        if o.seq not in self._jobs:
            key = (o.kind, o.id)
            fold = self._folds.get(key)
            if fold is None or o.seq <= fold.started_after:
                # The entity as it was before the command: from a snapshot before it, if any.
                fold = self._folds[key] = await resumed_fold(
                    self.conn, o.kind, o.id, self.partitions, o.seq - 1, states=False)
            async for step in fed(self.js, fold, o.seq):
                if step.folded.jobs:
                    self._jobs[step.folded.seq] = [JobRef.of(j) for j in step.folded.jobs]
        return self._jobs.get(o.seq, [])
