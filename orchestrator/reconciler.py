"""The reconciler: instances, networks and balancers whose jobs are overdue get a Reconcile
command.

Whether to re-issue the job or to degrade the instance is the fold's decision (pure and
replayable); this loop only notices lateness, with exponential backoff per attempt.
Instances on a host that is down are left alone: re-issuing to nobody would only degrade
them, one alert each, and the host's return brings a full resync anyway. Their deadline
counts from that return, so a host that flaps does not use up their retries. A host down
longer than ``evacuate_after_s`` (when set) is evacuated: EvacuateHost, once per outage.
"""

from dataclasses import dataclass

import asyncpg
import msgspec

from events.bus import Publisher
from orchestrator.deciders.lb import LoadBalancer, drains_due
from schemas import commands as c
from schemas.ids import SYSTEM

MAX_ATTEMPTS = 2**31 - 1  # int4's largest: the end of the last window


def windows(now_ms: int, deadline_ms: int, max_backoff_ms: int) -> list[tuple[int, int, int]]:
    """When a job is overdue, as (re-issues from, re-issues below, issued at or before): past
    its deadline, doubled for every re-issue so far, capped (the cap bounds the doubling,
    never the deadline itself). From the first capped count on, one window holds them all:
    a query is one index range per doubling."""
    cap = max(deadline_ms, max_backoff_ms)
    out = []
    k = 0
    while 0 < deadline_ms << k < cap:
        out.append((k, k + 1, now_ms - (deadline_ms << k)))
        k += 1
    out.append((k, MAX_ATTEMPTS, now_ms - min(deadline_ms << k, cap)))
    return out


# Each query reads only the overdue rows: per window, one range of a partial index whose
# predicate is the kind's lagging condition (schema.sql, which it repeats word for word),
# so that a converged entity is never read, nor one whose deadline has not come. OFFSET 0
# keeps each window its own scan, whatever the planner estimates of the predicate.
def _overdue(predicate: str) -> str:
    return f"""
    FROM unnest($1::int[], $2::int[], $3::bigint[]) AS w(lo, hi, before)
    CROSS JOIN LATERAL (
        SELECT id, state FROM entities
        WHERE {predicate}
          AND (state->>'attempts')::int >= w.lo AND (state->>'attempts')::int < w.hi
          AND (state->>'issued_at')::bigint <= w.before
        OFFSET 0
    ) AS e"""


# A host's return restarts the deadline: it is counted from the later of the two.
INSTANCES = """
    SELECT e.id, (e.state->>'generation')::int AS generation,
           (e.state->>'attempts')::int AS attempts""" + _overdue("""kind = 'instance'
          AND state->>'host' IS NOT NULL AND state->>'status' IN ('placed', 'deleted')
          AND ((state->>'observed_generation')::int < (state->>'generation')::int
               -- or a host it left has not applied its removal (a lost report, say)
               OR state->'cleanup' <> '{}'::jsonb)
          -- memory moving: its deadline bounds it, and the source's report ends it
          AND state->'migration'->>'phase' IS DISTINCT FROM 'migrating'""") + """
    LEFT JOIN entities h ON h.kind = 'host' AND h.id = e.state->>'host'
    WHERE h.state->>'condition' IS DISTINCT FROM 'down'
      AND greatest((e.state->>'issued_at')::bigint, (h.state->>'updated_at')::bigint)
          <= w.before
"""
# Networks some host has not applied, not counting hosts that are down.
NETWORKS = """
    SELECT e.id, (e.state->>'generation')::int AS generation,
           (e.state->>'attempts')::int AS attempts""" + _overdue("""kind = 'network'
          AND state->>'status' = 'active'
          AND state @? '$.hosts.* ? (@.observed_generation < $.generation)'""") + """
    CROSS JOIN LATERAL (
        SELECT max((h.state->>'updated_at')::bigint) AS host_at
        FROM jsonb_each(e.state->'hosts') AS span(host, view)
        LEFT JOIN entities h ON h.kind = 'host' AND h.id = span.host
        WHERE (span.view->>'observed_generation')::int < (e.state->>'generation')::int
          AND h.state->>'condition' IS DISTINCT FROM 'down'
        HAVING count(*) > 0
    ) AS late
    WHERE greatest((e.state->>'issued_at')::bigint, late.host_at) <= w.before
"""
# Balancers some node has not applied (an LB node's removal job too), not counting nodes
# that are down.
BALANCERS = """
    SELECT e.id, (e.state->>'generation')::int AS generation,
           (e.state->>'attempts')::int AS attempts""" + _overdue("""kind = 'lb'
          AND state->>'stalled' IS NULL
          AND state @? '$.slots[*] ? (@.node != null && @.observed_generation < $.generation
              && (@.port.type() != "null" || $.status == "deleted" || $.status == "failed"))'
          """) + """
    CROSS JOIN LATERAL (
        SELECT max((h.state->>'updated_at')::bigint) AS host_at
        FROM jsonb_array_elements(e.state->'slots') AS slot
        LEFT JOIN entities h ON h.kind = 'host' AND h.id = slot->>'node'
        WHERE slot->>'node' IS NOT NULL
          AND (slot->'port' <> 'null'::jsonb OR e.state->>'status' IN ('deleted', 'failed'))
          AND (slot->>'observed_generation')::int < (e.state->>'generation')::int
          AND h.state->>'condition' IS DISTINCT FROM 'down'
        HAVING count(*) > 0
    ) AS late
    WHERE greatest((e.state->>'issued_at')::bigint, late.host_at) <= w.before
"""


@dataclass(frozen=True, slots=True)
class ReconcilerConfig:
    deadline_s: float = 10.0
    max_attempts: int = 5
    max_backoff_s: float = 300.0
    evacuate_after_s: float | None = None  # None: a host down is never evacuated by itself


class Reconciler:
    def __init__(self, publisher: Publisher, config: ReconcilerConfig) -> None:
        self.publisher, self.config = publisher, config

    async def tick(self, conn: asyncpg.Connection,
                   now_ms: int) -> list[c.Command]:
        cfg = self.config
        due = list(zip(*windows(now_ms, int(cfg.deadline_s * 1000),
                                int(cfg.max_backoff_s * 1000)), strict=True))
        commands: list[c.Command] = []
        for query, cls in ((INSTANCES, c.Reconcile), (NETWORKS, c.ReconcileNetwork),
                           (BALANCERS, c.ReconcileLb)):
            commands += [
                cls(cmd_id=f"rc-{r['id']}-{r['generation']}-{r['attempts']}", id=r["id"],
                    generation=r["generation"], max_attempts=cfg.max_attempts)
                for r in await conn.fetch(query, *due)
            ]
        commands += await _drains_due(conn, now_ms)
        if cfg.evacuate_after_s is not None:
            commands += await _evacuations_due(conn, now_ms, int(cfg.evacuate_after_s * 1000))
        if commands:
            await self.publisher.publish_many([(SYSTEM, cmd) for cmd in commands])
        return commands


async def _drains_due(conn: asyncpg.Connection, now_ms: int) -> list[c.Command]:
    """A tick for each balancer with a leaving member whose drain time is up; its key is
    the oldest drain's start, so ticks for one state dedupe."""
    out: list[c.Command] = []
    for r in await conn.fetch("SELECT id, state FROM entities WHERE kind = 'lb'"
                              " AND state->'draining' <> '{}'::jsonb"):
        state = msgspec.json.decode(r["state"], type=LoadBalancer)
        if drains_due(state, now_ms):
            oldest = min(state.draining.values())
            out.append(c.DrainTick(cmd_id=f"dt-{r['id']}-{oldest}", id=r["id"]))
    return out


async def _evacuations_due(conn: asyncpg.Connection, now_ms: int,
                           after_ms: int) -> list[c.Command]:
    """EvacuateHost for each hypervisor down longer than ``after_ms`` and not evacuated
    yet; keyed by when it went down, so the ticks of one outage dedupe."""
    rows = await conn.fetch(
        """
        SELECT id, (state->>'updated_at')::bigint AS down_since FROM entities
        WHERE kind = 'host' AND state->>'condition' = 'down'
          AND coalesce(state->>'role', 'hypervisor') = 'hypervisor'
          AND coalesce((state->>'evacuated_at')::bigint, 0) = 0
          AND (state->>'updated_at')::bigint <= $1
        """, now_ms - after_ms)
    return [c.EvacuateHost(cmd_id=f"ev-{r['id']}-{r['down_since']}", id=r["id"]) for r in rows]
